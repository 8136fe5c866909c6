"""JsonSink fed records directly: one line per record, NaN kept, `{run}`/`{output_dir}`, resume, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fg_bus.records import decode, encode
from fg_bus.registry import RunInfo
from sinks.json_sink import DEFAULT_OUT, JsonSink
from conftest import same

RUN_ID = "demo-20260101-000000-abcd"


def make_info(tmp_path: Path, run_id: str = RUN_ID) -> RunInfo:
    bus_dir = tmp_path / "out" / "fg-bus" / run_id
    bus_dir.mkdir(parents=True)
    return RunInfo(bus_dir, {"run_id": run_id})


def rec(seq: int, event: str = "on_log", step: int | None = None, metrics: dict | None = None, **extra) -> dict:
    step = seq if step is None else step
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": f"2026-01-01T00:00:{seq % 60:02d}+00:00",
              "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics or {}}
    record.update(extra)
    return record


def a_run() -> list[dict]:
    """A short run with every kind of record a JSON log sees."""
    meta = {"name": "tiny", "description": "json sink test", "args": {"learning_rate": 0.001, "max_steps": 4},
            "model": {"factory": "tests:TinyRegression"}, "world_size": 1}
    return [
        rec(0, "on_train_begin", 0, meta=meta),
        rec(1, "on_step_end", 1, {"loss": 2.0, "grad_norm": 1.5}),
        rec(2, "on_log", 1, {"loss": 2.0, "learning_rate": 0.001, "grad_norm": 1.5, "epoch": 0.25}),
        rec(3, "on_step_end", 2, {"loss": math.nan, "grad_norm": math.inf}),
        rec(4, "on_log", 2, {"loss": math.nan, "grad_norm": -math.inf, "learning_rate": 0.0005}),
        rec(5, "on_save", 2, checkpoint="out/checkpoint-2"),
        rec(6, "textgen", 2, prompt="Once upon", text=" a time", prompt_index=0),
        rec(7, "on_log", 2, {"eval_loss": 1.25, "eval_runtime": 0.5}),
        rec(8, "on_train_end", 2),
        rec(9, "end", 2, status="completed"),
    ]



def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file must end with a complete line"
    return [decode(line) for line in data.split(b"\n")[:-1]]


def feed(sink: JsonSink, recs: list[dict]) -> None:
    for r in recs:
        sink.handle(r)


# -- writing ----------------------------------------------------------------------------------------------

def test_every_record_becomes_one_line_in_order(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    assert sink.open_run(info) is None  # a new file: no position of its own
    assert sink.path == path
    recs = a_run()
    feed(sink, recs)
    assert sink.written == len(recs)
    sink.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(recs)
    got = read_lines(path)
    assert [r["seq"] for r in got] == list(range(len(recs)))
    assert [r["event"] for r in got] == [r["event"] for r in recs]
    for written, original in zip(got, recs):
        assert same(written, original), (written, original)
    # the lines are the records' own bytes (schema v1)
    assert lines[0] == encode(recs[0])


def test_nan_and_infinities_survive_the_file(tmp_path):
    info = make_info(tmp_path)
    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    sink.open_run(info)
    recs = a_run()
    feed(sink, recs)
    sink.close()
    raw = (tmp_path / f"{RUN_ID}.jsonl").read_text()
    assert '"NaN"' in raw and '"Infinity"' in raw and '"-Infinity"' in raw
    assert "null" not in raw  # orjson alone would have written NaN as null
    got = read_lines(tmp_path / f"{RUN_ID}.jsonl")
    assert math.isnan(got[3]["metrics"]["loss"]) and got[3]["metrics"]["grad_norm"] == math.inf
    assert math.isnan(got[4]["metrics"]["loss"]) and got[4]["metrics"]["grad_norm"] == -math.inf
    assert got[4]["metrics"]["learning_rate"] == 0.0005


def test_readable_with_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    info = make_info(tmp_path)
    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    sink.open_run(info)
    recs = a_run()
    feed(sink, recs)
    sink.close()
    df = pd.read_json(tmp_path / f"{RUN_ID}.jsonl", lines=True)
    for column in ("event", "timestamp", "global_step", "epoch", "metrics", "meta"):  # the seed JsonLogger's
        assert column in df.columns, column
    assert len(df) == len(recs)
    assert df["event"].tolist() == [r["event"] for r in recs]
    assert df["global_step"].tolist() == [r["global_step"] for r in recs]
    assert df["meta"].iloc[0]["name"] == "tiny"


def test_output_dir_and_run_placeholders(tmp_path):
    info = make_info(tmp_path)
    sink = JsonSink(out="{output_dir}/logs/{run}.jsonl")
    sink.open_run(info)
    expected = tmp_path / "out" / "logs" / f"{RUN_ID}.jsonl"  # output_dir = bus_dir.parent.parent
    assert sink.path == expected
    feed(sink, a_run()[:3])
    sink.close()
    assert [r["seq"] for r in read_lines(expected)] == [0, 1, 2]


def test_default_output_is_under_the_run_output_dir(tmp_path):
    info = make_info(tmp_path)
    sink = JsonSink()
    assert sink.template == DEFAULT_OUT
    sink.open_run(info)
    sink.handle(rec(0, "on_train_begin", 0))
    sink.close()
    assert (tmp_path / "out" / "logs" / f"{RUN_ID}.jsonl").is_file()


def test_saves_and_the_end_reach_the_disk_before_close(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    sink = JsonSink(out=str(path))
    sink.open_run(info)
    recs = a_run()
    feed(sink, recs[:6])  # ends with on_save: fsynced there
    assert recs[5]["event"] == "on_save"
    assert [r["seq"] for r in read_lines(path)] == list(range(6))
    feed(sink, recs[6:])  # ends with `end`
    assert [r["seq"] for r in read_lines(path)] == list(range(len(recs)))
    sink.close()


def test_a_second_run_gets_its_own_file(tmp_path):
    first = make_info(tmp_path)
    second = make_info(tmp_path, "other-20260101-000000-ffff")
    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    sink.open_run(first)
    feed(sink, a_run()[:2])
    sink.open_run(second)  # closes the first file
    other = {**rec(0, "on_train_begin", 0), "run": second.run_id}
    sink.handle(other)
    sink.close()
    assert [r["seq"] for r in read_lines(tmp_path / f"{RUN_ID}.jsonl")] == [0, 1]
    assert [r["run"] for r in read_lines(tmp_path / f"{second.run_id}.jsonl")] == [second.run_id]


# -- resume -----------------------------------------------------------------------------------------------

def ten_records() -> list[dict]:
    return [rec(i, "on_log", i, {"loss": 1.0 / (i + 1)}) for i in range(15)]


def test_resume_drops_a_torn_line_and_continues_without_duplicate(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    recs = ten_records()
    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    assert sink.open_run(info) is None
    feed(sink, recs[:10])
    sink.close()
    clean = path.read_bytes()
    torn = encode(recs[10])[:25]
    with open(path, "ab") as f:  # a crash mid-write
        f.write(torn)
    assert path.stat().st_size == len(clean) + len(torn)

    sink = JsonSink(out=str(tmp_path / "{run}.jsonl"))
    assert sink.open_run(info) == {0: 10}  # next seq by rank
    assert path.read_bytes() == clean  # the torn bytes are gone
    feed(sink, recs[10:])
    sink.close()
    got = read_lines(path)
    assert [r["seq"] for r in got] == list(range(15))
    assert all(same(g, r) for g, r in zip(got, recs))


def test_resume_of_a_clean_file(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    recs = ten_records()
    sink = JsonSink(out=str(path))
    sink.open_run(info)
    feed(sink, recs[:10])
    sink.close()
    size = path.stat().st_size
    sink = JsonSink(out=str(path))
    assert sink.open_run(info) == {0: 10}
    assert path.stat().st_size == size
    sink.close()


def test_resume_with_long_lines(tmp_path):
    """Lines longer than the 64 KiB the tail is read in: the last record and a long torn tail."""
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    recs = [rec(i, "textgen", i, prompt="p", text="x" * 150_000, prompt_index=0) for i in range(4)]
    sink = JsonSink(out=str(path))
    sink.open_run(info)
    feed(sink, recs[:3])
    sink.close()
    clean = path.read_bytes()
    with open(path, "ab") as f:
        f.write(encode(recs[3])[:100_000])  # a torn line of 100 kB, no newline in it
    sink = JsonSink(out=str(path))
    assert sink.open_run(info) == {0: 3}
    assert path.read_bytes() == clean
    sink.handle(recs[3])
    sink.close()
    assert [r["seq"] for r in read_lines(path)] == [0, 1, 2, 3]


def test_a_file_with_only_a_torn_line_starts_over(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    path.write_bytes(encode(rec(0))[:10])
    sink = JsonSink(out=str(path))
    assert sink.open_run(info) is None
    assert path.read_bytes() == b""
    sink.handle(rec(0))
    sink.close()
    assert [r["seq"] for r in read_lines(path)] == [0]


def test_an_empty_existing_file_is_a_new_file(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    path.touch()
    sink = JsonSink(out=str(path))
    assert sink.open_run(info) is None
    sink.handle(rec(0))
    sink.close()
    assert [r["seq"] for r in read_lines(path)] == [0]


def test_a_file_ending_with_another_run_is_not_a_position_in_this_run(tmp_path):
    """With a fixed --out (no {run}) and --follow, the next run appends to the same file: the previous run's
    last seq says nothing about where this run's output ends, so this run starts at its beginning."""
    first = make_info(tmp_path)
    second = make_info(tmp_path, "next-20260101-000000-ffff")
    path = tmp_path / "all.jsonl"
    sink = JsonSink(out=str(path))
    assert sink.open_run(first) is None
    feed(sink, ten_records()[:10])
    sink.close()
    sink = JsonSink(out=str(path))
    assert sink.open_run(second) in (None, 0)  # not 10: seq 0..9 of the second run would be lost
    for r in ten_records()[:3]:
        sink.handle({**r, "run": second.run_id})
    sink.close()
    got = read_lines(path)
    assert [(r["run"], r["seq"]) for r in got] == ([(RUN_ID, i) for i in range(10)]
                                                   + [(second.run_id, i) for i in range(3)])


@pytest.mark.parametrize("last_line", [b"this is not json at all\n", b'{"hello": "world"}\n'])
def test_a_last_line_that_is_not_a_record_is_an_error(tmp_path, last_line):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    path.write_bytes(encode(rec(0)) + b"\n" + last_line)
    before = path.read_bytes()
    sink = JsonSink(out=str(path))
    with pytest.raises(ValueError) as err:
        sink.open_run(info)
    message = str(err.value)
    assert str(path) in message
    assert "not a record" in message
    assert "move the file away" in message  # says what to do about it
    assert path.read_bytes() == before  # a complete line is never dropped
    sink.close()


def test_close_is_idempotent(tmp_path):
    info = make_info(tmp_path)
    path = tmp_path / f"{RUN_ID}.jsonl"
    JsonSink(out=str(path)).close()  # before any run
    sink = JsonSink(out=str(path))
    sink.open_run(info)
    feed(sink, a_run()[:3])
    sink.close()
    sink.close()
    sink.end_run("completed")  # after close: nothing to do, no error
    sink.close()
    assert [r["seq"] for r in read_lines(path)] == [0, 1, 2]
