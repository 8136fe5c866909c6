"""The append-only journal: writing, replay in chunks, and reading a file left by a killed writer."""

from __future__ import annotations

import math
import os
import stat

import pytest

from fg_bus import journal
from fg_bus.journal import JournalStats, JournalWriter, read_journal, decode_chunk
from fg_bus.records import decode, encode

RUN = "run-20260101-000000-abcd"


def make_record(seq: int, pad: int = 0, **extra) -> dict:
    record = {"v": 1, "run": RUN, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
              "event": "on_log" if seq % 2 else "on_step_end", "global_step": seq, "epoch": seq / 10,
              "metrics": {"loss": 1.0 / (seq + 1), "pad": "x" * pad}}
    record.update(extra)
    return record


def write_journal(path, sizes) -> list[bytes]:
    """Write one record per entry of `sizes` (its padding) and close; returns the encoded lines."""
    lines = [encode(make_record(seq, pad)) for seq, pad in enumerate(sizes)]
    writer = JournalWriter(path)
    try:
        for data in lines:
            assert writer.next_seq == decode(data)["seq"]
            writer.append(data)
    finally:
        writer.close()
    return lines


# Small and large records mixed: several larger than a 100-byte chunk, several smaller.
SIZES = [0, 300, 5, 0, 150, 1000, 0, 10, 90, 250, 0, 3]


def test_append_and_read_back_in_order(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    lines = write_journal(path, SIZES)
    assert path.read_bytes() == b"".join(line + b"\n" for line in lines)
    stats = JournalStats()
    got = list(read_journal(path, stats=stats))
    assert [r["seq"] for r in got] == list(range(len(SIZES)))
    assert got == [decode(line) for line in lines]
    assert stats.records == len(SIZES)
    assert stats.torn_tail is False
    assert stats.malformed == {}


def test_read_back_while_writer_is_open_after_flush(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    writer = JournalWriter(path)
    try:
        for seq in range(5):
            writer.append(encode(make_record(seq)))
        writer.flush()
        assert [r["seq"] for r in read_journal(path)] == [0, 1, 2, 3, 4]
        writer.append(encode(make_record(5, metrics={"loss": math.nan})))
        writer.sync()
        last = list(read_journal(path))[-1]
        assert last["seq"] == 5 and math.isnan(last["metrics"]["loss"])
    finally:
        writer.close()


def test_read_journal_with_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHUNK_BYTES", 100)
    path = tmp_path / "journal.rank0.jsonl"
    lines = write_journal(path, SIZES)
    stats = JournalStats()
    assert list(read_journal(path, stats=stats)) == [decode(line) for line in lines]
    assert stats.torn_tail is False and stats.records == len(SIZES)


@pytest.mark.parametrize("chunk_bytes", [100, 1 << 18])
def test_read_chunks_returns_exactly_the_requested_lines(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(journal, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "journal.rank0.jsonl"
    lines = [encode(make_record(seq, pad)) for seq, pad in enumerate(SIZES)]
    writer = JournalWriter(path)
    try:
        for data in lines:
            writer.append(data)
        n = len(lines)
        for a in range(n + 1):
            for b in range(a, n + 1):
                chunks = list(writer.read_chunks(a, b))
                expected = b"".join(line + b"\n" for line in lines[a:b])
                assert b"".join(chunks) == expected, (a, b)
                for chunk in chunks:
                    assert chunk and chunk.endswith(b"\n"), (a, b)
                    # a chunk is at most CHUNK_BYTES, unless it is one record longer than that
                    assert len(chunk) <= chunk_bytes or chunk.count(b"\n") == 1, (a, b, len(chunk))
                decoded = [r for chunk in chunks for r in decode_chunk(chunk)]
                assert [r["seq"] for r in decoded] == list(range(a, b))
                if b == a:
                    assert chunks == []
        if chunk_bytes == 100:  # large records really were cut into several chunks
            assert len(list(writer.read_chunks(0, n))) > 5
    finally:
        writer.close()


def test_read_chunks_empty_and_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHUNK_BYTES", 100)
    path = tmp_path / "journal.rank0.jsonl"
    writer = JournalWriter(path)
    try:
        assert list(writer.read_chunks(0, 0)) == []
        assert list(writer.read_chunks(0, 10)) == []  # nothing written yet
        lines = [encode(make_record(seq, pad)) for seq, pad in enumerate([0, 200, 0])]
        for data in lines:
            writer.append(data)
        assert list(writer.read_chunks(3, 3)) == []
        assert list(writer.read_chunks(2, 1)) == []
        assert list(writer.read_chunks(5, 9)) == []  # past the end
        # to_seq past the end means "to the end"
        assert b"".join(writer.read_chunks(1, 100)) == lines[1] + b"\n" + lines[2] + b"\n"
    finally:
        writer.close()


@pytest.mark.parametrize("chunk_bytes", [100, 1 << 18])
def test_torn_last_line_is_skipped(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(journal, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "journal.rank0.jsonl"
    lines = write_journal(path, SIZES)
    torn = encode(make_record(len(SIZES), 400))[:-7]  # killed mid-write: no closing bytes, no newline
    with open(path, "ab") as f:
        f.write(torn)
    stats = JournalStats()
    got = list(read_journal(path, stats=stats))
    assert got == [decode(line) for line in lines]
    assert stats.torn_tail is True
    assert stats.records == len(SIZES)
    assert stats.malformed == {}


def test_complete_json_without_newline_is_still_torn(tmp_path):
    """A last line whose newline never reached the disk is not trusted, even if it parses."""
    path = tmp_path / "journal.rank0.jsonl"
    lines = write_journal(path, [0, 0, 0])
    with open(path, "ab") as f:
        f.write(encode(make_record(3)))
    stats = JournalStats()
    got = list(read_journal(path, stats=stats))
    assert [r["seq"] for r in got] == [0, 1, 2]
    assert got == [decode(line) for line in lines]
    assert stats.torn_tail is True


def test_malformed_lines_in_the_middle_are_counted_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHUNK_BYTES", 64)
    path = tmp_path / "journal.rank0.jsonl"
    good = [encode(make_record(seq, pad)) for seq, pad in enumerate([0, 120, 0, 0])]
    bad_version = encode({**make_record(99), "v": 2})
    content = [good[0], b"this is not json", good[1], b"[1, 2, 3]", b"not json either {",
               bad_version, good[2], b'{"v": 1}', good[3]]
    path.write_bytes(b"".join(line + b"\n" for line in content))
    stats = JournalStats()
    got = list(read_journal(path, stats=stats))
    assert got == [decode(line) for line in good]
    assert stats.malformed == {"not-json": 2, "not-an-object": 1, "unknown-version": 1, "missing-field": 1}
    assert stats.records == 4
    assert stats.torn_tail is False


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    good = [encode(make_record(seq)) for seq in range(3)]
    path.write_bytes(good[0] + b"\n\n" + good[1] + b"\n\n\n" + good[2] + b"\n")
    stats = JournalStats()
    assert [r["seq"] for r in read_journal(path, stats=stats)] == [0, 1, 2]
    assert stats.malformed == {}


def test_from_seq_skips_earlier_records(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHUNK_BYTES", 100)
    path = tmp_path / "journal.rank0.jsonl"
    write_journal(path, SIZES)
    for start in (0, 1, 5, len(SIZES) - 1):
        stats = JournalStats()
        got = list(read_journal(path, from_seq=start, stats=stats))
        assert [r["seq"] for r in got] == list(range(start, len(SIZES)))
        assert stats.records == len(SIZES) - start
    assert list(read_journal(path, from_seq=len(SIZES))) == []
    assert list(read_journal(path, from_seq=1000)) == []


def test_empty_journal(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    JournalWriter(path).close()
    stats = JournalStats()
    assert list(read_journal(path, stats=stats)) == []
    assert stats.records == 0 and stats.torn_tail is False


def test_journal_is_private_and_exclusive(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    writer = JournalWriter(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        writer.append(encode(make_record(0)))
        writer.flush()
        with pytest.raises(FileExistsError):
            JournalWriter(path)
    finally:
        writer.close()
    # the failed second writer did not truncate or touch the file
    assert [r["seq"] for r in read_journal(path)] == [0]
    with pytest.raises(FileExistsError):
        JournalWriter(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_journal_mode_ignores_a_loose_umask(tmp_path):
    old = os.umask(0)
    try:
        writer = JournalWriter(tmp_path / "journal.rank0.jsonl")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(writer.path).st_mode) == 0o600
    finally:
        writer.close()
