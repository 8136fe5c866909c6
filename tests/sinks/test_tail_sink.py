"""TailSink fed records directly, writing to a StringIO."""

from __future__ import annotations

import io
import math

from fg_bus.records import decode
from sinks.tail_sink import TailSink

RUN_ID = "tail-20260101-000000-abcd"
ESC = "\x1b["


def rec(seq: int, event: str, step: int = 0, metrics: dict | None = None, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
              "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics or {}}
    record.update(extra)
    return record


def a_run() -> list[dict]:
    meta = {"name": "tiny-demo", "model": {"factory": "tests:TinyRegression"}, "num_parameters": 12345,
            "max_steps": 8}
    return [
        rec(0, "on_train_begin", 0, meta=meta),
        rec(1, "on_step_begin", 0),
        rec(2, "on_step_end", 1, {"loss": 2.0}),
        rec(3, "on_log", 2, {"loss": 1.9, "learning_rate": 0.001, "grad_norm": 1.35, "epoch": 0.5}),
        rec(4, "heartbeat", 2),
        rec(5, "on_log", 4, {"eval_loss": 1.25, "eval_accuracy": 0.75, "eval_runtime": 0.5,
                             "eval_samples_per_second": 99.0}),
        rec(6, "on_save", 4, checkpoint="out/checkpoint-4"),
        rec(7, "textgen", 4, prompt="Once upon", text=" a time", prompt_index=0),
        rec(8, "control", 4, cmd="save", applied=True),
        rec(9, "control", 4, cmd="set_lr", applied=False, reason="lr must be positive"),
        rec(10, "on_log", 8, {"train_loss": 1.7, "train_runtime": 12.5, "train_steps_per_second": 0.64}),
        rec(11, "on_train_end", 8),
        rec(12, "end", 8, status="completed"),
    ]


def run_tail(recs: list[dict], **kwargs) -> list[str]:
    stream = io.StringIO()
    sink = TailSink(stream=stream, **kwargs)
    for r in recs:
        sink.handle(r)
    sink.close()
    text = stream.getvalue()
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def test_the_default_view():
    lines = run_tail(a_run())
    # shown: train begin, log, eval, save, sample, two controls, done, end; not step begin/end, heartbeat,
    # on_train_end
    assert len(lines) == 9, lines
    begin, log, evaluation, save, sample, applied, refused, done, end = lines

    assert RUN_ID in begin and "tiny-demo" in begin and "tests:TinyRegression" in begin
    assert "12,345 parameters" in begin and "8 steps" in begin

    assert "step 2" in log and "epoch 0.5" in log
    assert "loss 1.9" in log and "lr 0.001" in log and "grad_norm 1.35" in log

    assert "step 4" in evaluation and "eval" in evaluation
    assert "eval_loss 1.25" in evaluation and "eval_accuracy 0.75" in evaluation
    assert "runtime" not in evaluation and "per_second" not in evaluation

    assert "saved" in save and "out/checkpoint-4" in save
    assert "sample" in sample and "Once upon" in sample and " a time" in sample

    assert "control save applied" in applied
    assert "control set_lr refused" in refused and "(lr must be positive)" in refused

    assert "train_loss 1.7" in done and "12.5 s" in done

    assert "step 8" in end and "end: completed" in end


def test_end_shows_a_bad_status():
    lines = run_tail([rec(0, "end", 3, status="failed")])
    assert len(lines) == 1 and "end: failed" in lines[0] and "step 3" in lines[0]


def test_a_nan_loss_is_shown():
    lines = run_tail([rec(0, "on_log", 1, {"loss": math.nan, "grad_norm": math.inf})])
    assert len(lines) == 1 and "loss nan" in lines[0] and "grad_norm inf" in lines[0]


def test_train_begin_without_parameters():
    lines = run_tail([rec(0, "on_train_begin", 0, meta={"name": "x"})])
    assert lines == [f"run {RUN_ID} started"]


def test_events_outside_the_default_set_print_nothing():
    assert run_tail([rec(0, "on_step_begin"), rec(1, "on_step_end", 1, {"loss": 1.0}), rec(2, "heartbeat"),
                     rec(3, "on_train_end")]) == []


def test_named_events_narrow_the_view_but_keep_the_end():
    lines = run_tail(a_run(), events=["on_save"])
    assert len(lines) == 2, lines
    assert "saved" in lines[0] and "out/checkpoint-4" in lines[0]
    assert "end: completed" in lines[1]


def test_named_events_can_include_others():
    lines = run_tail(a_run(), events=["on_step_end"])
    assert len(lines) == 2, lines
    assert "on_step_end" in lines[0] and "loss=2" in lines[0]
    assert "end: completed" in lines[1]


def test_colour():
    plain = run_tail(a_run(), colour=False)
    assert plain and not any(ESC in line for line in plain)
    coloured = run_tail(a_run(), colour=True)
    assert len(coloured) == len(plain)
    assert all(ESC in line for line in coloured)  # every line has at least its dim step prefix
    assert any("\x1b[0m" in line for line in coloured)  # and resets


def test_a_stringio_defaults_to_no_colour():
    stream = io.StringIO()
    sink = TailSink(stream=stream)
    assert sink.colour is False
    for r in a_run():
        sink.handle(r)
    assert stream.getvalue() and ESC not in stream.getvalue()


def test_a_terminal_defaults_to_colour():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    sink = TailSink(stream=stream)
    assert sink.colour is True
    sink.handle(rec(0, "on_save", 4, checkpoint="c"))
    assert ESC in stream.getvalue()


def test_json_prints_every_record():
    recs = a_run() + [rec(13, "on_log", 9, {"loss": math.nan})]
    lines = run_tail(recs, as_json=True)
    assert len(lines) == len(recs)  # with --json every record, on_step_begin and heartbeat too
    for line, r in zip(lines, recs):
        assert ESC not in line
        got = decode(line)
        if r["seq"] == 13:
            assert math.isnan(got["metrics"]["loss"])
            got["metrics"]["loss"] = r["metrics"]["loss"] = 0.0
        assert got == r


def test_json_with_named_events():
    lines = run_tail(a_run(), as_json=True, events=["on_log"])
    got = [decode(line) for line in lines]
    assert [r["seq"] for r in got] == [3, 5, 10, 12]
    assert [r["event"] for r in got] == ["on_log", "on_log", "on_log", "end"]


def test_json_ignores_colour():
    lines = run_tail(a_run()[:4], as_json=True, colour=True)
    assert len(lines) == 4 and not any(ESC in line for line in lines)


def test_a_skipped_sample_says_why():
    import io

    from sinks.tail_sink import TailSink

    stream = io.StringIO()
    TailSink(stream=stream, colour=False).handle(
        {"v": 1, "run": "r", "rank": 0, "seq": 4, "timestamp": "t", "event": "textgen", "global_step": 50,
         "epoch": 0.5, "prompt": "The ", "text": None, "skipped": "the snapshot was rotated away before generation"})
    assert stream.getvalue() == ("[step 50 | epoch 0.5] sample skipped 'The ': "
                                 "the snapshot was rotated away before generation\n")
