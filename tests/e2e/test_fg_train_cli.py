"""End to end: the installed `fg-train` console script, run as a subprocess on the CPU.

The built-in default (a small char GPT) trains for a few steps, writes a complete checkpoint, resumes from
it to a larger --max-steps, and rejects bad input with a message that names the culprit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

FG_TRAIN = os.path.join(os.path.dirname(sys.executable), "fg-train")
TRAIN_TIMEOUT = 180  # seconds, for a training run (about 20 s on two CPU cores)
QUICK_TIMEOUT = 60  # seconds, for a run that fails or prints help (a few seconds)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # never touch a GPU, whatever --device says
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def fg_train(*args: str, cwd, timeout: int = TRAIN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([FG_TRAIN, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`fg-train --max-steps 30 --device cpu --output-dir OUT --no-progress`, run once for the module."""
    cwd = tmp_path_factory.mktemp("first-run")
    out = cwd / "OUT"
    proc = fg_train("--max-steps", "30", "--device", "cpu", "--output-dir", str(out), "--no-progress", cwd=cwd)
    return cwd, out, proc


def test_cli_exists():
    assert os.path.isfile(FG_TRAIN) and os.access(FG_TRAIN, os.X_OK), FG_TRAIN


def test_default_run_trains_and_writes_a_checkpoint(first_run):
    cwd, out, proc = first_run
    assert proc.returncode == 0, _explain(proc)
    assert "Done: 30 steps" in proc.stdout, _explain(proc)
    summary = proc.stdout[proc.stdout.index("Done:"):]
    assert str(out) in summary
    # --no-progress: log lines (the loss at step 1 and at step 25) instead of a bar.
    assert proc.stdout.count("'loss':") >= 2, _explain(proc)

    checkpoint = out / "checkpoint-30"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).is_file(), sorted(p.name for p in checkpoint.iterdir())
    assert (checkpoint / "pytorch_model.bin").is_file() or (checkpoint / "model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-30"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 30 and state["max_steps"] == 30
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 25]
    assert any("eval_loss" in h for h in state["log_history"])  # the last step is always evaluated
    # The final model and its state beside the checkpoints; nothing written outside the output dir.
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 30
    assert sorted(p.name for p in cwd.iterdir()) == ["OUT"]


def test_resume_continues_to_a_larger_max_steps(first_run, tmp_path):
    _, src, first = first_run
    assert first.returncode == 0, _explain(first)
    out = tmp_path / "OUT"
    shutil.copytree(src, out)
    proc = fg_train("--max-steps", "36", "--device", "cpu", "--output-dir", str(out), "--no-progress", "--resume",
                    cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert "resuming at step 30" in proc.stdout, _explain(proc)
    assert "Done: 36 steps" in proc.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 36 and state["max_steps"] == 36
    # The history continues the first run's (step 1 and 25 were logged before the resume).
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 25]
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [30, 36]
    assert json.loads((out / "checkpoint-36" / "trainer_state.json").read_text())["global_step"] == 36
    assert (out / "checkpoint-30").is_dir()  # save_total_limit 2 keeps both


@pytest.mark.parametrize("argv, named", [
    (["--max-steps", "-5"], "--max-steps"),
    (["--max-steps", "abc"], "--max-steps"),
    (["--device", "tpu"], "--device"),
])
def test_bad_option_values_are_rejected(tmp_path, argv, named):
    proc = fg_train(*argv, cwd=tmp_path, timeout=QUICK_TIMEOUT)
    assert proc.returncode != 0, _explain(proc)
    assert named in proc.stderr, _explain(proc)
    assert argv[1] in proc.stderr  # and the bad value
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_missing_config_file_is_rejected(tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    proc = fg_train(str(missing), "--device", "cpu", "--output-dir", str(tmp_path / "OUT"), cwd=tmp_path,
                    timeout=QUICK_TIMEOUT)
    assert proc.returncode != 0, _explain(proc)
    assert "config" in proc.stderr and str(missing) in proc.stderr, _explain(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "OUT").exists()


def test_resume_with_no_checkpoint_is_rejected(tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    proc = fg_train("--device", "cpu", "--output-dir", str(out), "--resume", "--max-steps", "5", "--no-progress",
                    cwd=tmp_path, timeout=QUICK_TIMEOUT)
    assert proc.returncode != 0, _explain(proc)
    assert "--resume" in proc.stderr and str(out) in proc.stderr, _explain(proc)
    assert "Traceback" not in proc.stderr
    assert "Done:" not in proc.stdout
    assert list(out.iterdir()) == []  # it did not train from scratch instead


OPTIONS = ("--max-steps", "--output-dir", "--device", "--seed", "--resume", "--var", "--no-progress")


def test_help_documents_the_options(tmp_path):
    proc = fg_train("--help", cwd=tmp_path, timeout=QUICK_TIMEOUT)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.startswith("usage: fg-train")
    for option in OPTIONS:
        assert option in proc.stdout, option
    assert "config" in proc.stdout and "examples:" in proc.stdout


def test_python_dash_m_trainer_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=QUICK_TIMEOUT)
    assert proc.returncode == 0, _explain(proc)
    assert "usage:" in proc.stdout
    for option in OPTIONS:
        assert option in proc.stdout, option


# fg-train in a process of its own that says, at the end, whether torch was imported; torchrun is not
# started: Popen is replaced by one that prints the command and "exits" 0.
NO_TORCH_PROBE = """
import subprocess, sys
class Ran:
    def __init__(self, command, **kwargs):
        print("COMMAND", command)
    def wait(self):
        return 0
subprocess.Popen = Ran
from trainer import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("EXIT", code, "TORCH", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["--max-steps", "0"], 2),
    (["--seed", "-1"], 2),
    (["--sinks", "tb,nope"], 2),
    (["--nproc-per-node", "2", "--device", "cpu", "--output-dir", "OUT", "--max-steps", "3"], 0),
])
def test_the_command_line_is_checked_and_torchrun_launched_without_importing_torch(tmp_path, argv, code):
    """`--help`, a mistake in the arguments and the `--nproc-per-node` launcher (which only waits for
    torchrun) answer in a fraction of a second: torch, over a second to import, is not."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *argv], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=QUICK_TIMEOUT)
    assert proc.stdout.splitlines()[-1] == f"EXIT {code} TORCH False", _explain(proc)
    if "--nproc-per-node" in argv:
        (command,) = [line for line in proc.stdout.splitlines() if line.startswith("COMMAND")]
        assert "'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'trainer'" in command
        assert "'--output-dir', 'OUT', '--max-steps', '3'" in command
