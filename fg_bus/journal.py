"""The append-only journal: one encoded record per line, in seq order, for one (run, rank).

The writer belongs to the bus thread. It keeps the byte offset of every record so a replay from any seq
is one seek and one sequential read. A reader needs no trainer: it reads the file, and a last line
without its newline (the writer was killed mid-write) is detected as torn and skipped, never misread.
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import orjson

from .records import RecordError, decode, may_hold_nonfinite, validate

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # replay reads and sends the journal in pieces of about this size


class JournalWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=1 << 16)
        self._offsets = array("q")  # byte offset of record seq i
        self._size = 0
        self.failed: OSError | None = None

    @property
    def next_seq(self) -> int:
        return len(self._offsets)

    def append(self, data: bytes) -> None:
        """Append the record with seq == next_seq. A write error is kept in `failed` (raised once)."""
        self._offsets.append(self._size)
        self._size += len(data) + 1
        if self.failed is not None:
            return
        try:
            self._file.write(data)
            self._file.write(b"\n")
        except OSError as e:
            self.failed = e
            raise

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._file.flush()
            except OSError as e:
                self.failed = e
                raise

    def sync(self) -> None:
        """Flush and fsync: durable on disk (at checkpoints and at the end)."""
        self.flush()
        if self.failed is None:
            os.fsync(self._file.fileno())

    def complete_on_disk(self) -> int:
        """How many records (seq 0..n-1) are wholly in the file: after a write error, the rest are not.
        Pushes what is still buffered first (as much as the disk takes)."""
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass
        try:
            size = os.fstat(self._file.fileno()).st_size
        except (OSError, ValueError):
            return 0
        ends = self._offsets[1:]
        ends.append(self._size)
        return bisect.bisect_right(ends, size)

    def offset_of(self, seq: int) -> int:
        return self._offsets[seq] if seq < len(self._offsets) else self._size

    def read_chunks(self, from_seq: int, to_seq: int) -> Iterator[bytes]:
        """Raw lines for seq in [from_seq, to_seq), in pieces of about CHUNK_BYTES that end at a newline."""
        self.flush()
        start, end = self.offset_of(from_seq), self.offset_of(to_seq)
        with open(self.path, "rb") as f:
            f.seek(start)
            while start < end:
                piece = f.read(min(CHUNK_BYTES, end - start))
                if not piece:
                    return
                cut = piece.rfind(b"\n") + 1 if start + len(piece) < end else len(piece)
                if cut <= 0:  # one record longer than a chunk: read to its end
                    piece += f.readline()
                    cut = len(piece)
                f.seek(start + cut)
                start += cut
                yield piece[:cut]

    def close(self) -> None:
        try:
            self.sync()
        except OSError as e:
            logger.error("journal %s: final flush failed: %s", self.path, e)
        finally:
            try:
                self._file.close()
            except OSError:
                pass


class JournalStats:
    def __init__(self):
        self.records = 0
        self.torn_tail = False
        self.malformed: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1


def decode_chunk(chunk: bytes, stats: JournalStats | None = None) -> list[dict]:
    """Decode the complete lines of a chunk; malformed ones are counted in `stats` and skipped.

    Fast path: the whole chunk parsed as one JSON array (one orjson call instead of one per line), with the
    cyclic garbage collector paused meanwhile: a chunk is thousands of fresh dicts that hold no cycles, and
    letting the collector walk them as they are made costs about a third of the parse. If any line is not
    a JSON value on its own, every line is parsed separately to find and skip it."""
    body = chunk.strip(b"\n")
    if not body:
        return []
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            values = orjson.loads(b"[" + body.replace(b"\n", b",") + b"]")
        except orjson.JSONDecodeError:
            values = None
        out = []
        if values is not None and len(values) == body.count(b"\n") + 1:
            restore = may_hold_nonfinite(body)
            for value in values:
                try:
                    out.append(validate(value, restore))
                except RecordError as e:
                    _skip(e, stats)
            return out
        for line in body.split(b"\n"):
            if line:
                try:
                    out.append(decode(line))
                except RecordError as e:
                    _skip(e, stats)
        return out
    finally:
        if paused:
            gc.enable()


def _skip(error: RecordError, stats: JournalStats | None) -> None:
    if stats is not None:
        stats.count(error.reason)
    logger.warning("skipping a malformed journal line: %s", error)


def read_journal(path: str | os.PathLike, from_seq: int = 0, stats: JournalStats | None = None) -> Iterator[dict]:
    """Every record with seq >= from_seq, read from the file alone. A torn last line is skipped."""
    stats = stats if stats is not None else JournalStats()
    with open(path, "rb") as f:
        pending = b""
        while True:
            piece = f.read(CHUNK_BYTES)
            if not piece:
                break
            pending += piece
            cut = pending.rfind(b"\n") + 1
            complete, pending = pending[:cut], pending[cut:]
            for record in decode_chunk(complete, stats):
                if record["seq"] >= from_seq:
                    stats.records += 1
                    yield record
        if pending:
            stats.torn_tail = True
            logger.warning("%s ends with a torn record (%d bytes without a newline): skipped", path, len(pending))
