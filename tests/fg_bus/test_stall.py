"""Stall detection and the progress summary: the pure pieces fed by hand, then a real Publisher (its
journal, heartbeats on its PUB socket, run.json and the registry's status)."""

from __future__ import annotations

import time

import orjson
import pytest
import zmq

from fg_bus import Publisher, read_journal, records, registry
from fg_bus._stall import Progress, StallDetector


def fields(event, step, timestamp=0.0, metrics=None, **extra):
    return (timestamp, event, step, None, metrics, extra)


def test_progress_rate_eta_loss_and_best_eval():
    p = Progress()
    p.observe("on_train_begin", fields("on_train_begin", 0, meta={"max_steps": 100, "args": {}}))
    assert p.summary() == {"global_step": 0, "max_steps": 100, "steps_per_second": None, "eta_s": None,
                           "last_loss": None, "best_eval": None}
    for step in range(1, 21):  # 4 steps per second
        p.observe("on_step_end", fields("on_step_end", step, timestamp=step * 0.25))
    p.observe("on_log", fields("on_log", 20, metrics={"loss": 2.5, "learning_rate": 1e-3}))
    p.observe("on_evaluate", fields("on_evaluate", 20, metrics={"eval_loss": 3.0}))
    p.observe("on_evaluate", fields("on_evaluate", 20, metrics={"eval_loss": float("nan")}))  # not a best
    p.observe("on_log", fields("on_log", 20, metrics={"eval_loss": 3.0}))  # an eval log has no "loss"
    summary = p.summary()
    assert summary["steps_per_second"] == pytest.approx(4.0) and summary["eta_s"] == pytest.approx(20.0)
    assert summary["last_loss"] == 2.5 and summary["best_eval"] == {"name": "eval_loss", "value": 3.0, "step": 20}
    assert p.median_step_s == pytest.approx(0.25)
    p.observe("on_evaluate", fields("on_evaluate", 30, metrics={"eval_loss": 2.0}))
    p.observe("on_evaluate", fields("on_evaluate", 40, metrics={"eval_loss": 2.2}))
    assert p.summary()["best_eval"] == {"name": "eval_loss", "value": 2.0, "step": 30}


def test_best_eval_follows_metric_for_best_model_and_greater_is_better():
    p = Progress()
    meta = {"max_steps": 10, "args": {"metric_for_best_model": "accuracy", "greater_is_better": None}}
    p.observe("on_train_begin", fields("on_train_begin", 0, meta=meta))
    for step, acc in ((2, 0.5), (4, 0.7), (6, 0.6)):
        p.observe("on_evaluate", fields("on_evaluate", step, metrics={"eval_accuracy": acc, "eval_loss": 1.0}))
    assert p.summary()["best_eval"] == {"name": "eval_accuracy", "value": 0.7, "step": 4}


def test_a_new_train_from_an_earlier_step_restarts_the_rate_window():
    p = Progress()
    for step in range(1, 11):
        p.observe("on_step_end", fields("on_step_end", step, timestamp=step * 1.0))
    p.observe("on_step_end", fields("on_step_end", 1, timestamp=100.0))
    assert p.steps_per_second is None
    p.observe("on_step_end", fields("on_step_end", 3, timestamp=101.0))
    assert p.steps_per_second == pytest.approx(2.0)


def test_stalled_once_then_cleared_only_while_training():
    d = StallDetector(5.0, check_every=1.0)
    assert d.check(0.0, None) is None  # not training yet
    assert d.progress("on_train_begin", 0, now=1.0) is None
    d.progress("on_step_end", 3, now=2.0)
    for t in range(2, 8):  # one check a second; the threshold is 5 s
        assert d.check(float(t), None) is None
    stalled = d.check(8.0, None)
    assert stalled["kind"] == "stalled" and stalled["global_step"] == 3 and stalled["stalled_for"] == 6.0
    assert "on_step_end" in stalled["message"]
    assert d.check(9.0, None) is None and d.stalled_for(9.0) == 7.0  # published once
    assert abs(d.stalled_since(9.0) - (time.time() - 7.0)) < 1
    cleared = d.progress("on_step_begin", 3, now=10.0)
    assert cleared["kind"] == "stall-cleared" and cleared["stalled_for"] == 8.0 and cleared["global_step"] == 3
    assert d.stalled_for(10.0) is None and d.stalled_since(10.0) is None
    d.progress("on_train_end", 4, now=11.0)
    assert d.check(30.0, None) is None  # over: not training


def test_the_threshold_is_at_least_ten_median_steps_and_zero_is_off():
    d = StallDetector(1.0)
    assert d.threshold(None) == 1.0 and d.threshold(0.05) == 1.0 and d.threshold(2.0) == 20.0
    d.progress("on_train_begin", 0, now=0.0)
    assert d.check(1.0, 2.0) is None and d.check(2.0, 2.0) is None  # slow steps: not stalled after 2 s
    off = StallDetector(0)
    off.progress("on_train_begin", 0, now=0.0)
    assert not off.enabled and off.check(1000.0, None) is None


def test_time_the_process_was_stopped_does_not_count():
    d = StallDetector(10.0, check_every=1.0)
    d.progress("on_train_begin", 0, now=0.0)
    d.check(1.0, None)
    assert d.check(60.0, None) is None  # 59 s without a check: SIGSTOP (or a suspended VM), not a stall
    for t in range(61, 69):
        assert d.check(float(t), None) is None
    assert d.check(69.0, None)["stalled_for"] == pytest.approx(11.0)


@pytest.fixture
def publisher(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("stall"), heartbeat_interval=0.1,
                    stall_after=0.5).start()
    yield pub
    pub.close()


def journal(pub):
    return list(read_journal(pub.bus_dir / "journal.rank0.jsonl"))


def wait_for(condition, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.02)


def warnings_of(pub, kind):
    return [r for r in journal(pub) if r["event"] == "warning" and r.get("kind") == kind]


def test_a_publisher_marks_a_silent_training_stalled_then_cleared(publisher):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, records.HEARTBEAT.encode())
    sub.setsockopt(zmq.RCVTIMEO, 60_000)  # a heartbeat that never comes fails the test (zmq.Again), no hang
    sub.connect(publisher.endpoints["pub"])
    try:
        publisher.publish("on_train_begin", 0, 0.0, meta={"max_steps": 50, "args": {}})
        for step in range(1, 6):
            publisher.publish("on_step_end", step, step / 50)
        publisher.publish("on_log", 5, 0.1, metrics={"loss": 1.25})
        [stalled] = wait_for(lambda: warnings_of(publisher, "stalled"), "a stalled warning")
        assert stalled["global_step"] == 5 and stalled["stalled_for"] > 0.5 and stalled["message"]
        info = wait_for(lambda: (i := registry.load_run(publisher.bus_dir)).data.get("stalled_since") and i,
                        "run.json's stalled_since")
        assert info.status == registry.STALLED and info.is_live
        assert registry.resolve(publisher.run_id).status == "stalled"
        progress = info.data["progress"]
        assert progress["global_step"] == 5 and progress["max_steps"] == 50 and progress["last_loss"] == 1.25
        beat = wait_for(lambda: (b := orjson.loads(sub.recv_multipart()[1])).get("stalled_for") and b,
                        "a heartbeat with stalled_for")
        assert beat["stalled_for"] > 0.5

        publisher.publish("on_step_begin", 5, 0.1)
        publisher.publish("on_train_end", 5, 0.1)  # at once: a loaded machine must not see a second stall
        [cleared] = wait_for(lambda: warnings_of(publisher, "stall-cleared"), "a stall-cleared warning")
        assert cleared["global_step"] == 5 and cleared["stalled_for"] >= stalled["stalled_for"]
        assert cleared["seq"] > stalled["seq"]
        wait_for(lambda: registry.load_run(publisher.bus_dir).data.get("stalled_since") is None,
                 "stalled_since cleared")
        assert registry.load_run(publisher.bus_dir).status == registry.LIVE
        time.sleep(1.0)  # no stall after the end of training (a condition that must stay false: waited out)
        assert len(warnings_of(publisher, "stalled")) == 1
    finally:
        sub.close(linger=0)


def test_sink_records_are_not_progress(publisher, tmp_path):
    """Only the trainer's own events count: a record sent in by a sink (through the bus) does not."""
    publisher.publish("on_train_begin", 0, 0.0, meta={})
    publisher._publish_from_bus("textgen", {"global_step": 0, "text": "x"})
    wait_for(lambda: warnings_of(publisher, "stalled"), "a stalled warning")
    publisher._publish_from_bus("textgen", {"global_step": 0, "text": "y"})
    time.sleep(0.3)  # waited out: nothing may clear it
    assert warnings_of(publisher, "stall-cleared") == []
