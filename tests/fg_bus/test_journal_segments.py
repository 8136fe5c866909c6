"""The journal's segments: the live one sealed past its size, sealed ones compressed (zstd, seekable frames)
by the seal thread, and every reader reading them all, in seq order, whatever state a seal was cut in."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from array import array

import pytest
import zstandard

from fg_bus import Publisher, Subscriber, _segments, journal, registry
from fg_bus._top_follow import journal_tail
from fg_bus.journal import JournalStats, JournalWriter, read_journal
from fg_bus.records import decode, encode

from test_journal import make_record

SEGMENT = 2000  # bytes: about ten records a segment
FG_BUS = os.path.join(os.path.dirname(sys.executable), "fg-bus")


@pytest.fixture(autouse=True)
def small_frames(monkeypatch):
    monkeypatch.setattr(_segments, "FRAME_BYTES", 500)  # several frames a segment


def lines_for(n: int) -> list[bytes]:
    return [encode(make_record(seq, pad=(seq * 37) % 300)) for seq in range(n)]


def write(path, lines, segment_bytes=SEGMENT, close=True) -> JournalWriter:
    writer = JournalWriter(path, segment_bytes=segment_bytes)
    for data in lines:
        writer.append(data)
    if close:
        writer.close()
    return writer


def sealed_names(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_the_live_segment_is_sealed_and_compressed_and_read_back_whole(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    lines = lines_for(200)
    write(path, lines)
    sealed = _segments.sealed_segments(path)
    assert len(sealed) >= 10
    assert all(s.zst is not None and s.plain is None for s in sealed)  # compressed, the plain file removed
    assert all(n.endswith(".jsonl.zst") for n in sealed_names(path))  # no .tmp, no plain segment left
    assert [s.first for s in sealed] == sorted(s.first for s in sealed) and sealed[0].first == 0
    assert path.stat().st_size < SEGMENT + 400  # the live segment: the records after the last seal
    stats = JournalStats()
    assert list(read_journal(path, stats=stats)) == [decode(line) for line in lines]
    assert stats.records == 200 and stats.malformed == {} and not stats.torn_tail
    # What any zstd decoder gets from a segment is its lines as they were (the index frame is skipped).
    plain = b""
    for s in sealed:
        with open(s.zst, "rb") as f:
            plain += zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    assert plain + path.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert sum(p.stat().st_size for p in journal.journal_files(path)) == sum(
        p.stat().st_size for p in tmp_path.iterdir())


def test_read_journal_from_any_seq_across_segments(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    lines = lines_for(120)
    write(path, lines)
    for start in range(0, 125):
        assert [r["seq"] for r in read_journal(path, from_seq=start)] == list(range(start, 120)), start


@pytest.mark.parametrize("compressed", [True, False])
def test_replay_chunks_from_any_seq_to_any_seq_across_segments(tmp_path, monkeypatch, compressed):
    """read_chunks serves sealed segments compressed and still plain (before or without their .zst)."""
    monkeypatch.setattr(journal, "CHUNK_BYTES", 300)
    if not compressed:
        monkeypatch.setattr(_segments, "compress", _disk_full)
    path = tmp_path / "journal.rank0.jsonl"
    lines = lines_for(60)
    writer = write(path, lines, close=False)
    try:
        writer.sync()
        deadline = time.monotonic() + 30
        while writer._sealing and time.monotonic() < deadline:  # the seal thread's last compression
            writer.flush()
        states = {s.index is not None for s in writer._sealed}
        assert len(writer._sealed) >= 4 and states == {compressed}
        for a in range(0, 61, 3):
            for b in range(a, 62, 5):
                chunks = list(writer.read_chunks(a, b))
                assert b"".join(chunks) == b"".join(line + b"\n" for line in lines[a:b]), (a, b)
                assert all(chunk.endswith(b"\n") for chunk in chunks)
    finally:
        writer.close()


def _disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_compressing_leaves_the_plain_segment_and_goes_on(tmp_path, monkeypatch, caplog):
    real_write, failures = _segments._write_all, []

    def write_all(fd, data):
        if not failures:  # the first compression finds the disk full
            failures.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(_segments, "_write_all", write_all)
    path = tmp_path / "journal.rank0.jsonl"
    lines = iter(lines_for(100))
    writer = JournalWriter(path, segment_bytes=SEGMENT)
    try:
        for seals in (1, 2):
            while len(writer._sealed) < seals:
                writer.append(next(lines))
            deadline = time.monotonic() + 30
            while writer._sealing and time.monotonic() < deadline:  # the seal thread's compression
                writer.flush()
            if seals == 1:
                assert "could not compress the sealed segment" in caplog.text
                assert [(s.plain is not None, s.zst is not None) for s in _segments.sealed_segments(path)] == [
                    (True, False)]
                assert not list(tmp_path.glob("*.tmp"))
                assert [r["seq"] for r in read_journal(path)] == list(range(writer.next_seq))
        # tried again at the next seal, once the disk has room: both compressed
        assert [(s.plain is not None, s.zst is not None) for s in _segments.sealed_segments(path)] == [
            (False, True)] * 2
        assert [r["seq"] for r in read_journal(path)] == list(range(writer.next_seq))
    finally:
        writer.close()


def test_a_seal_cut_short_at_any_point_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """The files a kill leaves at each point of a seal, read by read_journal and `journal_tail`."""
    real_compress = _segments.compress
    monkeypatch.setattr(_segments, "compress", _disk_full)  # the seal thread never gets to it
    path = tmp_path / "journal.rank0.jsonl"
    lines = lines_for(40)
    write(path, lines)
    first = _segments.sealed_segments(path)[0]
    expected = list(range(40))

    def check():
        assert [r["seq"] for r in read_journal(path)] == expected
        assert [r["seq"] for r in journal_tail(path, 1 << 16)][-3:] == expected[-3:]

    check()  # sealed, not compressed (killed before the seal thread began)
    index = real_compress(first.plain, 0, _offsets(first.plain), first.plain.stat().st_size)
    assert index.firsts[0] == 0 and len(index.firsts) > 1
    check()  # compressed and renamed, the plain one not yet removed: both there
    zst = first.plain.with_name(first.plain.name + ".zst")
    os.rename(zst, zst.with_name(zst.name + ".tmp"))
    check()  # killed while writing the .zst.tmp
    os.rename(zst.with_name(zst.name + ".tmp"), zst)
    first.plain.unlink()
    check()  # the seal complete
    # Killed between the new link and the rename of the next live segment: the live file under both names.
    os.link(path, _segments.sealed_path(path, decode(path.read_bytes().split(b"\n")[0])["seq"]))
    check()


def _offsets(plain):
    data = plain.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos = data.index(b"\n", pos) + 1
    return array("q", out)


def test_a_damaged_compressed_segment_is_skipped_and_counted(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    write(path, lines_for(60))
    second = _segments.sealed_segments(path)[1]
    second.zst.write_bytes(second.zst.read_bytes()[:-3])  # its index cut
    stats = JournalStats()
    seqs = [r["seq"] for r in read_journal(path, stats=stats)]
    assert stats.malformed == {"damaged-segment": 1}
    assert seqs == sorted(seqs) and seqs[0] == 0 and seqs[-1] == 59 and len(seqs) < 60


def test_a_torn_tail_of_the_live_segment_is_skipped_after_sealed_segments(tmp_path):
    path = tmp_path / "journal.rank0.jsonl"
    lines = lines_for(50)
    write(path, lines)
    with open(path, "ab") as f:
        f.write(encode(make_record(50))[:40])  # the writer killed mid-record
    stats = JournalStats()
    assert [r["seq"] for r in read_journal(path, stats=stats)] == list(range(50))
    assert stats.torn_tail


def test_a_journal_that_cannot_be_written_stops_sealing(tmp_path):
    """After a write error the live segment keeps the offsets (complete_on_disk) and nothing is sealed."""
    path = tmp_path / "journal.rank0.jsonl"
    writer = write(path, lines_for(30), close=False)
    before = len(writer._sealed)
    writer.failed = OSError(errno.ENOSPC, "No space left on device")
    for data in lines_for(60)[30:]:
        writer.append(data)
    assert writer.next_seq == 60 and len(writer._sealed) == before
    assert writer.complete_on_disk() == 30
    writer.close()


def test_a_seal_that_cannot_be_made_is_logged_and_the_segment_goes_on(tmp_path, monkeypatch, caplog):
    path = tmp_path / "journal.rank0.jsonl"
    real_link = os.link
    monkeypatch.setattr(os, "link", lambda *a: _disk_full())
    writer = write(path, lines_for(30), close=False)
    assert writer._sealed == [] and "could not seal the live segment" in caplog.text
    monkeypatch.setattr(os, "link", real_link)
    for data in lines_for(60)[30:]:
        writer.append(data)
    writer.close()
    assert _segments.sealed_segments(path)
    assert [r["seq"] for r in read_journal(path)] == list(range(60))


# -- through a real bus ------------------------------------------------------------------------------------

@pytest.fixture
def segmented(fg_home, tmp_path, monkeypatch):
    """A live Publisher whose journal seals every few KB, with 300 records published and all but the live
    segment compressed."""
    monkeypatch.setenv("FG_JOURNAL_SEGMENT_BYTES", "4000")
    pub = Publisher(tmp_path / "bus" / "seg", registry.new_run_id("seg"), heartbeat_interval=0.2).start()
    for i in range(300):
        pub.publish("on_step_end", i, i / 100, metrics={"loss": 1.0 / (i + 1), "pad": "x" * (i % 50)})
    path = registry.resolve(pub.run_id).journal_path()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the bus thread journals them and the seal thread compresses
        sealed = _segments.sealed_segments(path)
        if len(sealed) >= 5 and all(s.plain is None for s in sealed) and pub.info.data["last_seq"] >= 299:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the journal was not sealed and compressed in time")
    yield pub, path
    pub.close()


def test_a_subscriber_replays_from_any_seq_across_compressed_segments(segmented):
    pub, path = segmented
    firsts = [s.first for s in _segments.sealed_segments(path)]
    for start in sorted({0, 1, firsts[1] - 1, firsts[1], firsts[2] + 3, firsts[-1], firsts[-1] + 2, 299}):
        sub = Subscriber(pub.run_id, from_seq=start, dead_after=10)
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 300 - start and time.monotonic() < deadline:
            got += sub.poll(0.5)
        sub.close()
        assert [r["seq"] for r in got] == list(range(start, 300)), start
        assert [r["global_step"] for r in got] == list(range(start, 300))


def fg_bus_cat(fg_home, *args):
    env = dict(os.environ, FG_HOME=str(fg_home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([FG_BUS, "cat", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_fg_bus_cat_across_segments_live_and_ended(fg_home, segmented):
    pub, path = segmented
    start = _segments.sealed_segments(path)[2].first + 1
    live = fg_bus_cat(fg_home, pub.run_id, "--from", str(start))
    out = live.stdout.readline()  # it is following the run: end it (cat follows a live run to its end)
    pub.close()
    out += live.stdout.read()  # (not communicate(): it would lose what readline buffered)
    err = live.stderr.read()
    assert live.wait(120) == 0, err
    seqs = [decode(line)["seq"] for line in out.splitlines() if line.strip()]
    assert seqs == list(range(start, seqs[-1] + 1)) and seqs[-1] >= 300  # ... the end record
    ended = fg_bus_cat(fg_home, pub.run_id)
    out, err = ended.communicate(timeout=120)
    assert ended.returncode == 0, err
    records = [decode(line) for line in out.splitlines() if line.strip()]
    assert [r["seq"] for r in records] == list(range(len(records))) and records[-1]["event"] == "end"


def test_a_raw_subscriber_of_an_ended_run_passes_whole_pieces_across_segments(segmented):
    """A raw Subscriber of an ended run (`fg-sink json` started after the run) reads the journal's files: each
    piece that is exactly the next seqs goes out as it is, one RawLines; the joined bytes are the journal's."""
    pub, path = segmented
    pub.close()
    want = b"".join(encode(r) + b"\n" for r in read_journal(path))
    for start in (0, _segments.sealed_segments(path)[2].first + 3):
        sub = Subscriber(pub.run_id, from_seq=start, dead_after=10, raw=True)
        got = []
        deadline = time.monotonic() + 30
        while not sub.finished and time.monotonic() < deadline:
            got += sub.poll(0.5)
        sub.close()
        assert sub.finished and sub.status == "completed"
        assert [(g.first_seq, g.last_seq) for g in got] == sorted((g.first_seq, g.last_seq) for g in got)
        assert got[0].first_seq == start and all(b.first_seq == a.last_seq + 1 for a, b in zip(got, got[1:]))
        assert b"".join(g.data for g in got) == b"".join(want.splitlines(keepends=True)[start:])
        assert len(got) < (300 - start) / 2  # whole pieces (a compressed frame's lines), not a record at a time
