"""Fuzzed input, with hypothesis: the record decoder, multipart frames, journal chunks, the YAML loader, and
a live publisher's replay and inbox endpoints and a live subscriber, fed over real sockets. No crash, no
hang; every rejected input is counted with a reason. Each test prints how many inputs it tried (`-s`)."""

from __future__ import annotations

import collections
import json
import os
import random
import time

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fg_bus import Publisher, Subscriber, records, registry
from fg_bus.journal import JournalStats, decode_chunk
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(600)

#: inputs per fuzzed endpoint; FG_FUZZ_EXAMPLES=20000 for a long session (the suite's default keeps it about a
#: minute on two cores)
EXAMPLES = int(os.environ.get("FG_FUZZ_EXAMPLES", "1000"))
RUNS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)
field_values = st.one_of(json_values, st.just(1), st.just(0), st.just("on_log"), st.just(""), st.just(-1))
record_like = st.fixed_dictionaries({}, optional={
    name: field_values for name in ("v", "run", "rank", "seq", "timestamp", "event", "metrics", "epoch")})


class Tally:
    def __init__(self, name: str):
        self.name, self.tried, self.reasons = name, 0, collections.Counter()

    def report(self) -> str:
        return f"{self.name}: {self.tried} inputs, rejected by reason {dict(self.reasons)}"


def _decode(data: bytes, tally: Tally) -> None:
    tally.tried += 1
    try:
        record = records.decode(data)
    except records.RecordError as e:
        tally.reasons[e.reason] += 1
        return
    # Accepted: then it really is a v1 record.
    assert record["v"] == records.SCHEMA_VERSION and type(record["seq"]) is int and record["seq"] >= 0
    assert type(record["event"]) is str and record["event"] and type(record["run"]) is str
    assert isinstance(record.get("metrics", {}), dict)


def test_the_decoder_rejects_random_bytes_and_wrong_records_with_a_reason(capsys):
    tally = Tally("records.decode")

    @RUNS
    @given(st.binary(max_size=300))
    def random_bytes(data):
        _decode(data, tally)

    @RUNS
    @given(record_like)
    def wrong_records(value):
        _decode(json.dumps(value).encode(), tally)  # the stdlib writes what orjson cannot (huge ints, NaN)

    random_bytes()
    wrong_records()
    for depth in (10, 1000, 100_000):  # deep nesting: refused by the parser, not a crash or a stack overflow
        _decode(b'{"v":1,"metrics":' + b"[" * depth + b"]" * depth + b"}", tally)
    _decode(b'{"v":1,"run":"r","rank":0,"seq":0,"timestamp":"t","event":"' + b"x" * (8 << 20) + b'"}', tally)
    with capsys.disabled():
        print("\n" + tally.report())
    assert {"not-json", "missing-field", "bad-field", "unknown-version"} <= set(tally.reasons)


def test_frames_and_journal_chunks_reject_every_malformed_part_with_a_reason(capsys):
    frames, chunks = Tally("records.parse_frames"), Tally("journal chunk lines")

    @RUNS
    @given(st.lists(st.binary(max_size=80), max_size=4))
    def random_frames(parts):
        frames.tried += 1
        try:
            record = records.parse_frames(parts)
        except records.RecordError as e:
            frames.reasons[e.reason] += 1
        else:
            assert parts[0] == record["event"].encode()

    good = orjson.dumps({"v": 1, "run": "r", "rank": 0, "seq": 0, "timestamp": "t", "event": "on_log"})

    @RUNS
    @given(st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b) | st.just(good), max_size=8))
    def random_chunks(lines):
        stats = JournalStats()
        got = decode_chunk(b"\n".join(lines) + b"\n", stats)
        chunks.tried += len(lines)
        chunks.reasons.update(stats.malformed)
        assert len(got) + sum(stats.malformed.values()) == len([line for line in lines if line])

    random_frames()
    random_chunks()
    with capsys.disabled():
        print("\n" + frames.report() + "\n" + chunks.report())
    assert "frame-count" in frames.reasons and "not-json" in chunks.reasons


def test_the_yaml_loader_gives_a_config_error_or_a_config_never_anything_else(tmp_path, capsys):
    tally = Tally("trainer.config.load_config")
    path = tmp_path / "fuzz.yaml"
    fragments = ["model: ", "!singleton:", "trainer.data:CharCorpus", "!var x", "!list", "!dict:@a", "&a ", "*a",
                 "<<: *a", "- ", "  ", "\n", "args:", "{", "}", "[", "]", ": ", "!!python/object:os.system", "'",
                 '"', "\t", "%YAML 1.1", "---", "...", "\x00", "é", "1e999", "null"]

    @settings(max_examples=EXAMPLES // 2, deadline=None)
    @given(st.lists(st.sampled_from(fragments) | st.text(max_size=6), max_size=25))
    def random_configs(parts):
        path.write_bytes("".join(parts).encode("utf-8", errors="replace"))
        tally.tried += 1
        try:
            load_config(path, {})
        except ConfigError as e:
            tally.reasons[str(e).split(": ", 1)[-1].split(" ")[0]] += 1

    random_configs()
    with capsys.disabled():
        print(f"\n{tally.name}: {tally.tried} inputs, {sum(tally.reasons.values())} refused with a ConfigError")
    assert tally.reasons


@pytest.fixture
def live(fg_home, tmp_path):
    pub = Publisher(tmp_path / "bus" / "fuzz", registry.new_run_id("fuzz"), heartbeat_interval=0.2).start()
    for step in range(50):
        pub.publish("on_log", step, step / 10, metrics={"loss": 1.0})
    yield pub
    pub.close()


def test_the_replay_and_inbox_endpoints_survive_random_requests(live, capsys):
    rng = random.Random(7)
    ctx = zmq.Context()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    for sock in (dealer, push):
        sock.linger = 0
    dealer.connect(live.endpoints["replay"])
    push.connect(live.endpoints["inbox"])
    samples = [b"", b"{}", b"[]", b"null", b'{"op":"replay"}', b'{"op":"replay","from":-1}', b'{"op":"replay","from":1.5}',
               b'{"op":"replay","from":"0"}', b'{"op":"nope"}', b'{"op":"control","cmd":"rm -rf"}',
               b'{"op":"control"}', b'{"op":"record","event":"on_log"}', b'{"op":"record","event":"end"}',
               b'{"op":"record"}', b"\xff\xfe", b"[" * 5000, b"x" * (2 << 20)]
    tried = 0
    try:
        for i in range(3000):
            body = rng.choice(samples) if i % 2 else rng.randbytes(rng.randint(0, 64))
            frames = [body] * rng.choice([1, 1, 1, 2, 3])
            dealer.send_multipart(frames)
            push.send_multipart(frames)
            tried += 2
            while dealer.poll(0):
                dealer.recv_multipart()
        # Still serving: a proper replay request gets the whole journal and `done`.
        dealer.send(orjson.dumps({"op": "replay", "from": 0}))
        deadline, got = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            if not dealer.poll(1000):
                continue
            kind, body = dealer.recv_multipart()[-2:]
            if kind == b"chunk":
                got += decode_chunk(body)
            elif kind == b"done":
                break
        assert [r["seq"] for r in got[:50]] == list(range(50))
    finally:
        dealer.close()
        push.close()
        ctx.term()
    with capsys.disabled():
        print(f"\nreplay + inbox endpoints: {tried} random messages; rejected by reason {dict(live.rejected)}")
    assert sum(live.rejected.values()) > 0 and live.received.get("end", 0) == 0  # a sink cannot end the run


def test_a_live_subscriber_survives_random_frames_on_its_sub_socket(fg_home, tmp_path, capsys):
    """A rogue publisher's junk reaches the subscriber of a real run (both PUB sockets bound where the
    subscriber connects): the junk is counted by reason, the run's own records all arrive."""
    pub = Publisher(tmp_path / "bus" / "sub", registry.new_run_id("sub"), heartbeat_interval=0.2).start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUB)
    rogue.linger = 0
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    sub = Subscriber(pub.run_id, from_seq=0, dead_after=10)
    sub._sub.connect(f"tcp://127.0.0.1:{port}")
    rng = random.Random(11)
    time.sleep(0.3)
    other_run = orjson.dumps({"v": 1, "run": "someone-else", "rank": 0, "seq": 0, "timestamp": "t", "event": "on_log"})
    for i in range(3000):
        choice = i % 4
        parts = ([rng.randbytes(rng.randint(0, 40))] if choice == 0 else
                 [b"on_log", rng.randbytes(rng.randint(0, 80))] if choice == 1 else
                 [b"on_log", other_run] if choice == 2 else [b"a", b"b", b"c"])
        rogue.send_multipart(parts)
        if i % 30 == 0:
            pub.publish("on_log", i, 0.0, metrics={"loss": 1.0})
    pub.close()
    got = []
    for record in sub:
        got.append(record)
    rogue.close()
    ctx.term()
    assert [r["seq"] for r in got] == list(range(101)) and got[-1]["event"] == "end"
    with capsys.disabled():
        print(f"\nsubscriber SUB socket: 3000 rogue messages; rejected by reason {sub.stats.malformed}")
    assert sub.stats.malformed_total > 0 and {"frame-count", "other-run"} <= set(sub.stats.malformed)
