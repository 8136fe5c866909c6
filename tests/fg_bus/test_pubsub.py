"""Publisher and Subscriber in one process, over real ZeroMQ sockets: late join, dedup, gap repair,
heartbeat-driven tail repair, the inbox, malformed input."""

from __future__ import annotations

import math
import threading
import time

import orjson
import pytest
import zmq

from fg_bus import Publisher, Subscriber, read_journal, records, registry


@pytest.fixture
def publisher(fg_home, tmp_path):
    pub = Publisher(tmp_path / "bus" / "r1", registry.new_run_id("t"), heartbeat_interval=0.2).start()
    yield pub
    pub.close()


def seqs(recs):
    return [r["seq"] for r in recs]


def drain(sub, timeout=10.0):
    out = []
    for record in sub:
        out.append(record)
        if len(out) > 100_000:
            raise AssertionError("runaway")
    return out


def test_late_subscriber_gets_history_then_live_without_holes_or_duplicates(publisher):
    for i in range(500):
        publisher.publish("on_step_end", i, i / 100, metrics={"loss": 1.0 / (i + 1)})
    sub = Subscriber(publisher.run_id, from_seq=0, dead_after=10)
    got = sub.poll(2.0)
    assert got and got[0]["seq"] == 0
    done = threading.Event()

    def more():
        for i in range(500, 1000):
            publisher.publish("on_step_end", i, i / 100, metrics={"loss": math.nan if i == 700 else 1.0})
        publisher.close()
        done.set()

    threading.Thread(target=more).start()
    got += drain(sub)
    assert done.wait(10)
    assert seqs(got) == list(range(len(got)))
    assert got[-1]["event"] == "end" and sub.status == "completed"
    assert len(got) == 1001
    assert got[700]["global_step"] == 700 and math.isnan(got[700]["metrics"]["loss"])
    assert sub.stats.live + sub.stats.replayed - sub.stats.duplicates == 1001  # each delivered exactly once


def test_from_now_skips_history(publisher):
    for i in range(10):
        publisher.publish("on_log", i)
    sub = Subscriber(publisher.run_id, from_seq=None, dead_after=10)
    sub.poll(1.0)  # first heartbeat fixes the starting point
    publisher.publish("on_log", 99)
    publisher.close()
    got = drain(sub)
    assert [r["global_step"] for r in got if r["event"] == "on_log"] == [99]
    assert got[-1]["event"] == "end"


def test_a_long_replay_with_an_event_filter_delivers_only_those_events_in_order(publisher):
    for i in range(20_000):  # about 4 MB of journal: many replay chunks, each delivered whole
        publisher.publish("on_log" if i % 10 == 0 else "on_step_end", i, metrics={"loss": float(i)})
    sub = Subscriber(publisher.run_id, from_seq=0, events={"on_log"}, dead_after=10)
    got = []
    while len(got) < 2000:
        got += sub.poll(2.0)
    publisher.publish("on_log", 20_000)
    publisher.close()
    got += drain(sub)
    assert [r["global_step"] for r in got[:-1]] == list(range(0, 20_001, 10))
    assert {r["event"] for r in got[:-1]} == {"on_log"} and got[-1]["event"] == "end"
    assert sub.stats.replayed >= 20_000 and sub.status == "completed"


def test_a_replayed_chunk_holding_the_end_record_ends_the_stream_there(publisher):
    publisher.publish("on_log", 0)
    sub = Subscriber(publisher.run_id, from_seq=0, dead_after=10)
    got = []
    while not got:
        got += sub.poll(2.0)
    base = {"v": 1, "run": publisher.run_id, "rank": 0, "timestamp": "t", "metrics": {}}
    chunk = [{**base, "seq": 1, "event": "on_log"}, {**base, "seq": 2, "event": "end", "status": "interrupted"},
             {**base, "seq": 3, "event": "on_log"}]
    out = []
    assert sub._deliver_run(chunk, out)
    assert seqs(out) == [1, 2] and sub.status == "interrupted" and sub.finished
    assert not sub._deliver_run([{**base, "seq": 9, "event": "on_log"}], [])  # not the next seq: record by record
    sub.close()


@pytest.mark.parametrize("trainer_ends_first", [False, True])
def test_records_dropped_live_are_repaired_from_the_journal(publisher, monkeypatch, trainer_ends_first):
    """Simulate a subscriber over its high-water mark: PUB loses seq 20..39; the journal has them. The
    repair comes over the replay socket, or (the trainer already gone) from the journal file."""
    real_frames = records.frames

    def lossy(event, data):
        seq = orjson.loads(data)["seq"]
        return [b"dropped", b"x"] if 20 <= seq < 40 else real_frames(event, data)

    sub = Subscriber(publisher.run_id, from_seq=0, dead_after=10)
    while not sub.caught_up:  # the initial (empty) replay is over: what follows arrives live only
        assert sub.poll(0.5) == []
    monkeypatch.setattr(records, "frames", lossy)
    for i in range(60):
        publisher.publish("on_step_end", i)
    got = []
    if not trainer_ends_first:
        while len(got) < 60:
            batch = sub.poll(2.0)
            assert batch, "no progress"
            got += batch
        assert seqs(got) == list(range(60))  # repaired while the trainer runs: by the replay socket
    publisher.close()
    got += drain(sub)
    assert seqs(got) == list(range(61))
    assert sub.stats.gaps_repaired >= 1
    assert sub.stats.malformed.get("topic-mismatch", 0) + sub.stats.malformed.get("not-json", 0) >= 1


def test_a_lost_tail_is_noticed_from_the_heartbeat(publisher, monkeypatch):
    sub = Subscriber(publisher.run_id, from_seq=0, dead_after=10)
    while not sub.caught_up:
        assert sub.poll(0.5) == []
    real_frames = records.frames
    monkeypatch.setattr(records, "frames", lambda e, d: [b"lost", b"x"] if e != "heartbeat" else real_frames(e, d))
    for i in range(5):
        publisher.publish("on_log", i)
    got = []
    for _ in range(20):
        got += sub.poll(0.5)
        if len(got) == 5:
            break
    assert seqs(got) == [0, 1, 2, 3, 4]  # nothing arrived live: the heartbeat's seq revealed them
    assert sub.stats.gaps_repaired >= 1


def test_an_ended_run_reads_from_its_journal_without_a_trainer(publisher):
    for i in range(30):
        publisher.publish("on_log", i, metrics={"loss": float(i)})
    publisher.close("interrupted")
    sub = Subscriber(publisher.run_id, from_seq=10)
    got = drain(sub)
    assert seqs(got) == list(range(10, 31))
    assert sub.status == "interrupted"
    assert registry.resolve(publisher.run_id).status == "interrupted"


def test_inbox_control_is_acknowledged_and_bad_messages_are_refused(publisher):
    sub = Subscriber(publisher.run_id, from_seq=0, dead_after=10)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 1000
    push.connect(registry.resolve(publisher.run_id).ranks["0"]["inbox"])
    push.send(orjson.dumps({"op": "control", "cmd": "save", "id": "abc"}))
    push.send(orjson.dumps({"op": "control", "cmd": "explode", "id": "def"}))
    push.send(b"\xff not json")
    push.send_multipart([b"two", b"frames"])
    push.send(orjson.dumps([1, 2, 3]))
    push.send(orjson.dumps({"op": "record", "event": "textgen", "metrics": [1, 2]}))  # metrics not an object
    push.send(orjson.dumps({"op": "record", "event": "end"}))  # only the trainer ends its run
    push.send(orjson.dumps({"op": "dance"}))
    push.send(orjson.dumps({"op": "control", "cmd": "evaluate", "id": "ghi"}))
    push.close()
    ctx.term()
    got = []
    while len([r for r in got if r["event"] == "control"]) < 3:
        batch = sub.poll(2.0)
        assert batch, "the publisher stopped answering"
        got += batch
    controls = [r for r in got if r["event"] == "control"]
    # Control requests are answered (their sender waits for it); other refusals are counted by reason.
    assert [(c["cmd"], c["accepted"]) for c in controls] == [("save", True), ("explode", False), ("evaluate", True)]
    assert "unknown command" in controls[1]["reason"]
    assert publisher.rejected == {"inbox-unknown-command": 1, "inbox-malformed": 3, "inbox-bad-field": 1,
                                  "inbox-event-refused": 1, "inbox-unknown-op": 1}
    assert not [r for r in got if r["event"] == "textgen"]
    assert [r["cmd"] for r in publisher.control_requests()] == ["save", "evaluate"]
    publisher.publish("on_log", 1)  # still alive and publishing
    publisher.close()
    assert drain(sub)[-1]["event"] == "end"


def test_malformed_frames_are_counted_and_survived(fg_home, tmp_path):
    """The test plays the trainer: its own PUB/ROUTER, a run.json pointing at them, and bad frames."""
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    sockdir = registry.socket_dir("fake")
    pub.bind(f"ipc://{sockdir}/pub")
    router.bind(f"ipc://{sockdir}/replay")
    bus_dir = registry.private_dir(tmp_path / "fake-run")
    info = registry.RunInfo(bus_dir, {"run_id": "fake-run", "pid": __import__("os").getpid(),
                                      "host": __import__("socket").gethostname(), "started": 1.0,
                                      "status": "running", "ranks": {"0": {"pub": f"ipc://{sockdir}/pub",
                                                                             "replay": f"ipc://{sockdir}/replay"}}})
    registry.write_json_atomic(bus_dir / "run.json", info.data)
    sub = Subscriber(str(bus_dir), from_seq=0, dead_after=30)
    identity, request = router.recv_multipart()
    assert orjson.loads(request) == {"op": "replay", "from": 0}
    router.send_multipart([identity, b"done", b'{"next_seq": 0}'])

    def rec(seq, event="on_log"):
        return records.encode({"v": 1, "run": "fake-run", "rank": 0, "seq": seq, "timestamp": "t",
                               "event": event, "metrics": {}})

    bad = [[b"on_log"], [b"on_log", b"{", b"extra"], [b"on_log", b"not json"], [b"on_log", b"[1]"],
           [b"on_log", b'{"v":1}'], [b"on_log", rec(0).replace(b'"v":1', b'"v":7')], [b"wrong", rec(0)],
           [b"on_log", b"{" * 100_000], [b"on_log", records.encode({"v": 1, "run": "other", "rank": 0, "seq": 0,
                                                                  "timestamp": "t", "event": "on_log"})]]
    good = [[b"on_log", rec(0)], [b"on_log", rec(1)], [b"end", rec(2, "end")]]
    got = []
    for _ in range(50):  # the SUB connection may still be forming: resend until something arrives
        for parts in bad + good[:1]:
            pub.send_multipart(parts)
        got += sub.poll(0.2)
        if got:
            break
    for parts in bad + good[1:]:
        pub.send_multipart(parts)
    while not sub.finished:
        got += sub.poll(1.0)
    assert seqs(got) == [0, 1, 2] and sub.status == "completed"
    for reason in ("frame-count", "not-json", "not-an-object", "missing-field", "unknown-version",
                   "topic-mismatch", "other-run"):
        assert sub.stats.malformed.get(reason, 0) >= 1, reason
    pub.close(linger=0)
    router.close(linger=0)
    ctx.term()


def test_a_value_that_cannot_be_encoded_is_published_as_an_error_at_its_seq(publisher, caplog):
    class Opaque:
        pass

    metrics = {"loss": 1.5}
    publisher.publish("on_log", 1, 0.1, metrics=metrics)
    metrics["loss"] = 99.0  # the record was handed over: later changes to the caller's dict do not reach it
    for step in (2, 3):
        publisher.publish("on_log", step, 0.2, metrics={"weights": Opaque()})
    publisher.publish("on_log", 4, 0.3, metrics={"loss": 1.25})
    publisher.close()
    got = drain(Subscriber(publisher.run_id, from_seq=0, dead_after=10))
    assert seqs(got) == list(range(5)) and got[-1]["event"] == "end"
    assert got[0]["metrics"] == {"loss": 1.5}
    assert [r["metrics"] for r in got[1:3]] == [{}, {}]
    assert all("metrics.weights" in r["error"] and "Opaque" in r["error"] for r in got[1:3])
    assert got[3]["metrics"] == {"loss": 1.25} and "error" not in got[3]
    assert len([m for m in caplog.messages if "could not be encoded" in m]) == 1  # logged once, not per step


def test_a_late_subscriber_is_told_which_records_a_failed_journal_lost(fg_home, tmp_path, monkeypatch):
    import errno

    from fg_bus.journal import JournalWriter

    real_write = JournalWriter.append

    def append(self, data):
        if self.next_seq >= 20 and self.failed is None:  # the disk fills at seq 20
            self._offsets.append(self._size)
            self._size += len(data) + 1
            self.failed = OSError(errno.ENOSPC, "No space left on device")
            raise self.failed
        return real_write(self, data)

    monkeypatch.setattr(JournalWriter, "append", append)
    pub = Publisher(tmp_path / "bus" / "full", registry.new_run_id("full"), heartbeat_interval=0.2).start()
    for i in range(40):
        pub.publish("on_log", i)
    while pub.lost_from is None or pub._queue:  # the bus thread has met the full disk and sent everything
        time.sleep(0.01)
    time.sleep(0.1)
    sub = Subscriber(pub.run_id, from_seq=0, dead_after=10)  # joins late: 20..40 were only ever live
    got = sub.poll(3.0)
    for i in range(40, 45):
        pub.publish("on_log", i)
    pub.close()
    got += drain(sub)
    steps = [r["global_step"] for r in got if r["event"] == "on_log"]
    assert steps[:20] == list(range(20)) and steps[-5:] == list(range(40, 45))
    assert sub.stats.lost == 21  # seq 20..39 and the journal-failure warning
    assert pub.lost_from == 20 and "No space left" in pub.journal_error


def test_publish_waits_for_the_bus_thread_past_max_queued_and_loses_nothing(fg_home, tmp_path, monkeypatch):
    from fg_bus import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "MAX_QUEUED", 200)
    pub = Publisher(tmp_path / "bus" / "bp", registry.new_run_id("bp")).start()
    peak = 0
    for i in range(20_000):  # far faster than the bus thread journals them
        pub.publish("on_step_end", i, metrics={"loss": 1.0})
        peak = max(peak, len(pub._queue))
    pub.close()
    assert pub.stalls > 0 and peak <= 201  # bounded: publish() waited instead of queueing without limit
    got = list(read_journal(registry.resolve(pub.run_id).journal_path()))
    assert [r["seq"] for r in got] == list(range(20_001))


def test_run_json_keeps_the_run_name_and_ls_shows_it(fg_home, tmp_path):
    pub = Publisher(tmp_path / "bus" / "named", registry.new_run_id("named"), name="my-experiment",
                    system_interval=0, stall_after=5).start()
    try:
        info = registry.resolve(pub.run_id)
        assert info is not None and info.data["name"] == "my-experiment"
    finally:
        pub.close()
    assert registry.load_run(tmp_path / "bus" / "named").data["name"] == "my-experiment"
