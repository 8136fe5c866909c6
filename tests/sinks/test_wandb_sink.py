"""WandbSink fed records directly, in WANDB_MODE=offline; the run's .wandb files read back (wandb's protobuf
records, `sinks._wandb_file`) and compared with the records."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from fg_bus.registry import RunInfo  # noqa: E402
from sinks import _wandb_file  # noqa: E402
from sinks.base import rewrite_logs  # noqa: E402
from sinks.wandb_sink import WandbSink, wandb_id  # noqa: E402

RUN_ID = "wbrun-20260101-000000-abcd"
META = {"name": "tiny-demo", "host": "gpu1", "world_size": 1, "num_parameters": 1234,
        "args": {"learning_rate": 0.001, "max_steps": 4, "run_name": "trial-1", "output_dir": "out"},
        "model": {"factory": "tests:Tiny", "config": {"n_layer": 1, "learning_rate": 99}}}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))


def make_info(tmp_path: Path) -> RunInfo:
    bus_dir = tmp_path / "out" / "fg-bus" / RUN_ID
    bus_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(bus_dir, {"run_id": RUN_ID})


def rec(seq: int, event: str, step: int, metrics: dict | None = None, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": f"2026-01-01T00:00:{seq:02d}.5+00:00",
              "event": event, "global_step": step, "epoch": step / 4}
    if metrics is not None:
        record["metrics"] = metrics
    record.update(extra)
    return record


def a_run(end: str = "completed") -> list[dict]:
    return [
        rec(0, "on_init_end", 0),
        rec(1, "on_train_begin", 0, meta=META),
        rec(2, "on_step_begin", 0),
        rec(3, "on_step_end", 1, {"loss": 2.0, "grad_norm": 1.5}),
        rec(4, "system", 1, {"host_cpu_percent": 12.5, "rss_mb": 300.0}, gpus=[]),
        rec(5, "on_step_end", 2, {"loss": 1.8, "grad_norm": 1.2}),
        rec(6, "on_log", 2, {"loss": 1.9, "learning_rate": 0.001, "grad_norm": 1.35, "epoch": 0.5}),
        rec(7, "warning", 2, message="stalled: no step for 30 s", kind="stalled"),
        rec(8, "on_step_end", 3, {"loss": math.nan, "grad_norm": 3.0}),
        rec(9, "alert", 3, kind="nan", message="loss is NaN at step 3"),
        rec(10, "on_log", 4, {"eval_loss": 1.25, "eval_runtime": 0.5, "epoch": 1.0}),
        rec(11, "textgen", 4, prompt="Once upon", text=" a time there was a sink", prompt_index=0),
        rec(12, "on_save", 4, checkpoint="out/checkpoint-4"),
        rec(13, "control", 4, cmd="stop", id="c1", source="alice@gpu1", applied=True),
        rec(14, "on_log", 4, {"train_loss": 1.7, "train_runtime": 12.5, "total_flos": 2468.0, "epoch": 1.0}),
        rec(15, "on_train_end", 4),
        rec(16, "end", 4, status=end, reason={"text": end}),
    ]


def expected_rows(recs: list[dict]) -> dict[int, dict]:
    """seq -> the row's keys and values (numbers), as the sink should log them."""
    rows = {}
    for r in recs:
        m, e = r.get("metrics") or {}, r["event"]
        if e == "on_log":
            row = rewrite_logs({k: v for k, v in m.items() if k not in ("train_loss", "train_runtime", "total_flos")})
        elif e == "on_step_end":
            row = {f"train/step_{k}": v for k, v in m.items()}
        elif e == "system":
            row = {f"system/{k}": v for k, v in m.items()}
        elif e in ("warning", "alert", "control", "end"):
            row = {}
        elif e == "textgen":
            row = {"textgen/samples": "table"}
        else:
            continue
        rows[r["seq"]] = {**row, "train/global_step": r["global_step"],
                          "_timestamp": datetime.fromisoformat(r["timestamp"]).timestamp()}
    return rows


def segments(tmp_path: Path, rank: int = 0) -> list[Path]:
    return _wandb_file.segments(tmp_path / "wb" / "wandb", wandb_id(RUN_ID, rank))


def history(tmp_path: Path) -> list[dict]:
    return [row for seg in segments(tmp_path) for row in _wandb_file.history(seg)]


def of_kind(path: Path, kind: str) -> list:
    return [getattr(r, kind) for r in _wandb_file.records(path) if r.WhichOneof("record_type") == kind]


def assert_history(rows: list[dict], recs: list[dict]) -> None:
    expected = expected_rows(recs)
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)), steps  # each point once, in seq order
    assert steps == sorted(expected), (steps, sorted(expected))
    for row in rows:
        want = expected[row["_step"]]
        if "textgen/samples" in want:
            assert row["textgen/samples/_type"] == "table-file" and row["textgen/samples/nrows"] == 1
            continue
        got = {k: v for k, v in row.items() if not k.startswith("_")}
        assert set(got) == {k for k in want if not k.startswith("_")}, (got, want)
        for key, value in got.items():
            assert value == value if not math.isnan(want[key]) else math.isnan(value), (key, value)
            if not math.isnan(want[key]):
                assert value == pytest.approx(want[key]), (key, row)
        assert row["_timestamp"] == pytest.approx(want["_timestamp"])  # the training time, not the replay's


def feed(tmp_path: Path, recs: list[dict], status: str | None = "completed", **kwargs) -> WandbSink:
    sink = WandbSink(**kwargs)
    position = sink.open_run(make_info(tmp_path))
    start = (position or {}).get(0, 0)
    for r in recs:
        if r["seq"] >= start:
            sink.handle(r)
    if status is not None:
        sink.end_run(status, {"text": status})
    sink.close()
    return sink


def test_a_run_read_back_offline(tmp_path):
    recs = a_run()
    feed(tmp_path, recs)
    (seg,) = segments(tmp_path)
    assert_history(_wandb_file.history(seg), recs)
    (run,) = of_kind(seg, "run")
    assert run.run_id == wandb_id(RUN_ID) and run.display_name == "trial-1" and run.project == "huggingface"
    config = _wandb_file.config(seg)
    # transformers: {**model config, **args}: args win; plus model/num_parameters
    assert config["learning_rate"] == 0.001 and config["n_layer"] == 1 and config["max_steps"] == 4
    assert config["model/num_parameters"] == 1234 and config["fg_bus"]["run_id"] == RUN_ID
    metrics = {m.name or m.glob_name: m.step_metric for m in of_kind(seg, "metric")}
    assert metrics == {"train/global_step": "", "*": "train/global_step"}
    summary = {}
    for s in of_kind(seg, "summary"):
        summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in s.update})
    assert summary["train_loss"] == 1.7 and summary["train_runtime"] == 12.5 and summary["total_flos"] == 2468.0
    assert summary["fg/end"] == "completed"
    alerts = of_kind(seg, "alert")
    assert [a.level for a in alerts] == ["WARN", "WARN", "INFO"]
    assert "loss is NaN" in alerts[1].text and "alice@gpu1" in alerts[2].text
    assert [e.exit_code for e in of_kind(seg, "exit")] == [0]
    assert of_kind(seg, "stats") == []  # no system stats of the sink's own process
    table = next(seg.parent.glob("files/media/table/textgen/*.table.json"))
    assert json.loads(table.read_text())["data"] == [[4, "Once upon", " a time there was a sink"]]
    state = json.loads((tmp_path / "wb" / "wandb" / f"fg-sink-{wandb_id(RUN_ID)}.json").read_text())
    assert state["wandb_run_id"] == wandb_id(RUN_ID) and state["finished"] and state["next_seq"] == 17
    assert "key" not in json.dumps(state).lower()


@pytest.mark.parametrize("status", ["failed", "dead"])
def test_failed_or_dead_run_exits_non_zero(tmp_path, status):
    recs = a_run()[:9]  # the trainer died after seq 8: no end record
    feed(tmp_path, recs, status=status)
    (seg,) = segments(tmp_path)
    assert [e.exit_code for e in of_kind(seg, "exit")] == [1]
    assert_history(_wandb_file.history(seg), recs)


def test_stopped_and_restarted_no_duplicate(tmp_path):
    recs = a_run()
    feed(tmp_path, recs[:8], status="stopped by SIGTERM")  # the sink stopped mid-run
    state = json.loads((tmp_path / "wb" / "wandb" / f"fg-sink-{wandb_id(RUN_ID)}.json").read_text())
    assert state["next_seq"] == 8 and not state["finished"]
    sink = WandbSink()
    assert sink.open_run(make_info(tmp_path)) == {0: 8}  # where the tracker's history ends
    for r in recs:  # fed from the start anyway: what the tracker has is not logged again
        sink.handle(r)
    sink.end_run("completed", None)
    sink.close()
    segs = segments(tmp_path)
    assert len(segs) == 2  # offline, a resumed run is a new run directory with the same id (wandb sync merges)
    assert_history(history(tmp_path), recs)
    # the resumed segment carries the run's config and name too
    assert _wandb_file.config(segs[1])["learning_rate"] == 0.001
    assert of_kind(segs[1], "run")[0].display_name == "trial-1"
    assert [e.exit_code for s in segs for e in of_kind(s, "exit")] == [0, 0]
    # started again after the end: nothing more is written
    feed(tmp_path, recs)
    assert len(segments(tmp_path)) == 2


def test_started_late_replays_whole_run(tmp_path):
    recs = a_run()
    sink = feed(tmp_path, recs, project="late-project")
    assert sink.runs == {}
    (seg,) = segments(tmp_path)
    assert of_kind(seg, "run")[0].project == "late-project"
    assert_history(_wandb_file.history(seg), recs)


def test_second_sink_on_the_same_run_is_refused(tmp_path):
    from sinks._output import OutputLocked

    sink = WandbSink()
    sink.open_run(make_info(tmp_path))
    try:
        with pytest.raises(OutputLocked):
            WandbSink().open_run(make_info(tmp_path))
    finally:
        sink.close()


def test_build_without_the_extra(monkeypatch):
    import argparse
    import importlib.util

    from sinks import wandb_sink

    parser = argparse.ArgumentParser()
    wandb_sink.add_arguments(parser.add_argument_group("wandb"))
    opts = parser.parse_args(["--wandb-project", "p", "--wandb-mode", "offline"])
    opts.group_readable = False
    assert wandb_sink.build(opts).project == "p"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'fg-bus\[wandb\]'"):
        wandb_sink.build(opts)


def test_ranks_all_gives_each_rank_a_run_in_one_group(tmp_path):
    bus_dir = tmp_path / "out" / "fg-bus" / RUN_ID
    bus_dir.mkdir(parents=True)
    info = RunInfo(bus_dir, {"run_id": RUN_ID, "world_size": 2})
    sink = WandbSink(ranks="all")
    assert sink.open_run(info) is None
    recs = a_run()
    for rank in (0, 1):
        for r in recs:
            sink.handle({**r, "rank": rank})
    sink.end_run("completed", None)
    sink.close()
    for rank in (0, 1):
        (seg,) = segments(tmp_path, rank)
        (run,) = of_kind(seg, "run")
        assert run.run_id == wandb_id(RUN_ID, rank) and run.run_group == RUN_ID
        assert run.display_name == ("trial-1" if rank == 0 else "trial-1-rank1")
        assert_history(_wandb_file.history(seg), recs)


def test_online_without_an_api_key_is_refused_when_the_run_is_attached(tmp_path, monkeypatch):
    from fg_bus import records
    from sinks._output import OutputError

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    info = make_info(tmp_path)
    info.journal_path(0).write_bytes(b"".join(records.encode(r) + b"\n" for r in a_run()[:3]))
    with pytest.raises(OutputError, match="wandb login"):
        WandbSink().open_run(info)
    assert not list((tmp_path / "wb").glob("wandb/fg-sink-*.json"))  # nothing kept for a run never started


def test_a_lost_state_file_or_lost_wandb_files(tmp_path):
    recs = a_run()
    state = tmp_path / "wb" / "wandb" / f"fg-sink-{wandb_id(RUN_ID)}.json"
    feed(tmp_path, recs[:8], status="stopped by SIGTERM")
    state.unlink()  # the run's files say where it ends, and its name and config
    sink = WandbSink()
    assert sink.open_run(make_info(tmp_path)) == {0: 8}
    for r in recs[8:]:
        sink.handle(r)
    sink.close()
    segs = segments(tmp_path)
    assert of_kind(segs[1], "run")[0].display_name == "trial-1" and _wandb_file.config(segs[1])["n_layer"] == 1
    assert_history(history(tmp_path), recs)
    for seg in segs:  # the W&B files gone, the state kept: the whole run again, as a new run
        shutil.rmtree(seg.parent)
    feed(tmp_path, recs)
    (seg,) = segments(tmp_path)
    assert_history(_wandb_file.history(seg), recs)
