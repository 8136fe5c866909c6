"""MlflowSink fed records directly into a real MLflow store (sqlite:///, and an `mlflow server` started here),
read back with MLflow's own MlflowClient: params, metric histories (step, value, timestamp), tags, text
artifacts and the run's status equal what the records hold; restarts send no point twice."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from argparse import Namespace
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from fg_bus.registry import RunInfo  # noqa: E402
from sinks import mlflow_sink  # noqa: E402
from sinks.mlflow_sink import MlflowSink, point_id, public_uri  # noqa: E402

RUN_ID = "mlrun-20260101-000000-abcd"
LONG = "x" * 7000  # beyond MLflow's param value limit: dropped, as MLflowCallback drops it
META = {"name": "tiny-demo", "host": "gpu1", "world_size": 1,
        "args": {"learning_rate": 0.001, "max_steps": 40, "run_name": "demo-run", "output_dir": "/tmp/o",
                 "include_for_metrics": [], "long_value": LONG, "n_layer": 2},
        "model": {"factory": "trainer.chargpt:CharGPT", "config": {"n_layer": 1, "n_embd": 16, "vocab_size": 104}}}


def make_info(tmp_path: Path, world_size: int = 1) -> RunInfo:
    bus_dir = tmp_path / "out" / "fg-bus" / RUN_ID
    bus_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(bus_dir, {"run_id": RUN_ID, "name": "tiny-demo", "world_size": world_size})


def rec(seq: int, event: str, step: int, metrics: dict | None = None, rank: int = 0, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": rank, "seq": seq,
              "timestamp": f"2026-01-01T00:{seq // 60:02d}:{seq % 60:02d}.{seq * 7 % 1000:03d}+00:00",
              "event": event, "global_step": step, "epoch": step / 40, "metrics": metrics or {}}
    record.update(extra)
    return record


def run_records(end: str | None = "completed", steps: int = 40, rank: int = 0) -> list[dict]:
    """A run: begin (meta), per step a step_end, every 5 an on_log, system records, an eval, a sample, a
    warning, a control and an alert, then the end."""
    out = [rec(0, "on_init_end", 0, rank=rank), rec(1, "on_train_begin", 0, meta=META, rank=rank)]

    def add(event, step, metrics=None, **extra):
        out.append(rec(len(out), event, step, metrics, rank=rank, **extra))

    for step in range(1, steps + 1):
        add("on_step_end", step, {"loss": 1.0 / step})
        if step % 5 == 0:
            loss = math.nan if step == 15 else 2.0 / step
            add("on_log", step, {"loss": loss, "grad_norm": 0.5 + step, "learning_rate": 1e-3 * (1 - step / steps),
                                 "epoch": step / 40, "flag": True, "note": "text"})
        if step % 10 == 0:
            add("system", step, {"cpu_percent": 10.0 + step, "rss_mb": 100.0 + step})
        if step == 20:
            add("on_log", step, {"eval_loss": 0.25, "eval_runtime": 0.01, "epoch": 0.5})
            add("on_evaluate", step, {"eval_loss": 0.25, "eval_runtime": 0.01, "epoch": 0.5})
            add("textgen", step, prompt="The ", text="quick brown fox", prompt_index=0)
            add("warning", step, kind="stalled", message="no step for 30 s")
            add("control", step, cmd="save", accepted=True, source="fg-bus ctl")
            add("alert", step, kind="divergence", message="loss above 3x its EMA")
    add("on_log", steps, {"train_runtime": 1.5, "train_loss": 0.1, "total_flos": 0.0, "epoch": 1.0})
    add("on_train_end", steps)
    if end is not None:
        add("end", steps, status=end, reason={"text": f"the run {end}"})
    return out


def expected_points(recs: list[dict]) -> dict[str, set]:
    """What the journal says MLflow must hold: on_log numbers under their names, system ones under system/."""
    points: dict[str, set] = {}
    for r in recs:
        if r["event"] not in ("on_log", "system"):
            continue
        ms = mlflow_sink.timestamp_ms(r)
        for k, v in r["metrics"].items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            key = ("system/" if r["event"] == "system" else "") + k
            points.setdefault(key, set()).add(point_id(key, r["global_step"], ms, float(v)))
    return points


def history(client: MlflowClient, run_id: str) -> dict[str, list]:
    run = client.get_run(run_id)
    return {key: [point_id(m.key, m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]
            for key in run.data.metrics}


def assert_history_equals(client: MlflowClient, run_id: str, recs: list[dict]) -> None:
    got = history(client, run_id)
    want = expected_points(recs)
    assert set(got) == set(want)
    for key, points in got.items():
        assert len(points) == len(set(points)), f"{key}: a point twice"
        assert set(points) == want[key], key


def migrated_db(tmp_path_factory) -> Path:
    """One migrated MLflow sqlite store for the whole session, made by the first test process that asks (its
    schema migrations take seconds, longer on a loaded machine); each test copies it."""
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # the same for every xdist worker of this session
    path = shared / "mlflow-template.db"
    with open(shared / "mlflow-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the first to finish
        if not path.exists():
            tmp = shared / f"mlflow-template.{os.getpid()}.db"
            MlflowClient(f"sqlite:///{tmp}").search_experiments()
            os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    return migrated_db(tmp_path_factory)


@pytest.fixture
def store(tmp_path, template_db) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def new_sink(tmp_path: Path, uri: str, **kwargs) -> MlflowSink:
    kwargs.setdefault("experiment", "fg-tests")
    kwargs.setdefault("artifact_location", str(tmp_path / "artifacts"))
    return MlflowSink(tracking_uri=uri, **kwargs)


def feed(sink: MlflowSink, recs: list[dict], end: str | None = None, reason: dict | None = None) -> None:
    for r in recs:
        sink.handle(r)
    if end is not None:
        sink.end_run(end, reason)


def the_run(client: MlflowClient, experiment: str = "fg-tests"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_history_params_tags_and_status_equal_the_records(tmp_path, store):
    recs = run_records()
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, store)
    assert sink.open_run(info) is None
    feed(sink, recs, "completed", recs[-1]["reason"])
    sink.close()
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo-run"
    assert run.info.start_time == mlflow_sink.timestamp_ms(recs[0])
    assert run.info.end_time == mlflow_sink.timestamp_ms(recs[-1])
    assert_history_equals(client, run.info.run_id, recs)
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert math.isnan([m for m in loss if m.step == 15][0].value)
    # params: model config, then args over it (n_layer from args), values as strings, the long one dropped
    want = {**{k: str(v) for k, v in META["model"]["config"].items()},
            **{k: str(v) for k, v in META["args"].items() if k != "long_value"}}
    assert run.data.params == want
    tags = run.data.tags
    assert tags["fg.run_id"] == RUN_ID and tags["fg.rank"] == "0" and tags["fg.host"] == "gpu1"
    assert tags["fg.end_status"] == "completed"
    assert "the run completed" in tags["mlflow.note.content"]
    by_event = {k.split(".")[1]: v for k, v in tags.items() if k.split(".")[1:2] in (["warning"], ["control"],
                                                                                      ["alert"])}
    assert "stalled: no step for 30 s" in by_event["warning"]
    assert "save accepted" in by_event["control"]
    assert "divergence: loss above 3x its EMA" in by_event["alert"]
    text = client.download_artifacts(run.info.run_id, "textgen/step_0000020_sample_0.txt", str(tmp_path / "dl"))
    assert Path(text).read_text() == "The quick brown fox"


@pytest.mark.parametrize("status, own_end, mlflow_status", [
    ("stopped", True, "FINISHED"), ("interrupted", True, "KILLED"), ("failed", True, "FAILED"),
    ("dead", False, "FAILED"), ("stopped by SIGTERM", False, "RUNNING")])
def test_end_status(tmp_path, store, status, own_end, mlflow_status):
    recs = run_records(end=status if own_end else None, steps=10)
    sink = new_sink(tmp_path, store)
    sink.open_run(make_info(tmp_path))
    feed(sink, recs, status, {"text": "why"})
    sink.close()
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == mlflow_status
    assert_history_equals(client, run.info.run_id, recs)  # a stopped sink still sent what it handled
    if mlflow_status != "RUNNING":
        assert run.data.tags["fg.end_status"] == status


class Killed(BaseException):
    """The sink process dying: nothing of it runs after this."""


def test_killed_after_mlflow_took_a_batch_restarts_with_no_point_twice(tmp_path, store, monkeypatch):
    """Killed between MLflow taking a batch and the state file moving: the restarted sink continues the same
    MLflow run, reads back what is there, and sends each point once (checked on the wire, not trusting the
    SQL store's own dedup)."""
    sent: list[tuple] = []
    real = MlflowClient.log_batch
    kill_at = {"batch": 3}

    def spy(self, run_id, metrics=(), params=(), tags=(), **kw):
        result = real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)
        sent.extend(point_id(m.key, m.step, m.timestamp, m.value) for m in metrics)
        if metrics:
            kill_at["batch"] -= 1
            if kill_at["batch"] == 0:
                raise Killed()
        return result

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    recs = run_records()
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, store, flush_secs=0.0)  # a batch per record: many chances to die mid-way
    sink.open_run(info)
    with pytest.raises(Killed):
        feed(sink, recs)
    died_at = sink.runs[0].pending_to
    sink.close()
    again = new_sink(tmp_path, store, flush_secs=0.0)
    position = again.open_run(info)
    assert position[0] < died_at <= again.runs[0].sent_to  # the batch MLflow took is behind the position
    feed(again, [r for r in recs if r["seq"] >= position[0]], "completed")
    again.close()
    assert len(sent) == len(set(sent)), "a point was sent twice"
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == "FINISHED" and run.info.run_id == sink.runs[0].run_id
    assert_history_equals(client, run.info.run_id, recs)


def test_restart_after_a_kill_between_batches_and_after_the_end(tmp_path, store):
    recs = run_records()
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, store)
    sink.open_run(info)
    feed(sink, recs[:50])  # the batch in hand dies with it (not sent): sent again from the position
    position = sink.runs[0].next_seq
    sink.close()
    again = new_sink(tmp_path, store)
    assert again.open_run(info) == {0: position}
    feed(again, recs[position:], "completed")
    again.close()
    late = new_sink(tmp_path, store)  # the run is over and replayed whole: a third start adds nothing
    assert late.open_run(info) == {0: len(recs)}
    late.end_run("completed")
    late.close()
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert_history_equals(client, run.info.run_id, recs)


def test_a_run_made_before_the_state_file_is_found_by_its_tags(tmp_path, store, monkeypatch):
    recs = run_records(steps=10)
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, store)
    sink.open_run(info)
    feed(sink, recs[:8])
    sink.close()
    for path in (tmp_path / "out" / "mlflow").glob("*.json"):
        path.unlink()  # as if killed between create_run and the first state write (or the state lost)
    again = new_sink(tmp_path, store)
    assert again.open_run(info) is None
    feed(again, recs, "completed")
    again.close()
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.run_id == sink.runs[0].run_id
    assert_history_equals(client, run.info.run_id, recs)


def test_ranks_all_is_one_mlflow_run_per_rank(tmp_path, store):
    info = make_info(tmp_path, world_size=2)
    sink = new_sink(tmp_path, store, ranks="all")
    sink.open_run(info)
    recs = {rank: run_records(steps=10, rank=rank) for rank in (0, 1)}
    for a, b in zip(recs[0], recs[1]):
        sink.handle(a)
        sink.handle(b)
    sink.end_run("completed")
    sink.close()
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("fg-tests").experiment_id])
    by_rank = {r.data.tags["fg.rank"]: r for r in runs}
    assert sorted(by_rank) == ["0", "1"]
    assert by_rank["1"].info.run_name == "demo-run-rank1"
    for rank in (0, 1):
        assert_history_equals(client, by_rank[str(rank)].info.run_id, recs[rank])


def test_state_file_has_no_credentials_and_the_extra_is_named(tmp_path, monkeypatch):
    assert public_uri("https://alice:s3cret@mlflow.example.com:5000/api?token=abc") == \
        "https://mlflow.example.com:5000/api"
    assert public_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    opts = Namespace(mlflow_tracking_uri=None, mlflow_experiment=None, mlflow_artifact_location=None,
                     mlflow_state_dir="x", group_readable=False)
    with pytest.raises(ValueError, match=r"pip install 'fg-bus\[mlflow\]'"):
        mlflow_sink.build(opts)


def test_flattened_and_limited_params(monkeypatch):
    meta = {"args": {"a": 1, "opt": {"b": 2, "c": {"d": 3}}}, "model": {"config": {"e": 4}}}
    monkeypatch.setenv("MLFLOW_FLATTEN_PARAMS", "1")
    params, dropped = mlflow_sink.run_params(meta, 6000)
    assert params == {"e": "4", "a": "1", "opt/b": "2", "opt/c/d": "3"} and dropped == []
    monkeypatch.setenv("MLFLOW_MAX_LOG_PARAMS", "2")
    assert list(mlflow_sink.run_params(meta, 6000)[0]) == ["e", "a"]


# -- a real `mlflow server`, stopped mid-run and started again -------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp_path: Path, db: Path, port: int):
        self.args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                     "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(tmp_path / "server.log", "ab")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> None:  # imports mlflow and starts uvicorn: a minute when loaded
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path, template_db):
    db = tmp_path / "server.db"
    shutil.copy(template_db, db)
    srv = Server(tmp_path, db, free_port())
    srv.start()
    yield srv
    srv.stop()
    srv.log.close()


def feed_into_an_outage(sink, recs: list[dict], outage: str) -> threading.Thread:
    """Feed `recs` (then the end) in a thread, returned once the sink has noticed `outage` (it is retrying)."""
    rest = threading.Thread(target=feed, args=(sink, recs, "completed"), daemon=True)
    rest.start()
    deadline = time.monotonic() + 120
    while sink.outages == 0:
        assert time.monotonic() < deadline and rest.is_alive(), f"the sink never noticed {outage}"
        time.sleep(0.05)
    return rest


@pytest.mark.slow  # two starts of an mlflow server: tens of seconds, minutes on a loaded machine
@pytest.mark.timeout(900)
def test_server_stopped_mid_run_then_back(tmp_path, server, capsys):
    recs = run_records()
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, server.url, artifact_location=None, backoff=(0.2, 0.5, 1.0))
    sink.open_run(info)
    feed(sink, recs[:40])
    server.stop()
    rest = feed_into_an_outage(sink, recs[40:], "the server was down")  # it retries with backoff meanwhile
    server.start()
    rest.join(180)
    assert not rest.is_alive(), "the sink did not catch up after the server came back"
    sink.close()
    err = capsys.readouterr().err
    assert err.count("is not answering") == 1 and err.count("is back after") == 1, err
    assert sink.outages == 1
    client = MlflowClient(server.url)
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert_history_equals(client, run.info.run_id, recs)
    text = client.download_artifacts(run.info.run_id, "textgen/step_0000020_sample_0.txt", str(tmp_path / "dl"))
    assert Path(text).read_text() == "The quick brown fox"


def test_store_unwritable_mid_run_then_back(tmp_path, store, capsys):
    """Another connection holds the sqlite store's write lock (BEGIN IMMEDIATE): every write fails as
    "database is locked"; the sink says so once, retries with backoff, and catches up when it is released."""
    import sqlite3

    recs = run_records()
    info = make_info(tmp_path)
    sink = new_sink(tmp_path, store, backoff=(0.1, 0.2, 0.5))
    sink.open_run(info)
    feed(sink, recs[:40])
    holder = sqlite3.connect(store[len("sqlite:///"):], timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    rest = feed_into_an_outage(sink, recs[40:], "the store was locked")
    holder.execute("ROLLBACK")
    holder.close()
    rest.join(180)
    assert not rest.is_alive(), "the sink did not catch up after the store came back"
    sink.close()
    err = capsys.readouterr().err
    assert err.count("is not answering") == 1 and err.count("is back after") == 1, err
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert_history_equals(client, run.info.run_id, recs)


def test_a_request_mlflow_refuses_stops_the_sink_not_retried(tmp_path, store):
    """A param MLflow already holds with another value: refused for what it is (INVALID_PARAMETER_VALUE), so
    the sink raises an OSError (the runner stops it, exit 8, with the command that resumes) instead of retrying."""
    recs = run_records(steps=5)
    sink = new_sink(tmp_path, store)
    sink.open_run(make_info(tmp_path))
    sink.handle(recs[0])
    sink._flush(sink.runs[0])
    MlflowClient(store).log_param(sink.runs[0].run_id, "learning_rate", "0.5")
    with pytest.raises(OSError, match="MLflow refused a batch: INVALID_PARAMETER_VALUE"):
        feed(sink, recs[1:])
    assert sink.outages == 0
    sink.close()
