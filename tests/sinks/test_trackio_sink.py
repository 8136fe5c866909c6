"""TrackioSink fed records directly, into a real trackio store, read back with trackio's own API
(`trackio.Api`, `SQLiteStorage.get_logs` / `get_system_logs` / `get_alerts`)."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import pytest

# trackio reads TRACKIO_DIR once, when it is imported: a private store for this test process, before that.
if "trackio.utils" not in sys.modules:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="fg-trackio-store-")

import trackio  # noqa: E402
from trackio.sqlite_storage import SQLiteStorage  # noqa: E402

from fg_bus.registry import RunInfo  # noqa: E402
from sinks import cli  # noqa: E402
from sinks._output import OutputLocked  # noqa: E402
from sinks.trackio_sink import TrackioSink, trackio_run_id  # noqa: E402

RUN_ID = "tkrun-20260101-000000-abcd"
META = {"name": "tiny-demo", "args": {"learning_rate": 0.001, "max_steps": 4, "project": "huggingface",
                                      "hub_token": "hf_secret", "run_name": None},
        "model": {"factory": "tests:Tiny", "config": {"n_layer": 1, "learning_rate": "model's"}},
        "num_parameters": 5232}


@pytest.fixture(autouse=True)
def private_store():
    store = Path(trackio.utils.TRACKIO_DIR)
    assert "fg-trackio-store-" in str(store) or os.environ.get("TRACKIO_DIR") == str(store), \
        f"trackio was loaded before this test module, for {store}: not a test store"
    return store


@pytest.fixture
def project(tmp_path) -> str:
    return "fg-" + tmp_path.name.replace("_", "-")[-40:]


def make_info(tmp_path: Path, run_id: str = RUN_ID) -> RunInfo:
    bus_dir = tmp_path / "out" / "fg-bus" / run_id
    bus_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(bus_dir, {"run_id": run_id})


def rec(seq: int, event: str, step: int, metrics: dict | None = None, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": f"2026-01-01T00:00:{seq:02d}.250000+00:00",
              "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics or {}}
    record.update(extra)
    return record


def a_run() -> list[dict]:
    return [
        rec(0, "on_init_end", 0),
        rec(1, "on_train_begin", 0, meta=META),
        rec(2, "on_step_end", 1, {"loss": 2.0, "grad_norm": 1.5}),
        rec(3, "system", 1, {"cpu_percent": 55.0, "rss_gb": 1.25}),
        rec(4, "on_step_end", 2, {"loss": 1.8, "grad_norm": 1.2}),
        rec(5, "on_log", 2, {"loss": 1.9, "learning_rate": 0.001, "grad_norm": 1.35, "epoch": 0.5}),
        rec(6, "alert", 2, kind="divergence", message="loss above 3x its EMA", action="warn"),
        rec(7, "on_step_end", 3, {"loss": math.nan, "grad_norm": 3.0}),
        rec(8, "control", 3, cmd="save", id="c1", source="fg-bus ctl", applied=True),
        rec(9, "on_step_end", 4, {"loss": 1.5, "grad_norm": 0.9}),
        rec(10, "on_log", 4, {"loss": math.nan, "learning_rate": 0.0005, "grad_norm": 2.0, "epoch": 1.0}),
        rec(11, "on_log", 4, {"eval_loss": 1.25, "eval_runtime": 0.5, "epoch": 1.0}),
        rec(12, "on_evaluate", 4, {"eval_loss": 1.25, "eval_runtime": 0.5, "epoch": 1.0}),
        rec(13, "textgen", 4, prompt="Once upon", text=" a time there was a sink", prompt_index=0),
        rec(14, "warning", 4, kind="stalled", message="no progress for 30 s"),
        rec(15, "on_save", 4, checkpoint="out/checkpoint-4"),
        rec(16, "system", 4, {"cpu_percent": 60.0, "rss_gb": 1.5}),
        rec(17, "on_log", 4, {"train_loss": 1.7, "train_runtime": 12.5, "train_samples_per_second": 3.0,
                              "train_steps_per_second": 1.0, "total_flos": 2468.0, "epoch": 1.0}),
        rec(18, "on_train_end", 4),
        rec(19, "end", 4, status="completed", reason={"text": "reached max_steps (4)", "step": 4}),
    ]


def expected_points(recs: list[dict]) -> list[tuple[int, str, dict]]:
    """(step, timestamp, metrics) of each row the sink should write, in order: transformers' names."""
    out = []
    for r in recs:
        m, step, ts = r["metrics"], r["global_step"], datetime.fromisoformat(r["timestamp"]).isoformat()
        if r["event"] == "on_log":
            kept = {k: v for k, v in m.items() if k not in ("train_loss", "train_runtime", "train_samples_per_second",
                                                             "train_steps_per_second", "total_flos")}
            if kept:
                named = {("eval/" + k[5:] if k.startswith("eval_") else "train/" + k): v for k, v in kept.items()}
                out.append((step, ts, {**named, "train/global_step": step}))
        elif r["event"] == "on_step_end":
            out.append((step, ts, {f"train/step_{k}": v for k, v in m.items()}))
        elif r["event"] == "textgen":
            out.append((step, ts, {"textgen/sample_0": {"_type": "trackio.table", "_value": [
                {"step": step, "prompt": r["prompt"], "text": r["text"]}]}}))
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def history(project: str, name: str = "tiny-demo") -> list[tuple[int, str, dict]]:
    run = next(r for r in trackio.Api().runs(project) if r.name == name)
    logs = SQLiteStorage.get_logs(project, run=name, run_id=run.id)
    return [(row.pop("step"), row.pop("timestamp"), row) for row in logs]


def assert_history(project: str, recs: list[dict]) -> None:
    got, want = history(project), expected_points(recs)
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[1] == w[1] and same(g[2], w[2]), (g, w)


def feed(sink: TrackioSink, recs: list[dict]) -> None:
    for r in recs:
        sink.handle(r)


def test_a_run_as_report_to_trackio_would_log_it(tmp_path, project):
    recs = a_run()
    sink = TrackioSink(project=project)
    assert sink.open_run(make_info(tmp_path)) is None
    feed(sink, recs)
    sink.end_run("completed", recs[-1]["reason"])
    sink.close()

    runs = list(trackio.Api().runs(project))
    assert [(r.name, r.id) for r in runs] == [("tiny-demo", trackio_run_id(RUN_ID, 0))]
    assert_history(project, recs)
    config = runs[0].config
    # transformers: {**model config, **args}, model/num_parameters; no credential
    assert config["learning_rate"] == 0.001 and config["n_layer"] == 1 and config["max_steps"] == 4
    assert config["model/num_parameters"] == 5232 and config["hub_token"] == "<redacted>"
    assert config["fg_bus/run"] == RUN_ID and config["fg_bus/status"] == "completed"
    assert config["fg_bus/end_reason"].startswith("completed: reached max_steps (4)")
    assert config["summary/train_loss"] == 1.7 and config["summary/total_flos"] == 2468.0
    assert config["_Created"] == "2026-01-01T00:00:01.250000+00:00"
    # system metrics: trackio's System tab, at the sample's time
    system = SQLiteStorage.get_system_logs(project, run="tiny-demo", run_id=runs[0].id)
    assert system == [{"system/cpu_percent": 55.0, "system/rss_gb": 1.25, "timestamp": "2026-01-01T00:00:03.250000+00:00"},
                      {"system/cpu_percent": 60.0, "system/rss_gb": 1.5, "timestamp": "2026-01-01T00:00:16.250000+00:00"}]
    alerts = sorted(runs[0].alerts(), key=lambda a: a["timestamp"])
    assert [(a["title"], a["level"], a["step"], a["timestamp"][17:19]) for a in alerts] == [
        ("alert: divergence", "warn", 2, "06"), ("control: save applied", "info", 3, "08"),
        ("warning: stalled", "warn", 4, "14"), ("run completed", "info", 4, "19")]
    assert "loss above 3x its EMA" in alerts[0]["text"]
    assert sink.storage is SQLiteStorage


def test_restarted_sink_continues_the_same_run_without_duplicates(tmp_path, project):
    recs = a_run()
    info = make_info(tmp_path)
    sink = TrackioSink(project=project)
    sink.open_run(info)
    feed(sink, recs[:8])
    sink._try_flush()  # written through seq 7 and the state says 8
    feed(sink, recs[8:13])  # held, never written: the sink is killed
    sink.runs = {}
    sink._lock.release()  # the kernel drops a killed sink's lock

    again = TrackioSink(project=project)
    assert again.open_run(info) == {0: 8}
    feed(again, recs[8:])
    again.end_run("completed")
    again.close()
    assert_history(project, recs)

    # a state file behind the store (killed between trackio's write and the state's): a replay from an older
    # seq stores nothing twice
    third = TrackioSink(project=project)
    third.open_run(info)
    third.runs[0].next_seq = 3
    third._write_state()
    third.close()
    fourth = TrackioSink(project=project)
    assert fourth.open_run(info) == {0: 3}
    feed(fourth, recs[3:])
    fourth.end_run("completed")
    fourth.close()
    assert_history(project, recs)
    assert len(trackio.Api().runs(project)) == 1
    assert len(trackio.Api().runs(project)[0].alerts()) == 4


def test_dead_trainer_marks_the_run_failed(tmp_path, project):
    recs = a_run()[:11]
    sink = TrackioSink(project=project)
    sink.open_run(make_info(tmp_path))
    feed(sink, recs)
    sink.end_run("dead", {"text": "no heartbeat for 5 s"})
    sink.close()
    run = trackio.Api().runs(project)[0]
    assert run.config["fg_bus/status"] == "dead"
    ends = [a for a in run.alerts() if a["title"] == "run dead"]
    assert len(ends) == 1 and ends[0]["level"] == "error" and ends[0]["step"] == 4
    assert ends[0]["timestamp"] == recs[-1]["timestamp"].replace("+00:00", "+00:00")
    assert_history(project, recs)


def test_sink_stopped_by_a_signal_does_not_end_the_run(tmp_path, project):
    recs = a_run()[:6]
    sink = TrackioSink(project=project)
    sink.open_run(make_info(tmp_path))
    feed(sink, recs)
    sink.end_run("stopped by SIGTERM")
    sink.close()
    run = trackio.Api().runs(project)[0]
    assert run.config["fg_bus/status"] == "running" and run.alerts() == []


def test_store_unwritable_then_restored_catches_up(tmp_path, project, capsys):
    recs = a_run()
    sink = TrackioSink(project=project)
    sink.open_run(make_info(tmp_path))
    feed(sink, recs[:6])
    sink._try_flush()
    db = SQLiteStorage.get_project_db_path(project)
    moved = db.with_name(db.name + ".away")
    db.rename(moved)
    db.mkdir()  # a directory where the database was: every write fails at once
    feed(sink, recs[6:12])
    sink._try_flush()
    sink._try_flush()
    err = capsys.readouterr().err
    assert err.count("cannot write the trackio store") == 1, err
    db.rmdir()
    moved.rename(db)
    feed(sink, recs[12:])
    sink.end_run("completed")
    sink.close()
    assert "writable again" in capsys.readouterr().err
    assert_history(project, recs)


def test_project_from_the_run_args_and_name_option(tmp_path, monkeypatch):
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    recs = a_run()
    project = "hf-" + tmp_path.name[-30:].replace("_", "-")
    recs[1] = rec(1, "on_train_begin", 0, meta={**META, "args": {**META["args"], "project": project}})
    sink = TrackioSink(name="my-name")
    sink.open_run(make_info(tmp_path))
    feed(sink, recs)
    sink.end_run("completed")
    sink.close()
    assert [r.name for r in trackio.Api().runs(project)] == ["my-name"]


def test_cli_options_and_a_missing_extra(monkeypatch):
    opts = cli.parser().parse_args(["trackio", "--trackio-project", "p", "--trackio-name", "n"])
    sink = cli.build_sink(opts)
    assert isinstance(sink, TrackioSink) and sink.project_option == "p" and sink.name_option == "n"
    monkeypatch.setitem(sys.modules, "trackio.sqlite_storage", None)
    with pytest.raises(ValueError, match=r"pip install 'fg-bus\[trackio\]'"):
        cli.build_sink(opts)


def test_ranks_all_as_runs_of_one_group_and_one_writer_per_state(tmp_path, project):
    info = RunInfo(make_info(tmp_path).bus_dir, {"run_id": RUN_ID, "name": "tiny-demo", "world_size": 2})
    threads = threading.active_count()
    sink = TrackioSink(project=project)
    sink.ranks = "all"
    assert sink.open_run(info) is None
    with pytest.raises(OutputLocked):
        TrackioSink(project=project).open_run(info)
    recs = a_run()
    for r in recs:
        sink.handle(r)
        sink.handle({**r, "rank": 1})
    sink.end_run("completed")
    sink.close()
    assert threading.active_count() == threads  # no thread of trackio's, no server
    runs = {r.name: r for r in trackio.Api().runs(project)}
    assert sorted(runs) == ["tiny-demo", "tiny-demo-rank1"]
    assert runs["tiny-demo-rank1"].id == trackio_run_id(RUN_ID, 1)
    assert {r.config["_Group"] for r in runs.values()} == {"tiny-demo"}
    assert_history(project, recs)
    assert len(SQLiteStorage.get_logs(project, run="tiny-demo-rank1", run_id=trackio_run_id(RUN_ID, 1))) == \
        len(expected_points(recs))
