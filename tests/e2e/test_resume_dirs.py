"""Two runs into one output directory and `--resume`, with real `fg-train` processes (tiny.yaml, one torch
thread, a private FG_HOME): the new run's rotation keeps the old run's checkpoints and its own newest, the
start says so, `--resume` continues the run saved last and says which; a checkpoint with nothing left to
train is refused; and the resume command printed at SIGTERM keeps every option."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import _checkpoint as ckpt

BIN = Path(sys.executable).parent
TINY = Path(__file__).parent / "tiny.yaml"
pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine


def config(tmp_path: Path, save_total_limit: int) -> Path:
    path = tmp_path / f"limit{save_total_limit}.yaml"
    path.write_text(TINY.read_text().replace("save_steps: 100", f"save_steps: 10\n    save_total_limit: {save_total_limit}"))
    return path


def env(fg_home: Path) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}


def fg_train(fg_home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fg-train"), *args, "--device", "cpu", "--no-progress"], capture_output=True,
                          text=True, env=env(fg_home), timeout=180)


def checkpoints(out: Path) -> dict[str, str | None]:
    """checkpoint name -> the run id in its marker."""
    return {p.name: (ckpt.read_run_marker(p) or {}).get("run") for p in ckpt.sorted_checkpoints(out)}


def run_id(stderr: str) -> str:
    return re.search(r"fg-train: run (\S+) publishing", stderr).group(1)


def test_a_second_run_into_the_same_dir_keeps_the_first_runs_checkpoints_and_resume_continues_it(fg_home, tmp_path):
    out = tmp_path / "out"
    a = fg_train(fg_home, str(config(tmp_path, 2)), "--output-dir", str(out), "--max-steps", "40")
    assert a.returncode == 0, a.stderr[-3000:]
    run_a = run_id(a.stderr)
    assert checkpoints(out) == {"checkpoint-30": run_a, "checkpoint-40": run_a}
    assert "other runs" not in a.stderr  # a fresh directory: nothing to say

    b = fg_train(fg_home, str(config(tmp_path, 1)), "--output-dir", str(out), "--max-steps", "20")
    assert b.returncode == 0, b.stderr[-3000:]
    run_b = run_id(b.stderr)
    # rotation with save_total_limit 1 kept B's newest and never touched A's
    assert checkpoints(out) == {"checkpoint-20": run_b, "checkpoint-30": run_a, "checkpoint-40": run_a}
    assert f"{out} already holds checkpoints of other runs; they are kept" in b.stderr, b.stderr[-3000:]
    assert f"  checkpoint-30, checkpoint-40: run {run_a}, to step 40" in b.stderr
    assert b.stderr.count("already holds checkpoints") == 1

    # --resume: B's checkpoint (saved last), not A's checkpoint-40 (the highest step); it says so, names A's
    # checkpoint-40 with the command that resumes it, and warns that B will now save over A's checkpoint-30.
    c = fg_train(fg_home, str(config(tmp_path, 1)), "--output-dir", str(out), "--max-steps", "30", "--resume")
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"--resume: resuming {out / 'checkpoint-20'} (run {run_b}, step 20 of 20" in c.stderr, c.stderr[-3000:]
    assert f"{out / 'checkpoint-40'} (run {run_a}, step 40 of 40) is another run's, at a higher step" in c.stderr
    assert f"--resume {out / 'checkpoint-40'}" in c.stderr
    assert f"will replace checkpoint-30 (run {run_a})" in c.stderr
    state = json.loads((out / ckpt.TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == 30 and state["log_history"][0]["step"] == 5  # B's history, continued
    lineage_b = ckpt.read_run_marker(out / "checkpoint-30")["lineage"]
    assert lineage_b == run_b and set(checkpoints(out)) == {"checkpoint-30", "checkpoint-40"}

    # once more to the same max_steps: nothing left to train, refused with what to do instead
    d = fg_train(fg_home, str(config(tmp_path, 1)), "--output-dir", str(out), "--max-steps", "30", "--resume")
    assert d.returncode == 2 and "Traceback" not in d.stderr, d.stderr[-3000:]
    assert f"{out / 'checkpoint-30'} (run {run_id(c.stderr)}) is at step 30, and this run trains to step 30" in d.stderr
    assert "nothing is left to train. Raise --max-steps above 30" in d.stderr


def test_the_resume_command_printed_at_sigterm_keeps_every_option(fg_home, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    argv = [str(config(tmp_path, 2)), "--device", "cpu", "--output-dir", str(out), "--max-steps", "200",
            "--seed", "7", "--no-progress", "--stall-after", "0"]
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(BIN / "fg-train"), *argv], stdout=f, stderr=subprocess.STDOUT, env=env(fg_home))
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob("checkpoint-*")):  # a few steps in: the first checkpoint (step 10)
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    output = log.read_text()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = json.loads((out / ckpt.TRAINER_STATE_NAME).read_text())["global_step"]
    assert stopped_at < 200, output[-3000:]
    commands = re.findall(r"^\s*(?:resume:\s*)?(fg-train .*--resume)\s*$", output, re.M)
    assert commands, output[-3000:]
    command = shlex.split(commands[-1])
    assert command == ["fg-train", *argv, "--resume"], command  # every option, in order

    resumed = subprocess.run([str(BIN / "fg-train"), *command[1:]], capture_output=True, text=True,
                             env=env(fg_home), timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out / f'checkpoint-{stopped_at}'} " in resumed.stderr, resumed.stderr[-3000:]
    state = json.loads((out / ckpt.TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == state["max_steps"] == 200
