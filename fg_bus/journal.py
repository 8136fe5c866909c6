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

from .records import MAX_RECORD_BYTES, RecordError, decode, may_hold_nonfinite, validate

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # replay reads and sends the journal in pieces of about this size


class JournalWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=1 << 16)
        # One read handle, opened with the writer, serves every replay (os.pread at its offsets): a flood of
        # replay requests costs no file descriptor, and the journal stays readable if its path is deleted.
        self._read_fd = os.open(self.path, os.O_RDONLY)
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
        """Raw lines for seq in [from_seq, to_seq), in pieces of about CHUNK_BYTES that end at a newline.
        Read from the writer's one read handle, so any number of these may be in progress at once."""
        self.flush()
        start, end = self.offset_of(from_seq), self.offset_of(to_seq)
        while start < end:
            piece = os.pread(self._read_fd, min(CHUNK_BYTES, end - start), start)
            if not piece:
                return
            cut = piece.rfind(b"\n") + 1 if start + len(piece) < end else len(piece)
            if cut <= 0:  # one record longer than a chunk: read to its end (the next record's offset)
                piece = os.pread(self._read_fd, self._next_offset(start) - start, start)
                cut = len(piece)
                if not cut:
                    return
            start += cut
            yield piece[:cut]

    def _next_offset(self, offset: int) -> int:
        """The offset of the first record that starts after `offset` (the journal's end if none does)."""
        i = bisect.bisect_right(self._offsets, offset)
        return self._offsets[i] if i < len(self._offsets) else self._size

    def path_lost(self) -> bool:
        """Whether the file being written is no longer at the journal's path (deleted, or moved away). The
        open handles go on writing and reading the file itself."""
        try:
            if os.fstat(self._read_fd).st_nlink == 0:
                return True
            os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return False

    def restore(self) -> None:
        """Write the journal back at its path from the open read handle, then append to that new file.
        Raises OSError when it cannot (the directory is gone too, the disk is full, a file is there)."""
        self.flush()
        size = os.fstat(self._read_fd).st_size
        tmp = self.path.with_name(f".{self.path.name}.restoring")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            offset = 0
            while offset < size:
                piece = os.pread(self._read_fd, min(1 << 20, size - offset), offset)
                if not piece:
                    break
                offset += os.write(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:  # a link, not a rename: never over a file someone put at the path meanwhile
            os.link(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        writer = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND), "ab", buffering=1 << 16)
        old_file, old_fd = self._file, self._read_fd
        self._read_fd = os.open(self.path, os.O_RDONLY)
        self._file = writer
        old_file.close()
        os.close(old_fd)

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
            try:
                os.close(self._read_fd)
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
    if len(body) > MAX_RECORD_BYTES:  # it may hold a line over the bound (a replayed one, read whole)
        body = _without_too_large(body, stats)
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


def _without_too_large(body: bytes, stats: JournalStats | None) -> bytes:
    lines = body.split(b"\n")
    kept = [line for line in lines if len(line) <= MAX_RECORD_BYTES]
    for line in lines:
        if len(line) > MAX_RECORD_BYTES:
            _skip(RecordError("too-large", f"a line of {len(line)} bytes (a record may have {MAX_RECORD_BYTES})"),
                  stats)
    return b"\n".join(kept)


def _skip(error: RecordError, stats: JournalStats | None) -> None:
    if stats is not None:
        stats.count(error.reason)
    logger.warning("skipping a malformed journal line: %s", error)


def read_journal(path: str | os.PathLike, from_seq: int = 0, stats: JournalStats | None = None) -> Iterator[dict]:
    """Every record with seq >= from_seq, read from the file alone. A torn last line is skipped, and so is
    a line longer than MAX_RECORD_BYTES (counted as "too-large"); the records after it are still read."""
    stats = stats if stats is not None else JournalStats()
    with open(path, "rb") as f:
        for complete in _complete_lines(f, path, stats):
            for record in decode_chunk(complete, stats):
                if record["seq"] >= from_seq:
                    stats.records += 1
                    yield record


def _complete_lines(f, path, stats: JournalStats) -> Iterator[bytes]:
    """The file in pieces of whole lines. Linear in the file's size: a line longer than a piece is kept as a
    list of pieces and joined once, when its newline comes (`pending += piece` would copy it at every
    piece), and one longer than MAX_RECORD_BYTES is dropped as it is read, never held whole."""
    held: list[bytes] = []  # the start of a line whose newline has not come yet
    held_bytes = 0
    oversized = False  # the held line is over the bound: its pieces are dropped until its newline
    while piece := f.read(CHUNK_BYTES):
        cut = piece.rfind(b"\n") + 1
        if cut == 0:  # the line goes on past this piece
            held_bytes += len(piece)
            if not oversized:
                held.append(piece)
                if held_bytes > MAX_RECORD_BYTES:
                    oversized, held = True, []
            continue
        if held_bytes or oversized:  # this piece's first newline ends the held line
            first = piece.index(b"\n") + 1
            if oversized or held_bytes + first - 1 > MAX_RECORD_BYTES:
                _skip_too_large(path, held_bytes + first - 1, stats)
            else:
                yield b"".join(held) + piece[:first]
            complete = piece[first:cut]
        else:
            complete = piece[:cut]
        if complete:
            yield complete
        tail = piece[cut:]
        held, held_bytes, oversized = ([tail] if tail else []), len(tail), False
    if held_bytes:
        stats.torn_tail = True
        logger.warning("%s ends with a torn record (%d bytes without a newline): skipped", path, held_bytes)


def _skip_too_large(path, size: int, stats: JournalStats) -> None:
    stats.count("too-large")
    logger.warning("%s: skipping a line of %d bytes, longer than the %d a record may have", path, size,
                   MAX_RECORD_BYTES)
