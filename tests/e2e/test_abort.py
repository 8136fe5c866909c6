"""`fg-bus ctl RUN abort` on a real fg-train: it stops at the next step boundary and saves nothing (no
checkpoint at that step although its save cadence asks for one at every step, no final model), and the
control record says it was applied, and every follower says how the run ended and why (`fg-bus ls`, its
--json, `fg-bus cat`, `fg-sink tail`: stopped by `fg-bus ctl abort`, from whom). The same run shows two other
things of a run's start: its run id
carries one timestamp (its output dir's name already holds one), and fg-train removes what a dead run left
behind (the socket directory of a real Publisher killed with SIGKILL)."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from fg_bus import registry

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")

PUBLISHER = textwrap.dedent("""
    import sys, time
    from fg_bus import Publisher
    Publisher(sys.argv[1], sys.argv[2], system_interval=0).start()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def env(fg_home, monkeypatch):
    """Sockets in a private temp dir (not the machine's shared /tmp/fg-UID), no XDG_RUNTIME_DIR."""
    tmp = Path(tempfile.mkdtemp(prefix="ab", dir="/tmp"))  # short: socket paths are limited to ~100 bytes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    yield {**env, "TMPDIR": str(tmp), "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(tmp, ignore_errors=True)


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def test_ctl_abort_stops_at_a_step_boundary_saving_nothing(env, tmp_path):
    # A dead run's leftovers: a real Publisher killed with SIGKILL leaves its socket dir behind.
    dead = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path / "dead"), "dead-20261201-000001-aaaa"],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "ready"
    dead_sockets = Path(registry.load_run(tmp_path / "dead").data["sockets_dir"])
    dead.kill()
    dead.wait(120)
    assert dead_sockets.is_dir()

    config = tmp_path / "every-step.yaml"  # a checkpoint at every step: an abort must still save none
    config.write_text(TINY.read_text().replace("save_steps: 100", "save_steps: 1\n    save_total_limit: 2"))
    out = tmp_path / "tiny-20261201-085816"  # as fg-train's default output dirs are named: NAME-TIME
    log = open(tmp_path / "train.log", "wb")
    proc = subprocess.Popen([str(BIN / "fg-train"), str(config), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", "100000"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(out) or not list((out / "fg-bus").glob("*/run.json")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        info = registry.load_run(next((out / "fg-bus").glob("*/run.json")).parent)
        assert re.fullmatch(r"tiny-\d{8}-\d{6}-[0-9a-f]{4}", info.run_id), info.run_id

        ctl = subprocess.run([str(BIN / "fg-bus"), "ctl", info.run_id[:12], "abort"], capture_output=True,
                             text=True, timeout=120, env=env)  # a prefix of the id resolves too
        assert ctl.returncode == 0, ctl.stderr
        assert "abort applied" in ctl.stdout, ctl.stdout
        assert proc.wait(120) == 0, (tmp_path / "train.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        log.close()
    output = (tmp_path / "train.log").read_text()

    records = [orjson.loads(line) for line in info.journal_path().read_bytes().splitlines()]
    applied = [r for r in records if r["event"] == "control" and r.get("applied")]
    assert [r["cmd"] for r in applied] == ["abort"]
    step = applied[0]["global_step"]
    assert f"at step {step}" in ctl.stdout
    assert f"fg-train: aborted at step {step}" in output and "nothing saved" in output
    assert "--resume" in output  # earlier checkpoints remain to resume from
    # No step after it, nothing saved at it (every step saves otherwise), no final model.
    assert max(r["global_step"] or 0 for r in records) == step
    assert not [r for r in records if r["event"] == "on_save" and r["global_step"] >= step]
    assert checkpoints(out) and max(checkpoints(out)) < step, checkpoints(out)
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()
    assert records[-1]["event"] == "end"
    assert [r["event"] for r in records if r["event"] == "on_train_end"] == ["on_train_end"]

    # How it ended, as every follower shows it: stopped, by `fg-bus ctl abort`, from this user here.
    assert records[-1]["status"] == "stopped"
    why = (f"`fg-bus ctl abort` from {getpass.getuser()}@{socket.gethostname()} (pid "
           f"{records[-1]['reason']['origin']['pid']}) at step {step}")
    assert records[-1]["reason"]["text"] == why, records[-1]
    listed = subprocess.run([str(BIN / "fg-bus"), "ls", "--json"], capture_output=True, text=True, timeout=120,
                            env=env)
    row = next(r for r in json.loads(listed.stdout) if r["run_id"] == info.run_id)
    assert row["status"] == "stopped" and row["end_reason"]["by"] == "ctl", row
    assert row["end_reason"]["cmd"] == "abort" and row["end_reason"]["source"] == "fg-bus ctl"
    assert row["end_reason"]["origin"]["user"] == getpass.getuser() == records[-1]["reason"]["origin"]["user"]
    assert row["end_reason"]["origin"]["host"] == socket.gethostname()
    table = subprocess.run([str(BIN / "fg-bus"), "ls"], capture_output=True, text=True, timeout=120, env=env)
    line = next(line for line in table.stdout.splitlines() if line.startswith(info.run_id))
    assert line.split()[1] == "stopped" and "`fg-bus ctl abort` from " in line, table.stdout
    cat = subprocess.run([str(BIN / "fg-bus"), "cat", info.run_id], capture_output=True, text=True, timeout=120,
                         env=env)
    assert cat.returncode == 0 and cat.stderr.splitlines()[-1] == f"fg-bus: run {info.run_id} stopped: {why}", \
        cat.stderr
    tail = subprocess.run([str(BIN / "fg-sink"), "tail", "--run", str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.splitlines()[-1] == f"[step {step}] end: stopped: {why}", tail.stdout[-2000:]
    assert f"fg-sink tail: run {info.run_id} stopped: {why}; " in tail.stderr, tail.stderr

    # At its start fg-train removed the dead run's socket dir, said so in one line; its own is gone too.
    assert not dead_sockets.exists()
    assert [line for line in output.splitlines() if "of dead runs" in line] == [
        "fg-train: removed 1 socket directory and 0 registry entries of dead runs (`fg-bus gc` lists such "
        "leftovers)"], output
    assert not list(dead_sockets.parent.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctl_abort_sent_to_rank_1_aborts_both_ranks_at_the_same_step(env, tmp_path):
    config = tmp_path / "every-step.yaml"
    config.write_text(TINY.read_text().replace("save_steps: 100", "save_steps: 1\n    save_total_limit: 2"))
    out = tmp_path / "run"
    log = open(tmp_path / "train.log", "wb")
    train = subprocess.Popen([str(BIN / "fg-train"), str(config), "--nproc-per-node", "2", "--device", "cpu",
                              "--output-dir", str(out), "--max-steps", "100000"], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:  # until rank 1 publishes steps and a checkpoint is there
            found = list((out / "fg-bus").glob("*/journal.rank1.jsonl")) if (out / "fg-bus").exists() else []
            if found and checkpoints(out) and found[0].read_bytes().count(b'"on_step_end"') > 5:
                break
            assert train.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        ctl = subprocess.run([str(BIN / "fg-bus"), "ctl", str(out), "abort", "--rank", "1", "--timeout", "60"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert ctl.returncode == 0, ctl.stderr
        assert train.wait(120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(60)
        log.close()
    info = registry.load_run(found[0].parent)
    last = {}
    for rank in (0, 1):
        journal = [orjson.loads(line) for line in info.journal_path(rank).read_bytes().splitlines()]
        last[rank] = [r["global_step"] for r in journal if r["event"] == "on_step_end"][-1]
        assert journal[-1]["event"] == "end"
        assert not [r for r in journal if r["event"] == "on_save" and r["global_step"] >= last[rank]]
    applied = [r for r in orjson_lines(info.journal_path(1)) if r["event"] == "control" and r.get("applied")]
    # taken at a step's end on rank 1, acted on by both ranks at the same later step: K to 2K-1 steps later,
    # K at most 64 (the same step, at an epoch's end)
    assert [r["cmd"] for r in applied] == ["abort"] and last[1] - 127 <= applied[0]["global_step"] <= last[1]
    assert last[1] == last[0]
    assert max(checkpoints(out)) < last[0], checkpoints(out)
    assert not (out / "model.safetensors").exists()
    assert f"fg-train: aborted at step {last[0]}" in (tmp_path / "train.log").read_text()


def orjson_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
