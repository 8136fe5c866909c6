"""`fg-sink mlflow` as a user runs it, beside a real `fg-train`, into a real sqlite MLflow store read back with
MlflowClient: started after the run ended it replays it whole (history = the journal), started again it adds
nothing; SIGKILLed mid-run and started again it continues the same MLflow run with no point twice; a SIGKILLed
trainer ends the MLflow run FAILED."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from fg_bus import records  # noqa: E402

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")


def env(fg_home: Path) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}


def fg_train(fg_home: Path, out: Path, log: Path, max_steps: int) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", str(max_steps)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=env(fg_home))


def fg_sink(fg_home: Path, out: Path, db: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), "mlflow", "--run", str(out), "--nice", "0",
                             "--mlflow-tracking-uri", f"sqlite:///{db}", "--mlflow-experiment", "e2e",
                             "--mlflow-artifact-location", str(db.parent / "artifacts"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(fg_home))


def journal(out: Path) -> list[dict]:
    (path,) = (out / "fg-bus").glob("*/journal.rank0.jsonl")
    recs = []
    for line in path.read_bytes().splitlines():
        try:
            recs.append(records.decode(line))
        except records.RecordError:  # the line being written (or cut by the SIGKILL): not in the stream
            continue
    return recs


def point(key: str, step: int, ms: int, value: float) -> tuple:
    if math.isnan(value):
        value = "nan"
    elif math.isinf(value):
        value = math.copysign(sys.float_info.max, value)
    return key, int(step), int(ms), value


def expected(recs: list[dict]) -> dict[str, set]:
    from sinks.mlflow_sink import metric_name, timestamp_ms

    points: dict[str, set] = {}
    for r in recs:
        if r["event"] in ("on_log", "system"):
            for k, v in (r.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    key = ("system/" if r["event"] == "system" else "") + metric_name(k)
                    points.setdefault(key, set()).add(point(key, r["global_step"], timestamp_ms(r), float(v)))
    return points


def the_run(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    got = {key: [point(m.key, m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key)]
           for key in run.data.metrics}
    return run, got


def assert_equals_journal(got: dict[str, list], recs: list[dict]) -> None:
    want = expected(recs)
    assert set(got) == set(want)
    for key, points in got.items():
        assert len(points) == len(set(points)), f"{key}: a point twice"
        assert set(points) == want[key], key


@pytest.mark.timeout(900)  # fg-train, then two fg-sink processes each importing mlflow: minutes when loaded
def test_started_after_the_run_replays_it_whole_and_again_adds_nothing(tmp_path, fg_home):
    out = tmp_path / "out"
    train = fg_train(fg_home, out, tmp_path / "train.log", max_steps=60)
    assert train.wait(300) == 0, (tmp_path / "train.log").read_text()
    db = tmp_path / "mlflow.db"
    sink = fg_sink(fg_home, out, db)
    _, err = sink.communicate(timeout=300)
    assert sink.returncode == 0, err
    recs = journal(out)
    run, got = the_run(db)
    assert run.info.status == "FINISHED"
    assert_equals_journal(got, recs)
    assert [p[1] for p in got["loss"]] == list(range(5, 61, 5))  # transformers' names and steps: loss at each log
    assert "eval_loss" in got and "train_runtime" in got
    meta = next(r["meta"] for r in recs if r["event"] == "on_train_begin")
    want = {k: str(v) for k, v in {**meta["model"]["config"], **meta["args"]}.items() if len(str(v)) <= 6000}
    assert run.data.params == want
    assert run.info.run_name == meta["name"]
    assert run.info.start_time == min(int(records_ms(r)) for r in recs)
    again = fg_sink(fg_home, out, db)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    run2, got2 = the_run(db)
    assert run2.info.run_id == run.info.run_id and got2 == got


def records_ms(record: dict) -> int:
    from sinks.mlflow_sink import timestamp_ms

    return timestamp_ms(record)


def state_seq(out: Path) -> int:
    """How far the sink's state file says MLflow holds rank 0 (0 until it exists)."""
    try:
        (path,) = (out / "mlflow").glob("*.json")
        return json.loads(path.read_text())["ranks"]["0"]["next_seq"]
    except (ValueError, OSError, KeyError):  # not written yet, or being replaced
        return 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkilled_mid_run_and_started_again_continues_the_run_with_no_point_twice(tmp_path, fg_home):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    train = fg_train(fg_home, out, tmp_path / "train.log", max_steps=3000)  # long enough to outlast mlflow's import
    try:
        deadline = time.monotonic() + 300
        while not list((out / "fg-bus").glob("*/journal.rank0.jsonl")):
            assert time.monotonic() < deadline and train.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        sink = fg_sink(fg_home, out, db)
        while state_seq(out) < 100:  # MLflow holds the first logs: the kill lands in the middle of the run
            assert time.monotonic() < deadline and sink.poll() is None, sink.stderr.read() if sink.poll() else ""
            time.sleep(0.1)
        sink.send_signal(signal.SIGKILL)
        sink.wait(30)
        assert train.poll() is None or train.returncode == 0  # the trainer never waits on the sink
        again = fg_sink(fg_home, out, db)
        _, err = again.communicate(timeout=300)
        assert again.returncode == 0, err
        assert train.wait(300) == 0, (tmp_path / "train.log").read_text()
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(30)
    run, got = the_run(db)  # one MLflow run: the restarted sink continued it
    assert run.info.status == "FINISHED"
    assert_equals_journal(got, journal(out))  # every point once, none missing
    assert [p[1] for p in got["loss"]] == list(range(5, 3001, 5))


@pytest.mark.timeout(900)
def test_sigkilled_trainer_ends_the_mlflow_run_failed(tmp_path, fg_home):
    out = tmp_path / "out"
    train = fg_train(fg_home, out, tmp_path / "train.log", max_steps=1_000_000)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "fg-bus").glob("*/journal.rank0.jsonl")):
            assert time.monotonic() < deadline and train.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        db = tmp_path / "mlflow.db"
        sink = fg_sink(fg_home, out, db, "--dead-after", "2")
        while sum(1 for r in journal(out) if r["event"] == "on_log") < 8:
            assert time.monotonic() < deadline + 120 and train.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        train.send_signal(signal.SIGKILL)
        train.wait(30)
        _, err = sink.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(30)
    assert sink.returncode == 3, err  # the trainer died
    run, got = the_run(db)
    assert run.info.status == "FAILED"
    assert run.data.tags["fg.end_status"] == "dead"
    assert_equals_journal(got, journal(out))
