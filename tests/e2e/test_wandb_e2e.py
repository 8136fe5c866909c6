"""`fg-sink wandb` as a user runs it, offline, beside a real `fg-train`: the run's .wandb files read back
(wandb's protobuf records, `sinks._wandb_file`) equal the journal, across a SIGKILLed and restarted sink,
and a SIGKILLed trainer ends the W&B run with a non-zero exit code."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from fg_bus import read_journal, registry  # noqa: E402
from sinks import _wandb_file  # noqa: E402
from sinks.wandb_sink import wandb_id  # noqa: E402

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")
HOLD_AT_STEP = Path(__file__).with_name("monitoring.yaml")  # tiny.yaml with a step that hangs
ROW_EVENTS = {"on_log", "on_step_end", "grad_stats", "system", "on_predict", "warning", "alert", "control", "end"}


def environment(fg_home: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(FG_HOME=str(fg_home), OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        env[f"WANDB_{name}_DIR"] = str(tmp_path / f"wandb-{name.lower()}")
    return env


def fg_train(env: dict, out: Path, max_steps: int, *args: str, config: Path = TINY) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-train"), str(config), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", str(max_steps), *args], stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / "train.log", "wb"), env=env, start_new_session=True)


def fg_sink(env: dict, tmp_path: Path, run: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), "wandb", "--run", run, "--wandb-dir", str(tmp_path / "wb"),
                             "--dead-after", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def wait_for(what: str, check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def run_info(out: Path) -> registry.RunInfo:
    wait_for("run", lambda: list((out / "fg-bus").glob("*/run.json")))
    return registry.load_run(next((out / "fg-bus").glob("*/run.json")).parent)


def segments(tmp_path: Path, info: registry.RunInfo) -> list[Path]:
    return _wandb_file.segments(tmp_path / "wb" / "wandb", wandb_id(info.run_id))


def exit_codes(seg: Path) -> list[int]:
    return [r.exit.exit_code for r in _wandb_file.records(seg) if r.WhichOneof("record_type") == "exit"]


def assert_history_is_the_journal(tmp_path: Path, info: registry.RunInfo) -> list[dict]:
    journal = list(read_journal(info.journal_path()))
    rows = [row for seg in segments(tmp_path, info) for row in _wandb_file.history(seg)]
    steps = [row["_step"] for row in rows]
    assert len(steps) == len(set(steps)), "a point is in the W&B history twice"
    wanted = [r for r in journal if r["event"] in ROW_EVENTS and (r["event"] != "on_step_end" or r.get("metrics"))]
    assert steps == [r["seq"] for r in wanted]  # every point once, in order
    by_seq = {r["seq"]: r for r in journal}
    for row in rows:
        r = by_seq[row["_step"]]
        assert row["train/global_step"] == r["global_step"]
        assert row["_timestamp"] == pytest.approx(datetime.fromisoformat(r["timestamp"]).timestamp())
        if r["event"] == "on_log" and "loss" in r["metrics"]:
            loss = r["metrics"]["loss"]
            assert math.isnan(row["train/loss"]) if math.isnan(loss) else row["train/loss"] == pytest.approx(loss)
        if r["event"] == "on_log" and "eval_loss" in r["metrics"]:
            assert row["eval/loss"] == pytest.approx(r["metrics"]["eval_loss"])
    return journal


def test_a_sink_killed_and_restarted_logs_every_point_once(fg_home, tmp_path):
    env = environment(fg_home, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    train = fg_train(env, out, max_steps=400)
    info = run_info(out)
    sink = fg_sink(env, tmp_path, info.run_id)
    # SIGKILL the sink once wandb has written part of the run
    wait_for("W&B history", lambda: segments(tmp_path, info) and len(_wandb_file.history(segments(tmp_path, info)[0])) > 50)
    sink.kill()
    sink.wait(120)
    assert train.wait(300) == 0, (out.parent / "train.log").read_text()
    again = fg_sink(env, tmp_path, info.run_id)  # the run has ended: it replays what the tracker lacks
    assert again.wait(120) == 0, again.stderr.read().decode()
    segs = segments(tmp_path, info)
    assert len(segs) == 2  # offline, the resumed run is a second run directory with the same id (wandb sync)
    journal = assert_history_is_the_journal(tmp_path, info)
    assert exit_codes(segs[-1]) == [0]
    config = _wandb_file.config(segs[-1])
    assert config["max_steps"] == 400 and config["learning_rate"] == 1e-3 and config["n_layer"] == 1
    state = json.loads((tmp_path / "wb" / "wandb" / f"fg-sink-{wandb_id(info.run_id)}.json").read_text())
    assert state["finished"] and state["next_seq"] == journal[-1]["seq"] + 1
    third = fg_sink(env, tmp_path, info.run_id)  # once more, after the end: nothing is written again
    assert third.wait(120) == 0, third.stderr.read().decode()
    assert segments(tmp_path, info) == segs


def test_a_killed_trainer_ends_the_wandb_run_failed(fg_home, tmp_path):
    env = environment(fg_home, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # The run holds at step 30 (until it is killed): the journal the sink has to catch up on stays short
    # however far behind a loaded machine leaves the sink, instead of growing with a trainer that runs on.
    train = fg_train(env, out, 100, "--var", "hold_step=30", "--var", f"release={tmp_path / 'never'}",
                     config=HOLD_AT_STEP)
    info = run_info(out)
    sink = fg_sink(env, tmp_path, info.run_id)
    wait_for("W&B history", lambda: segments(tmp_path, info) and len(_wandb_file.history(segments(tmp_path, info)[0])) > 20)
    os.killpg(train.pid, signal.SIGKILL)
    train.wait(120)
    assert sink.wait(120) == 3, sink.stderr.read().decode()  # 3: the trainer died
    (seg,) = segments(tmp_path, info)
    assert exit_codes(seg) == [1]  # W&B shows it failed / crashed
    summary = {}
    for r in _wandb_file.records(seg):
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["fg/end"].startswith("dead")
    assert_history_is_the_journal(tmp_path, info)
