"""`fg-sink trackio` as a user runs it: a real `fg-train` run replayed into a real trackio store, read back with
trackio's own API (`trackio.Api`, `SQLiteStorage`) in a process of its own (trackio reads TRACKIO_DIR at import)."""

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

from fg_bus import read_journal

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")
HOLD_AT_STEP = Path(__file__).with_name("monitoring.yaml")  # tiny.yaml with a step that hangs
PROJECT = "fg-e2e"
SINGLE = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")

READER = """
import json, sys
import trackio
from trackio.sqlite_storage import SQLiteStorage
project = sys.argv[1]
out = []
for run in trackio.Api().runs(project):
    out.append({"name": run.name, "id": run.id, "config": run.config,
                "logs": SQLiteStorage.get_logs(project, run=run.name, run_id=run.id),
                "system": SQLiteStorage.get_system_logs(project, run=run.name, run_id=run.id),
                "alerts": run.alerts()})
print(json.dumps(out))
"""


def env(fg_home: Path, store: Path) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1", "TRACKIO_DIR": str(store)}


def fg_train(fg_home: Path, store: Path, out: Path, max_steps: int, *args: str, config: Path = TINY) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-train"), str(config), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", str(max_steps), "--system-interval", "0.2", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(fg_home, store))


def fg_sink(fg_home: Path, store: Path, run: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), "trackio", "--run", str(run), "--trackio-project", PROJECT,
                             "--trackio-dir", str(store), "--nice", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(fg_home, store))


def bus_dir(out: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((out / "fg-bus").glob("*/run.json"))
        if found:
            return found[0].parent
        time.sleep(0.05)
    raise AssertionError("no run appeared")


def state_seq(out: Path, run_id: str) -> int:
    path = out / "trackio" / f"{run_id}.json"
    try:
        return json.loads(path.read_text())["ranks"]["0"]["next_seq"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_state(out: Path, run_id: str, seq: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while state_seq(out, run_id) < seq:
        assert time.monotonic() < deadline, f"the sink's state did not reach seq {seq}"
        time.sleep(0.05)


def training_seq(run_dir: Path, steps: int, timeout: float = 240) -> int:
    """The seq of the journal's `steps`-th on_step_end record, once it is there (training under way)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [r["seq"] for r in read_journal(run_dir / "journal.rank0.jsonl") if r["event"] == "on_step_end"] \
            if (run_dir / "journal.rank0.jsonl").exists() else []
        if len(seen) >= steps:
            return seen[steps - 1]
        assert time.monotonic() < deadline, f"fewer than {steps} steps after {timeout} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def read_store(store: Path, project: str = PROJECT) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", READER, project], capture_output=True, timeout=120,
                          env={**os.environ, "TRACKIO_DIR": str(store)}, check=True)
    return json.loads(done.stdout.decode().splitlines()[-1])


def expected(journal: Path) -> tuple[list[tuple], list[tuple]]:
    """(step, timestamp, metrics) rows and (timestamp, metrics) system rows the journal should become."""
    rows, system = [], []
    for r in read_journal(journal):
        m, step, ts = r.get("metrics") or {}, r.get("global_step") or 0, datetime.fromisoformat(r["timestamp"]).isoformat()
        if r["event"] == "on_log":
            kept = {k: v for k, v in m.items() if k not in SINGLE}
            if kept:
                named = {("eval/" + k[5:] if k.startswith("eval_") else "train/" + k): v for k, v in kept.items()}
                rows.append((step, ts, {**named, "train/global_step": step}))
        elif r["event"] == "on_step_end" and m:
            rows.append((step, ts, {f"train/step_{k}": v for k, v in m.items()}))
        elif r["event"] == "system" and m:
            system.append((ts, {f"system/{k}": v for k, v in m.items() if isinstance(v, (int, float))}))
    return rows, system


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12))


def assert_equals_journal(run: dict, journal: Path) -> None:
    rows, system = expected(journal)
    got = [(g.pop("step"), g.pop("timestamp"), g) for g in run["logs"]]
    assert len(got) == len(rows), f"{len(got)} rows in trackio, {len(rows)} in the journal"
    for g, w in zip(got, rows):
        assert g[:2] == w[:2] and g[2].keys() == w[2].keys() and all(close(g[2][k], w[2][k]) for k in w[2]), (g, w)
    got_system = [(s.pop("timestamp"), s) for s in run["system"]]
    assert got_system == system


def test_a_sink_killed_mid_run_and_restarted_and_one_started_late(fg_home, tmp_path):
    """One run, two sinks: one killed mid-run and restarted (no duplicate, nothing missing), one started after the
    run ended (the whole run replayed); each trackio history equals the journal."""
    store, out = tmp_path / "store", tmp_path / "out"
    train = fg_train(fg_home, store, out, 200)
    try:
        run_dir = bus_dir(out)
        sink = fg_sink(fg_home, store, run_dir)
        wait_state(out, run_dir.name, training_seq(run_dir, 25) + 1)
        sink.kill()
        sink.wait(timeout=120)
        code, err = finish(fg_sink(fg_home, store, run_dir), timeout=300)
        assert code == 0, err
        assert train.wait(timeout=180) == 0
    finally:
        train.kill()
        train.wait(timeout=120)
    late = fg_sink(fg_home, store, run_dir, "--trackio-project", "fg-e2e-late",
                   "--trackio-state", "{output_dir}/trackio-late/{run}.json")
    code, err = finish(late)
    assert code == 0, err
    journal = run_dir / "journal.rank0.jsonl"
    for project in (PROJECT, "fg-e2e-late"):
        [run] = read_store(store, project)
        assert run["name"] == "out"  # the run's name: args.run_name, else the output directory's
        assert_equals_journal(run, journal)
        config = run["config"]
        assert config["fg_bus/status"] == "completed" and config["max_steps"] == 200 and config["n_layer"] == 1
        assert config["project"] == "huggingface" and "summary/train_loss" in config
        assert [a["title"] for a in run["alerts"]] == ["run completed"]


def test_a_sigkilled_trainer_ends_the_trackio_run_dead(fg_home, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    # The run holds at step 30 (until it is killed): the journal the sink has to catch up on stays short
    # however far behind a loaded machine leaves the sink.
    train = fg_train(fg_home, store, out, 100, "--var", "hold_step=30", "--var", f"release={tmp_path / 'never'}",
                     config=HOLD_AT_STEP)
    try:
        run_dir = bus_dir(out)
        sink = fg_sink(fg_home, store, run_dir, "--dead-after", "1")
        wait_state(out, run_dir.name, training_seq(run_dir, 10) + 1)
        train.send_signal(signal.SIGKILL)
        train.wait(timeout=120)
        code, err = finish(sink)
        assert code == 3, err
    finally:
        train.kill()
        train.wait(timeout=120)
    runs = read_store(store)
    assert len(runs) == 1, (runs, err, (out / "trackio" / f"{run_dir.name}.json").read_text())
    [run] = runs
    assert run["config"]["fg_bus/status"] == "dead"
    [end] = [a for a in run["alerts"] if a["title"] == "run dead"]
    assert end["level"] == "error"
    assert_equals_journal(run, run_dir / "journal.rank0.jsonl")


def test_fg_train_sinks_trackio_starts_the_sink_and_the_tracker_holds_the_run(fg_home, tmp_path):
    """`fg-train --sinks trackio`, configured by the environment as trackio is (TRACKIO_PROJECT, TRACKIO_DIR):
    the sink process fg-train starts replays the run, and the store equals the journal when fg-train ends; the
    closing lines name the store."""
    store, out = tmp_path / "store", tmp_path / "out"
    proc = subprocess.run([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(out),
                           "--max-steps", "30", "--sinks", "trackio", "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env={**env(fg_home, store), "TRACKIO_PROJECT": PROJECT})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = read_store(store)
    assert_equals_journal(run, bus_dir(out) / "journal.rank0.jsonl")
    # the closing lines say where the tracker holds the run, beside the journal
    assert "trackio:" in proc.stdout and f"store {store}, project {PROJECT}" in proc.stdout, proc.stdout
