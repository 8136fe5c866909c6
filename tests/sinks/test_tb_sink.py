"""TensorBoardSink fed records directly, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus.registry import RunInfo
from sinks.tb_sink import POSITION_FILE, TensorBoardSink, scalar_tag

RUN_ID = "tbrun-20260101-000000-abcd"
META = {"name": "tiny-demo", "description": "a run for the sink tests", "experiment": "sinks",
        "args": {"learning_rate": 0.001, "max_steps": 4}, "model": {"factory": "tests:TinyRegression"}}


def make_info(tmp_path: Path) -> RunInfo:
    bus_dir = tmp_path / "out" / "fg-bus" / RUN_ID
    bus_dir.mkdir(parents=True)
    return RunInfo(bus_dir, {"run_id": RUN_ID})


def rec(seq: int, event: str, step: int, metrics: dict | None = None, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": f"2026-01-01T00:00:{seq:02d}+00:00",
              "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics or {}}
    record.update(extra)
    return record


def a_run() -> list[dict]:
    return [
        rec(0, "on_train_begin", 0, meta=META),
        rec(1, "on_step_begin", 0),
        rec(2, "on_step_end", 1, {"loss": 2.0, "grad_norm": 1.5}),
        rec(3, "on_step_end", 2, {"loss": 1.8, "grad_norm": 1.2}),
        rec(4, "on_log", 2, {"loss": 1.9, "learning_rate": 0.001, "grad_norm": 1.35, "epoch": 0.5,
                             "total_flos": 1234.0}),
        rec(5, "on_step_end", 3, {"loss": math.nan, "grad_norm": 3.0}),
        rec(6, "on_step_end", 4, {"loss": 1.5, "grad_norm": 0.9}),
        rec(7, "on_log", 4, {"loss": math.nan, "learning_rate": 0.0005, "grad_norm": 2.0, "epoch": 1.0,
                             "total_flos": 2468.0}),
        rec(8, "on_log", 4, {"eval_loss": 1.25, "eval_runtime": 0.5, "epoch": 1.0}),
        rec(9, "textgen", 4, prompt="Once upon", text=" a time there was a sink", prompt_index=0),
        rec(10, "on_save", 4, checkpoint="out/checkpoint-4"),
        rec(11, "on_log", 4, {"train_loss": 1.7, "train_runtime": 12.5, "epoch": 1.0, "total_flos": 2468.0}),
        rec(12, "on_train_end", 4),
        rec(13, "end", 4, status="completed"),
    ]


def load(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def points(ea: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    events = ea.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def text(ea: EventAccumulator, tag: str) -> str:
    return ea.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def assert_values(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected):
        if math.isnan(e):
            assert math.isnan(g), (got, expected)
        else:
            assert g == pytest.approx(e, rel=1e-6), (got, expected)


def write_run(tmp_path: Path, recs: list[dict], **kwargs) -> tuple[TensorBoardSink, RunInfo]:
    info = make_info(tmp_path)
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"), **kwargs)
    assert sink.open_run(info) is None  # a new run directory
    for r in recs:
        sink.handle(r)
    sink.close()
    return sink, info


def test_a_run_read_back_with_tensorboard(tmp_path):
    sink, _ = write_run(tmp_path, a_run())
    run_dir = tmp_path / "tb" / RUN_ID
    assert sink.run_dir == run_dir
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    ea = load(run_dir)
    scalars = set(ea.Tags()["scalars"])
    expected = {
        "train/loss": ([2, 4], [1.9, math.nan]),
        "train/learning_rate": ([2, 4], [0.001, 0.0005]),
        "train/grad_norm": ([2, 4], [1.35, 2.0]),
        "eval/loss": ([4], [1.25]),
        "eval/runtime": ([4], [0.5]),
        "train/step_loss": ([1, 2, 3, 4], [2.0, 1.8, math.nan, 1.5]),
        "train/step_grad_norm": ([1, 2, 3, 4], [1.5, 1.2, 3.0, 0.9]),
        "train/train_loss": ([4], [1.7]),
        "train/train_runtime": ([4], [12.5]),
        # as transformers' TensorBoardCallback: every number of a log, epoch and total_flos too
        "train/epoch": ([2, 4, 4, 4], [0.5, 1.0, 1.0, 1.0]),
        "train/total_flos": ([2, 4, 4], [1234.0, 2468.0, 2468.0]),
    }
    assert scalars == set(expected), scalars
    for tag, (steps, values) in expected.items():
        got_steps, got_values = points(ea, tag)
        assert got_steps == steps, tag
        assert_values(got_values, values)
    # a scalar's wall time is the record's timestamp
    assert ea.Scalars("train/loss")[0].wall_time == datetime.fromisoformat(a_run()[4]["timestamp"]).timestamp()
    # + the texts (run/meta, args, textgen/sample_0, run/end) and the hparams session
    assert sink.scalars_written == sum(len(v[0]) for v in expected.values()) + 5


def test_meta_and_samples_are_text(tmp_path):
    write_run(tmp_path, a_run())
    ea = load(tmp_path / "tb" / RUN_ID)
    tensors = ea.Tags()["tensors"]
    assert "run/meta" in tensors and "textgen/sample_0" in tensors
    meta = text(ea, "run/meta")
    assert "tiny-demo" in meta and "a run for the sink tests" in meta and RUN_ID in meta
    assert "tests:TinyRegression" in meta  # the configuration is there too
    sample = text(ea, "textgen/sample_0")
    assert sample == "```\nOnce upon a time there was a sink\n```"  # verbatim, in a fenced block
    assert json.loads(text(ea, "args/text_summary")) == META["args"]  # as transformers' TensorBoardCallback writes it
    assert [e.step for e in ea.Tensors("textgen/sample_0")] == [4]


def test_samples_per_prompt_and_odd_metrics(tmp_path):
    recs = [
        rec(0, "on_train_begin", 0),  # no meta: no text
        rec(1, "on_log", 1, {"loss": 1.0, "flag": True, "note": "text", "test_loss": 0.7, "grad_norm_max": 9.0,
                             "eval_accuracy": 0.5, "count": 3}),
        rec(2, "textgen", 1, prompt="a", text="b", prompt_index=0),
        rec(3, "textgen", 1, prompt="c", text="d", prompt_index=1),
        rec(4, "grad_stats", 1, {"grad_norm_mean": 0.25}),
        rec(5, "end", 1, status="completed"),
    ]
    write_run(tmp_path, recs)
    ea = load(tmp_path / "tb" / RUN_ID)
    assert set(ea.Tags()["scalars"]) == {"train/loss", "test/loss", "grad/grad_norm_max", "eval/accuracy",
                                         "train/count", "grad/grad_norm_mean"}
    assert points(ea, "train/count") == ([1], [3.0])
    assert set(ea.Tags()["tensors"]) == {"textgen/sample_0", "textgen/sample_1", "run/end"}
    assert "d" in text(ea, "textgen/sample_1")


@pytest.mark.parametrize("key, tag", [
    ("loss", "train/loss"),
    ("learning_rate", "train/learning_rate"),
    ("grad_norm", "train/grad_norm"),
    ("eval_loss", "eval/loss"),
    ("eval_accuracy", "eval/accuracy"),
    ("test_loss", "test/loss"),
    ("grad_norm_max", "grad/grad_norm_max"),
    ("train_loss", "train/train_loss"),
    ("evaluation", "train/evaluation"),  # a prefix only counts with its underscore
])
def test_scalar_tag(key, tag):
    assert scalar_tag(key) == tag


# -- position and resume -----------------------------------------------------------------------------------

def read_position(run_dir: Path) -> dict:
    return json.loads((run_dir / POSITION_FILE).read_text())


def kill(sink: TensorBoardSink) -> None:
    """What a killed sink leaves: its event file as written, no close(); the kernel drops its lock."""
    sink.events.close()
    sink.logs[0]._lock.release()


def test_position_sidecar_follows_every_flush(tmp_path):
    info = make_info(tmp_path)
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=0)
    assert sink.open_run(info) is None
    run_dir = tmp_path / "tb" / RUN_ID
    position = read_position(run_dir)
    assert position["next_seq"] == 0
    event_file = run_dir / position["file"]
    assert position["size"] == event_file.stat().st_size > 0  # the file_version header
    for r in a_run()[:5]:
        sink.handle(r)
        position = read_position(run_dir)
        assert position["next_seq"] == r["seq"] + 1
        assert position["size"] == event_file.stat().st_size
    sink.close()


def test_checkpoint_flushes_even_with_a_long_flush_interval(tmp_path):
    info = make_info(tmp_path)
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=3600)
    sink.open_run(info)
    recs = a_run()
    for r in recs[:11]:  # up to and including on_save (seq 10)
        sink.handle(r)
    run_dir = tmp_path / "tb" / RUN_ID
    position = read_position(run_dir)
    assert position["next_seq"] == 11
    assert position["size"] == (run_dir / position["file"]).stat().st_size
    assert points(load(run_dir), "train/loss")[0] == [2, 4]  # on disk before close
    sink.close()


def test_restart_after_close_continues_after_the_last_record(tmp_path):
    info = make_info(tmp_path)
    recs = a_run()
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=3600)
    sink.open_run(info)
    for r in recs[:6]:
        sink.handle(r)
    sink.close()  # durable, with the position
    again = TensorBoardSink(logdir=str(tmp_path / "tb"))
    assert again.open_run(info) == {0: 6}
    for r in recs[6:]:
        again.handle(r)
    again.close()
    ea = load(tmp_path / "tb" / RUN_ID)
    assert points(ea, "train/step_loss")[0] == [1, 2, 3, 4]
    assert points(ea, "train/loss")[0] == [2, 4]


def test_crash_resume_truncates_to_the_position_without_duplicates(tmp_path):
    info = make_info(tmp_path)
    recs = a_run()
    run_dir = tmp_path / "tb" / RUN_ID
    k = 5

    # 1. seq 0..k, flushed after every record: the sidecar says next_seq k+1
    first = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=0)
    first.open_run(info)
    for r in recs[:k + 1]:
        first.handle(r)
    position = read_position(run_dir)
    assert position["next_seq"] == k + 1
    kill(first)  # no close(), but everything written had been flushed

    # 2. a restarted sink writes a few more records but dies before its next position flush
    second = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=3600)
    assert second.open_run(info) == {0: k + 1}
    for r in recs[k + 1:k + 4]:  # on_step_end, on_log, eval on_log: no checkpoint, no end
        second.handle(r)
    second.events.flush()  # the bytes reached the file, the sidecar was not updated
    event_file = run_dir / position["file"]
    assert read_position(run_dir) == position
    assert event_file.stat().st_size > position["size"]
    kill(second)

    # 3. the next restart truncates to the sidecar's size and continues from its seq
    third = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=0)
    assert third.open_run(info) == {0: k + 1}
    assert event_file.stat().st_size == position["size"]
    for r in recs[k + 1:]:
        third.handle(r)
    third.close()

    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    ea = load(run_dir)
    expected_steps = {"train/loss": [2, 4], "train/learning_rate": [2, 4], "train/grad_norm": [2, 4],
                      "eval/loss": [4], "train/step_loss": [1, 2, 3, 4], "train/step_grad_norm": [1, 2, 3, 4],
                      "train/train_loss": [4]}
    for tag, steps in expected_steps.items():
        assert points(ea, tag)[0] == steps, tag  # exactly one point per step
    assert_values(points(ea, "train/step_loss")[1], [2.0, 1.8, math.nan, 1.5])
    assert_values(points(ea, "train/loss")[1], [1.9, math.nan])
    assert len(ea.Tensors("run/meta")) == 1 and len(ea.Tensors("textgen/sample_0")) == 1


def test_close_is_idempotent(tmp_path):
    TensorBoardSink(logdir=str(tmp_path / "tb")).close()  # before any run
    info = make_info(tmp_path)
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"))
    sink.open_run(info)
    sink.handle(a_run()[2])
    sink.close()
    sink.close()
    assert points(load(tmp_path / "tb" / RUN_ID), "train/step_loss") == ([1], [2.0])


def crash_with_unrecorded_bytes(tmp_path: Path, info: RunInfo, recs: list[dict], k: int) -> tuple[Path, dict]:
    """seq 0..k flushed with their position, then k+1..k+3 written to the file but not to the sidecar."""
    first = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=0)
    first.open_run(info)
    for r in recs[:k + 1]:
        first.handle(r)
    kill(first)
    second = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=3600)
    second.open_run(info)
    for r in recs[k + 1:k + 4]:
        second.handle(r)
    second.events.flush()
    kill(second)
    run_dir = tmp_path / "tb" / RUN_ID
    position = read_position(run_dir)
    assert (run_dir / position["file"]).stat().st_size > position["size"]
    return run_dir, position


def test_a_restart_that_writes_nothing_keeps_a_true_position(tmp_path):
    """Truncated on resume, then closed before writing anything: the sidecar must still hold the file's real
    size, or the next resume would extend the file with zeros and TensorBoard would stop reading there."""
    info = make_info(tmp_path)
    recs = a_run()
    k = 5
    run_dir, position = crash_with_unrecorded_bytes(tmp_path, info, recs, k)
    event_file = run_dir / position["file"]

    idle = TensorBoardSink(logdir=str(tmp_path / "tb"))
    assert idle.open_run(info) == {0: k + 1}
    idle.close()  # stopped at once (e.g. Ctrl-C while waiting)
    assert read_position(run_dir)["size"] == event_file.stat().st_size == position["size"]

    last = TensorBoardSink(logdir=str(tmp_path / "tb"))
    assert last.open_run(info) == {0: k + 1}
    for r in recs[k + 1:]:
        last.handle(r)
    last.close()
    assert b"\0" * 16 not in event_file.read_bytes()
    ea = load(run_dir)
    assert points(ea, "train/step_loss")[0] == [1, 2, 3, 4]
    assert points(ea, "train/loss")[0] == [2, 4]
    assert points(ea, "train/train_loss")[0] == [4]


def test_a_restart_whose_first_record_has_no_scalars_keeps_a_true_position(tmp_path):
    info = make_info(tmp_path)
    recs = a_run()
    k = 5
    run_dir, position = crash_with_unrecorded_bytes(tmp_path, info, recs, k)
    event_file = run_dir / position["file"]
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"), flush_secs=0)
    assert sink.open_run(info) == {0: k + 1}
    sink.handle(rec(k + 1, "on_step_begin", 3))  # nothing to write, but a position flush
    assert read_position(run_dir) == {"file": position["file"], "size": event_file.stat().st_size,
                                      "next_seq": k + 2}
    assert event_file.stat().st_size == position["size"]
    sink.close()


def test_a_lost_event_file_is_not_zero_filled(tmp_path):
    """The sidecar survives but its event file was deleted: the records it held are gone, so the sink must
    not claim them (start over) and must not write a file that begins with zeros."""
    recs = a_run()
    sink, info = write_run(tmp_path, recs[:6])
    run_dir = tmp_path / "tb" / RUN_ID
    position = read_position(run_dir)
    (run_dir / position["file"]).unlink()
    again = TensorBoardSink(logdir=str(tmp_path / "tb"))
    assert again.open_run(info) in (None, {0: 0})
    for r in recs:
        again.handle(r)
    again.close()
    for path in run_dir.glob("events.out.tfevents.*"):
        assert not path.read_bytes().startswith(b"\0" * 8), path.name
    ea = load(run_dir)
    assert points(ea, "train/step_loss")[0] == [1, 2, 3, 4]
    assert points(ea, "train/loss")[0] == [2, 4]


def test_system_records_become_system_scalars_at_their_step_and_time(tmp_path):
    gpus = [{"index": 0, "name": "NVIDIA H100", "throttle_reasons": ["sw_power_cap"]}]
    recs = [rec(0, "on_train_begin", 0, meta=META),
            rec(1, "system", 3, {"cpu_percent": 97.5, "rss_mb": 812.25, "gpu0_utilization": 88.0,
                                 "gpu0_throttle": 4}, gpus=gpus),
            rec(2, "system", 7, {"cpu_percent": 101.0, "rss_mb": 815.0, "gpu0_utilization": 91.0,
                                 "gpu0_throttle": 0}, gpus=gpus)]
    write_run(tmp_path, recs)
    ea = load(tmp_path / "tb" / RUN_ID)
    assert {t for t in ea.Tags()["scalars"]} == {"system/cpu_percent", "system/rss_mb", "system/gpu0_utilization",
                                                 "system/gpu0_throttle"}
    assert points(ea, "system/rss_mb") == ([3, 7], [812.25, 815.0])
    assert points(ea, "system/gpu0_throttle") == ([3, 7], [4.0, 0.0])
    assert [e.wall_time for e in ea.Scalars("system/cpu_percent")] == \
        [datetime.fromisoformat(r["timestamp"]).timestamp() for r in recs[1:]]


def test_hparams_model_config_experiment_info_and_verbatim_samples(tmp_path):
    from tensorboard.plugins.hparams import metadata

    meta = {**META, "model": {"factory": "tests:TinyRegression", "config": {"n_layer": 2, "act": "gelu"}},
            "args": {"learning_rate": 0.001, "max_steps": 4, "bf16": False, "run_name": "a b",
                     "lr_scheduler_kwargs": {"power": 2}, "seed": None}}
    recs = [rec(0, "on_train_begin", 0, meta=meta),
            rec(1, "experiment", 0, meta={"source": "TBLogger", "name": "seed *run*", "description": "tries_it"}),
            rec(2, "textgen", 3, prompt="The ", text="**bold** _x_ # not a heading\n```code```", prompt_index=0),
            rec(3, "end", 3, status="completed")]
    write_run(tmp_path, recs)
    ea = load(tmp_path / "tb" / RUN_ID)
    assert json.loads(text(ea, "model_config/text_summary")) == {"n_layer": 2, "act": "gelu"}
    # TensorBoard's HParams plugin: a session start with the args (numbers, strings, booleans; the rest as JSON)
    [tag] = [t for t in ea.Tags()["tensors"] if t.startswith("_hparams_")]
    content = ea.SummaryMetadata(tag).plugin_data
    assert content.plugin_name == metadata.PLUGIN_NAME
    start = metadata.parse_session_start_info_plugin_data(content.content)
    assert start.hparams["learning_rate"].number_value == 0.001 and start.hparams["max_steps"].number_value == 4
    assert start.hparams["bf16"].bool_value is False and start.hparams["run_name"].string_value == "a b"
    assert start.hparams["lr_scheduler_kwargs"].string_value == '{"power": 2}' and "seed" not in start.hparams
    assert start.group_name == RUN_ID
    experiment = text(ea, "run/experiment")
    assert "**name** ` seed *run* `" in experiment and "**description** ` tries_it `" in experiment
    assert "from TBLogger" in experiment
    # the prompt's trailing space and the markdown in the sample come out as written: a longer fence
    sample = text(ea, "textgen/sample_0")
    assert sample == "````\nThe **bold** _x_ # not a heading\n```code```\n````"
