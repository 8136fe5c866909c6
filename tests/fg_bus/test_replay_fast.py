"""The fast paths of replay: a chunk validated field by field over the whole list (`records.all_valid`), and
the raw path's check on bytes (`records.raw_run_length`). Each must accept exactly what the careful path
accepts, and leave everything else to it, so that the reasons a malformed line is counted under stay."""

from __future__ import annotations

import math
import time

import orjson
import pytest

from fg_bus import Publisher, Subscriber, records, registry
from fg_bus.journal import JournalStats, decode_chunk
from fg_bus.records import RecordError, all_valid, decode, encode, raw_head, raw_run_length

pytestmark = pytest.mark.timeout(120)
RUN = "run-20260101-000000-abcd"


def rec(seq: int, **extra) -> dict:
    return {"v": 1, "run": RUN, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
            "event": "on_log", "global_step": seq, "epoch": seq / 10, "metrics": {"loss": 1.0}, **extra}


#: One bad field each, with the reason the careful path gives it.
BAD = [({"v": 2}, "unknown-version"), ({"v": True}, "unknown-version"), ({"v": 1.0}, "unknown-version"),
       ({"seq": -1}, "bad-field"), ({"seq": True}, "bad-field"), ({"seq": 3.0}, "bad-field"),
       ({"rank": -2}, "bad-field"), ({"rank": "0"}, "bad-field"), ({"event": ""}, "bad-field"),
       ({"event": 5}, "bad-field"), ({"run": None}, "bad-field"), ({"metrics": [1.0]}, "bad-field"),
       ({"metrics": "x"}, "bad-field")]


@pytest.mark.parametrize("change,reason", BAD)
def test_one_bad_record_in_a_chunk_is_skipped_with_the_careful_paths_reason(change, reason):
    good = [rec(seq) for seq in range(20)]
    lines = [encode(r) for r in good]
    lines.insert(7, orjson.dumps({**rec(99), **change}))
    with pytest.raises(RecordError) as e:
        decode(lines[7])
    assert e.value.reason == reason
    stats = JournalStats()
    assert decode_chunk(b"\n".join(lines) + b"\n", stats) == good
    assert stats.malformed == {reason: 1}


@pytest.mark.parametrize("missing", records.REQUIRED_FIELDS)
def test_a_record_without_a_required_field_is_missing_field(missing):
    bad = {k: v for k, v in rec(99).items() if k != missing}
    stats = JournalStats()
    assert decode_chunk(encode(rec(0)) + b"\n" + orjson.dumps(bad) + b"\n", stats) == [rec(0)]
    assert stats.malformed == {"missing-field": 1}


def test_all_valid_accepts_good_chunks_and_metrics_null():
    assert all_valid([rec(0), rec(1, metrics=None), {k: v for k, v in rec(2).items() if k != "metrics"}])
    assert not all_valid([])
    assert not all_valid([rec(0), [1, 2]])


def test_non_finite_values_are_restored_on_the_fast_path_too():
    chunk = encode(rec(0, metrics={"loss": math.nan, "x": -math.inf}, epoch=math.inf)) + b"\n" + encode(rec(1)) + b"\n"
    got = decode_chunk(chunk)
    assert math.isnan(got[0]["metrics"]["loss"]) and got[0]["metrics"]["x"] == -math.inf
    assert got[0]["epoch"] == math.inf and got[1] == rec(1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_each_non_finite_value_alone_in_a_chunk_is_seen_and_restored(value):
    # the quick test first looks for the capitals N and I: a chunk's only one is the value's
    chunk = b"".join(encode(rec(seq, metrics={"loss": value if seq == 5 else 1.0})) + b"\n" for seq in range(10))
    rest = chunk.replace(b'"NaN"', b"").replace(b'"-Infinity"', b"").replace(b'"Infinity"', b"")
    assert len(rest) < len(chunk) and b"N" not in rest and b"I" not in rest and records.may_hold_nonfinite(chunk)
    got = decode_chunk(chunk)[5]["metrics"]["loss"]
    assert (math.isnan(got) if math.isnan(value) else got == value) and type(got) is float


def test_a_chunk_without_the_capitals_n_and_i_holds_no_non_finite_value():
    chunk = b"".join(encode(rec(seq)) + b"\n" for seq in range(10))
    assert not records.may_hold_nonfinite(chunk) and decode_chunk(chunk) == [rec(seq) for seq in range(10)]
    # a capital alone (a run named so) is not a non-finite value: looked for in full, and not found
    assert not records.may_hold_nonfinite(chunk.replace(b'"on_log"', b'"on_Log_In"'))


HEAD = raw_head(RUN, 0)


def lines(*seqs: int, **extra) -> bytes:
    return b"".join(encode(rec(seq, **extra)) + b"\n" for seq in seqs)


@pytest.mark.parametrize("body,first,n", [
    (lines(5, 6, 7), 5, 3),
    (lines(0), 0, 1),
    (lines(5, 6, 7), 4, 0),                          # not the seq expected
    (lines(5, 6, 8), 5, 0),                          # a seq missing
    (lines(5) + b"#####}\n" + lines(7), 5, 0),       # a garbled line
    (lines(5) + b"\n" + lines(6), 5, 0),             # a blank line: the decoding path skips it
    (lines(5, 6, event="end"), 5, 0),                # the end record is decoded
    (lines(5, 6, event=""), 5, 0),
    (lines(5, 6)[:-3] + b"\n", 5, 0),                # no closing brace
    (lines(5, 6).replace(b"on_log", b"on\x00og"), 5, 0),
    (lines(5, 6).replace(b"on_log", b"on\xfflog"), 5, 0),   # not UTF-8
    (lines(5, 6, text="h\u00e9llo \u2603"), 5, 2),   # UTF-8 is fine
    (lines(5, 6).replace(b'"rank":0', b'"rank":1'), 5, 0),  # another rank
    (lines(5, 6).replace(RUN.encode(), b"run-x"), 5, 0),    # another run
    (b"", 0, 0), (b"\n", 0, 0),
])
def test_raw_run_length(body, first, n):
    assert raw_run_length(body, HEAD, first) == n


def test_a_raw_subscriber_replaying_a_garbled_journal_counts_the_line_and_the_hole(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("fast"), heartbeat_interval=0.2).start()
    try:
        for seq in range(100):
            pub.publish("on_log", seq, metrics={"loss": float(seq)})
        path = pub.bus_dir / "journal.rank0.jsonl"
        deadline = time.monotonic() + 30
        while path.read_bytes().count(b"\n") < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        data = path.read_bytes()
        start = [i + 1 for i, b in enumerate(data) if b == 0x0A][39]
        end = data.index(b"\n", start)
        with open(path, "r+b") as f:  # line 40, overwritten in place
            f.seek(start)
            f.write(b"#" * (end - start))
        sub = Subscriber(pub.run_id, from_seq=0, dead_after=30, raw=True)
        got = []
        while sum(b.last_seq - b.first_seq + 1 for b in got) < 99:
            got += sub.poll(0.5)
            assert time.monotonic() < deadline + 30, sub.stats
    finally:
        pub.close()
    got += list(sub)
    seqs = [seq for b in got for seq in range(b.first_seq, b.last_seq + 1)]
    assert seqs == [s for s in range(101) if s != 40] and sub.status == "completed"
    assert (sub.stats.holes, sub.stats.hole_ranges, sub.stats.malformed) == (1, [(40, 40)], {"not-json": 1})
    decoded = [decode(line) for b in got for line in b.data.splitlines()]
    assert [r["seq"] for r in decoded] == seqs


def test_raw_and_an_events_filter_do_not_go_together(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("fast")).start()
    try:
        with pytest.raises(ValueError):
            Subscriber(pub.run_id, raw=True, events=["on_log"])
    finally:
        pub.close()
