"""How a run ended, as the sinks show it: the tail's end line (and a failure's innermost frame), the summary line
every sink prints at exit, the alert sink's run-end rule and TensorBoard's `run/end` text; fed records directly.
(tests/e2e/test_abort.py runs the commands against a real trainer stopped by `fg-bus ctl`.)"""

from __future__ import annotations

import io
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CTL_STOPPED, failed_reason
from fg_bus import registry
from fg_bus.records import end_reason
from fg_bus.registry import RunInfo
from sinks.alert_sink import AlertSink
from sinks.runner import RunSummary, call_end_run
from sinks.tail_sink import TailSink
from sinks.tb_sink import TensorBoardSink

RUN = "ends-20260101-000000-e1e2"
STOPPED = CTL_STOPPED
FAILED = failed_reason("RuntimeError", "CUDA error: an illegal memory access", "return self.head(x)")
INTERRUPTED = end_reason("SIGINT at step 9", signal="SIGINT", step=9)
DEAD = {"text": "no heartbeat for 5.0 s, and its journal ends without an end record"}


def rec(seq: int, event: str, step: int = 0, **fields) -> dict:
    return {"v": 1, "run": RUN, "rank": 0, "seq": seq, "timestamp": f"2026-01-01T00:00:{seq:02d}+00:00",
            "event": event, "global_step": step, **fields}


def a_run(status: str | None, reason: dict | None) -> list[dict]:
    recs = [rec(0, "on_train_begin", 0, meta={"name": "demo", "max_steps": 100, "num_parameters": 10}),
            rec(1, "on_log", 10, epoch=0.1, metrics={"loss": 2.5})]
    if status is not None:
        recs.append(rec(2, "end", 40, status=status, reason=reason))
    return recs


def tail(recs: list[dict], status: str | None = None, reason: dict | None = None) -> list[str]:
    stream = io.StringIO()
    sink = TailSink(stream=stream, colour=False)
    for r in recs:
        sink.handle(r)
    if status is not None:
        call_end_run(sink.end_run, status, reason)
    sink.close()
    return stream.getvalue().splitlines()


def test_the_tail_names_how_the_run_ended_and_where_it_failed():
    assert tail(a_run("stopped", STOPPED))[-1] == \
        "[step 40] end: stopped: `fg-bus ctl stop` from alice@gpu1 (pid 4242) at step 40"
    assert tail(a_run("interrupted", INTERRUPTED))[-1] == "[step 40] end: interrupted: SIGINT at step 9"
    assert tail(a_run("failed", FAILED))[-2:] == [
        "[step 40] end: failed: RuntimeError: CUDA error: an illegal memory access",
        "    at /src/model.py:77 in forward: return self.head(x)"]
    assert tail(a_run("completed", None))[-1] == "[step 40] end: completed"  # an end record from before reasons
    # a dead run has no end record: the tail says what its follower saw
    assert tail(a_run(None, None), "dead", DEAD)[-1] == f"[step 10] end: dead: {DEAD['text']}"
    # a hostile reason is shown escaped
    hostile = tail(a_run("stopped", {"text": "evil\x1b[2J\r\nsecond"}))[-1]
    assert "\x1b" not in hostile and hostile.startswith("[step 40] end: stopped: evil\\x1b[2J")


def test_the_summary_line_says_how_the_run_ended():
    def line(status, reason, ranks=None):
        return RunSummary(RUN, status, 12, 0, 0, 0, ranks, reason=reason).line("json")

    assert line("stopped", STOPPED).startswith(
        f"fg-sink json: run {RUN} stopped: `fg-bus ctl stop` from alice@gpu1 (pid 4242) at step 40; 12 records "
        "handled")
    assert line("failed", FAILED).startswith(f"fg-sink json: run {RUN} failed: RuntimeError: CUDA error")
    assert line("completed", {"text": "completed"}).startswith(f"fg-sink json: run {RUN} completed; 12 records")
    assert f"run {RUN} dead: no heartbeat for 5.0 s" in line("dead", DEAD)
    assert f"run {RUN} completed (rank 0 completed, rank 1 completed): reached max_steps (30); " in \
        line("completed", {"text": "reached max_steps (30)"}, {0: "completed", 1: "completed"})
    # the sink itself stopped before the run's end: not the run's status
    assert f"run {RUN} not followed to its end (the sink was stopped by SIGTERM); " in line("stopped by SIGTERM", None)


def test_end_run_passes_the_reason_to_sinks_that_take_it_and_not_to_older_ones():
    got = []

    class Old:
        def end_run(self, status):
            got.append((status,))

    class New:
        def end_run(self, status, reason=None):
            got.append((status, reason))

    call_end_run(Old().end_run, "stopped", STOPPED)
    call_end_run(New().end_run, "stopped", STOPPED)
    assert got == [("stopped",), ("stopped", STOPPED)]


def alert_sink(tmp_path: Path) -> tuple[AlertSink, io.StringIO]:
    bus_dir = tmp_path / "out" / registry.BUS_DIRNAME / RUN
    bus_dir.mkdir(parents=True)
    err = io.StringIO()
    sink = AlertSink(stream=err)
    sink.open_run(RunInfo(bus_dir, {"run_id": RUN, "world_size": 1}))
    return sink, err


def test_the_run_end_alert_gives_the_reason_on_failure_and_death_and_none_for_a_stop(tmp_path):
    sink, err = alert_sink(tmp_path / "failed")
    for r in a_run("failed", FAILED):
        sink.handle(r)
    sink.end_run("failed", FAILED)
    sink.close()
    assert [a.message for a in sink.raised] == [
        "the run failed: RuntimeError: CUDA error: an illegal memory access (at /src/model.py:77 in forward: "
        "return self.head(x))"]
    assert sink.raised[0].details["reason"]["exception"]["type"] == "RuntimeError"
    assert "ALERT [run-end]" in err.getvalue()

    sink, _ = alert_sink(tmp_path / "dead")
    for r in a_run(None, None):
        sink.handle(r)
    sink.end_run("dead", DEAD)
    sink.close()
    assert [a.message for a in sink.raised] == [f"the trainer died: {DEAD['text']}"]

    for status, reason in (("stopped", STOPPED), ("interrupted", INTERRUPTED), ("completed", None)):
        sink, _ = alert_sink(tmp_path / status)
        for r in a_run(status, reason):
            sink.handle(r)
        sink.end_run(status, reason)
        sink.close()
        assert sink.raised == [], status  # someone meant it: no alert


def test_tensorboard_has_how_the_run_ended_as_text(tmp_path):
    bus_dir = tmp_path / "out" / registry.BUS_DIRNAME / RUN
    bus_dir.mkdir(parents=True)
    sink = TensorBoardSink(logdir=str(tmp_path / "tb"))
    sink.open_run(RunInfo(bus_dir, {"run_id": RUN, "world_size": 1}))
    for r in a_run("failed", FAILED):
        sink.handle(r)
    sink.end_run("failed")
    sink.close()
    ea = EventAccumulator(str(tmp_path / "tb" / RUN), size_guidance={"tensors": 0})
    ea.Reload()
    (event,) = ea.Tensors("run/end")
    assert event.step == 40
    assert event.tensor_proto.string_val[0].decode() == (
        "failed: RuntimeError: CUDA error: an illegal memory access\n\nat `/src/model.py:77 in forward: "
        "return self.head(x)`")
