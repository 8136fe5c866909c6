"""Faults around the training process itself, on real `fg-train` processes: a sink that dies mid-run, two
runs into one output directory, damaged checkpoints, configs that import what they should not, bad values
that used to end in a traceback. (Ctrl-C to the process group: tests/e2e/test_bus_e2e.py.)"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fg_bus import read_journal
from trainer import _checkpoint as ckpt
from trainer.config import ConfigError, load_config

from test_process_faults import BIN, TINY, child_sink_pid, env, fg_train, run_dir, steps_in, wait_for

pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    """Wait for a process started with stderr=PIPE; its status and stderr."""
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr.decode(errors="replace")


def train_once(fg_home: Path, out: Path, *args: str, max_steps: int = 20, config: Path = TINY,
               timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fg-train"), str(config), "--device", "cpu", "--output-dir", str(out),
                           "--max-steps", str(max_steps), *args], capture_output=True, text=True,
                          env=env(fg_home), timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *named: str) -> None:
    """A usage error (exit 2) with one clear line naming what is wrong, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in named:
        assert text in proc.stderr, (text, proc.stderr[-3000:])


def tiny_with(tmp_path: Path, extra: str) -> Path:
    """tests/e2e/tiny.yaml with `extra` appended (top-level keys), in tmp_path."""
    config = tmp_path / "config.yaml"
    config.write_text(TINY.read_text() + "\n" + extra + "\n")
    return config


# -- the sinks fg-train starts --------------------------------------------------------------------------


def test_a_sink_killed_mid_run_is_named_with_its_resume_command_and_fg_train_exits_3(fg_home, tmp_path):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, "--sinks", "json", max_steps=100_000)
    sink_pid = wait_for(lambda: child_sink_pid(train.pid, "json"), 240, "fg-train to start its json sink")
    journal = run_dir(out) / "journal.rank0.jsonl"
    wait_for(lambda: steps_in(journal) > 20, 240, "training to start")
    os.kill(sink_pid, signal.SIGKILL)
    # fg-train reaps it at a log step (a poll); then let it run on a little and stop it.
    wait_for(lambda: not Path(f"/proc/{sink_pid}").exists(), 240, "fg-train to notice the dead sink")
    seen = steps_in(journal)
    wait_for(lambda: steps_in(journal) > seen + 20, 240, "training to go on without its sink")
    train.send_signal(signal.SIGTERM)
    code, stderr = finish(train)
    assert code == 3, stderr[-3000:]  # a sink it started ended early: that outranks the stop by SIGTERM
    resume = f"fg-sink json --run {run_dir(out)}"
    assert stderr.count("exited with signal SIGKILL") == 1, stderr[-3000:]  # said once, mid-run
    assert f"the json sink (pid {sink_pid}) exited before the end record, signal SIGKILL" in stderr, stderr[-3000:]
    assert resume in stderr
    # The command it names finishes the log.
    records = list(read_journal(journal))
    again = subprocess.run(resume.replace("fg-sink", str(BIN / "fg-sink")).split(), capture_output=True,
                           env=env(fg_home), timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    log = out / "logs" / f"{records[0]['run']}.jsonl"
    assert [json.loads(line)["seq"] for line in log.read_bytes().splitlines()] == [r["seq"] for r in records]


def test_tcp_beyond_loopback_without_keys_is_refused_unless_insecure(fg_home, tmp_path):
    refused(train_once(fg_home, tmp_path / "out", "--bus-tcp", "0.0.0.0:0", max_steps=2), "--insecure", "0.0.0.0")
    assert not list((tmp_path / "out").glob("fg-bus/*/run.json"))  # no run was registered
    proc = train_once(fg_home, tmp_path / "out", "--bus-tcp", "0.0.0.0:0", "--insecure", max_steps=2)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- one output directory, one run ----------------------------------------------------------------------


def test_a_second_fg_train_into_the_same_output_dir_is_refused_and_the_first_is_untouched(fg_home, tmp_path):
    out = tmp_path / "run"
    first = fg_train(fg_home, out, max_steps=100_000)
    journal = run_dir(out) / "journal.rank0.jsonl"
    wait_for(lambda: steps_in(journal) > 10, 240, "the first run to train")
    second = train_once(fg_home, out, max_steps=150, timeout=120)
    refused(second, str(out), f"pid {first.pid}", "in use by another fg-train")
    first.send_signal(signal.SIGTERM)
    code, stderr = finish(first)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert len(list((out / "fg-bus").glob("*/run.json"))) == 1  # the second registered no run there
    records = list(read_journal(journal))
    assert records[-1]["event"] == "end" and [r["seq"] for r in records] == list(range(len(records)))
    last = ckpt.latest_checkpoint(out)
    assert last.name == f"checkpoint-{records[-1]['global_step']}" and ckpt.verify_checksums(last)


def test_an_output_dir_that_is_a_file_is_refused_at_start(fg_home, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    refused(train_once(fg_home, target, max_steps=150), str(target), "is not a directory")
    assert target.read_bytes() == b"precious"


# -- checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run with checkpoint-20 (checksums.json in it), made once for the checkpoint tests."""
    home = tmp_path_factory.mktemp("fg-home-ckpt")
    out = tmp_path_factory.mktemp("saved") / "run"
    proc = train_once(home, out, "--no-bus", max_steps=20)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_of(saved_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out, ignore=shutil.ignore_patterns(".fg-train.lock"))
    return out, out / "checkpoint-20"


def resume(fg_home: Path, out: Path) -> subprocess.CompletedProcess:
    return train_once(fg_home, out, "--no-bus", "--resume", max_steps=30)


def test_a_checkpoint_with_garbled_weights_is_refused_on_resume_naming_the_file(fg_home, saved_run, tmp_path):
    out, checkpoint = copy_of(saved_run, tmp_path)
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64  # NaN floats in the tensor data: torch.load alone loads them
    weights.write_bytes(bytes(data))
    refused(resume(fg_home, out), str(weights), "damaged")
    assert not (out / "checkpoint-30").exists()  # it trained nothing


@pytest.mark.parametrize("name, content, named", [
    (ckpt.DATA_POSITION_NAME, '{"epoch": -1, "samples_seen_in_epoch": 0, "world_size": 1}', "epoch is -1"),
    (ckpt.TRAINER_STATE_NAME, '{"global_step": 20,', "not valid JSON"),
    (ckpt.OPTIMIZER_NAME, "not a torch file", "cannot be read"),
])
def test_a_bad_file_in_an_older_checkpoint_is_refused_naming_it(fg_home, saved_run, tmp_path, name, content, named):
    """Without checksums.json (written before it existed) the checkpoint still loads, with a warning, and
    every file is checked as it is read."""
    out, checkpoint = copy_of(saved_run, tmp_path)
    (checkpoint / ckpt.CHECKSUMS_NAME).unlink()
    (checkpoint / name).write_text(content)
    proc = resume(fg_home, out)
    refused(proc, str(checkpoint / name), named)
    assert f"has no {ckpt.CHECKSUMS_NAME}" in proc.stderr


@pytest.mark.parametrize("position, named", [
    ({"epoch": "0", "samples_seen_in_epoch": 0, "world_size": 1}, "epoch is '0'"),
    ({"epoch": 0, "samples_seen_in_epoch": True, "world_size": 1}, "samples_seen_in_epoch is True"),
    ({"epoch": 0, "samples_seen_in_epoch": 0, "world_size": 0}, "world_size is 0"),
    ([0, 0, 1], "holds a list"),
])
def test_a_data_position_of_the_wrong_shape_is_refused_naming_the_file(tmp_path, position, named):
    (tmp_path / ckpt.DATA_POSITION_NAME).write_text(json.dumps(position))
    with pytest.raises(ckpt.CheckpointError, match=named) as error:
        ckpt.load_data_position(tmp_path)
    assert str(tmp_path / ckpt.DATA_POSITION_NAME) in str(error.value)


def test_an_older_checkpoint_without_checksums_still_resumes(fg_home, saved_run, tmp_path):
    out, checkpoint = copy_of(saved_run, tmp_path)
    (checkpoint / ckpt.CHECKSUMS_NAME).unlink()
    proc = resume(fg_home, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"has no {ckpt.CHECKSUMS_NAME}" in proc.stderr
    assert ckpt.verify_checksums(out / "checkpoint-30")  # the new one has its manifest


# -- configs are code -----------------------------------------------------------------------------------


def test_allow_module_refuses_a_config_that_runs_a_shell_command(fg_home, tmp_path):
    marker = tmp_path / "ran"
    config = tiny_with(tmp_path, f"hook: !singleton:os:system touch {marker}")
    line = config.read_text().splitlines().index(f"hook: !singleton:os:system touch {marker}") + 1
    proc = train_once(fg_home, tmp_path / "out", "--allow-module", "trainer", config=config)
    refused(proc, f"{config}:{line}", "!singleton:os:system", "imports module 'os'", "not allowed")
    assert not marker.exists()
    # Without the option a config is trusted code, as it always was.
    assert train_once(fg_home, tmp_path / "out2", "--no-bus", config=config, max_steps=2).returncode == 0
    assert marker.exists()


def test_allow_module_accepts_the_built_in_config_with_another_prefix(fg_home, tmp_path):
    # What it imports (trainer.data, trainer.chargpt) is always allowed.
    builtin = train_once(fg_home, tmp_path / "out2", "--no-bus", "--allow-module", "torch",
                         config=Path(__file__).parents[2] / "trainer" / "default.yaml", max_steps=1)
    assert builtin.returncode == 0, builtin.stderr[-3000:]


@pytest.mark.parametrize("tag, reached", [
    ("!singleton:trainer.data:torch.load [x.pt]", "reaches module 'torch'"),  # through an allowed module
    ("!singleton:trainer.config:load_config [NESTED]", "imports module 'os'"),  # a config loading a config
])
def test_allow_module_cannot_be_escaped_through_an_allowed_module(tmp_path, tag, reached):
    nested = tmp_path / "nested.yaml"
    nested.write_text("x: !singleton:os:getcwd\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tag.replace('NESTED', str(nested))}\n")
    with pytest.raises(ConfigError, match=reached):
        load_config(config, allow_modules=["trainer.config"])


# -- values that used to end in a traceback -------------------------------------------------------------


def test_a_seed_out_of_range_is_refused_with_the_range(fg_home, tmp_path):
    refused(train_once(fg_home, tmp_path / "out", "--seed", str(2**64)), "--seed", "0 .. 2**63-1")
    config = tmp_path / "seeded.yaml"
    config.write_text(TINY.read_text().replace("args:\n", f"args:\n    seed: {2**64}\n", 1))
    refused(train_once(fg_home, tmp_path / "out", config=config), str(config), "seed", "0 .. 2**63-1")


def test_a_non_callback_in_trainer_callbacks_is_refused_naming_the_entry(fg_home, tmp_path):
    config = tiny_with(tmp_path, "trainer_callbacks:\n    - !singleton:trainer:PrinterCallback\n    - JsonLogger")
    refused(train_once(fg_home, tmp_path / "out", config=config),
            f"{config}:", "trainer_callbacks[1] is 'JsonLogger' (str), not a callback")


def test_a_bad_var_value_and_an_empty_output_dir_are_refused_with_the_option_named(fg_home, tmp_path):
    refused(train_once(fg_home, tmp_path / "out", "--var", "a=[1", "--no-bus"), "--var", "a: '[1' is not a YAML value")
    proc = subprocess.run([str(BIN / "fg-train"), str(TINY), "--output-dir", ""], capture_output=True, text=True,
                          env=env(fg_home), timeout=60, cwd=tmp_path)
    refused(proc, "--output-dir", "empty path")
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


def test_the_resume_command_printed_at_a_signal_keeps_the_options_and_continues_the_same_run(fg_home, tmp_path):
    config = tmp_path / "var config.yaml"  # a space: the command must be shell-quoted
    config.write_text(TINY.read_text().replace("args:\n", "args:\n    run_name: !var rn\n", 1))
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "fg-train"), str(config), "--var", "rn=trial one", "--device", "cpu",
                             "--output-dir", str(out), "--max-steps", "150", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(fg_home))
    wait_for(lambda: steps_in(next(iter((out / "fg-bus").glob("*/journal.rank0.jsonl")), out / "none")) >= 5
             if (out / "fg-bus").exists() else False, 120, "five steps")
    proc.send_signal(signal.SIGINT)
    code, stderr = finish(proc)
    assert code == 128 + signal.SIGINT, stderr[-3000:]
    command = stderr.strip().splitlines()[-1].strip().removeprefix("resume:").strip()
    assert command.startswith("fg-train ") and command.endswith(" --resume"), stderr[-3000:]
    argv = shlex.split(command)
    assert argv[1] == str(config) and "rn=trial one" in argv and argv[argv.index("--max-steps") + 1] == "150", argv
    resumed = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env(fg_home),
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 150 and state["max_steps"] == 150, state["global_step"]


def test_a_sinks_resume_command_keeps_the_options_it_was_started_with(tmp_path):
    from trainer.sink_callbacks import JsonLogger, TBLogger

    for callback, option in ((JsonLogger(out=str(tmp_path / "my log.jsonl")), "--out"),
                             (TBLogger(str(tmp_path / "tb")), "--logdir")):
        callback.options, callback.run_dir = callback.sink_args(None), str(tmp_path / "run")
        argv = shlex.split(callback.resume_command)
        assert argv[:4] == ["fg-sink", callback.kind, "--run", str(tmp_path / "run")], argv
        assert argv[argv.index(option) + 1] in (str(tmp_path / "my log.jsonl"), str(tmp_path / "tb")), argv
