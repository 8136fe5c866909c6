"""The append-only journal: one encoded record per line, in seq order, for one (run, rank).

The writer belongs to the bus thread. It keeps the byte offset of every record of the live segment so a
replay from any seq is one seek and one sequential read; sealed segments are compressed (zstd, seekable
frames: see `_segments`), and a replay from a seq in one decompresses at most one frame before it. A reader
needs no trainer: it reads the files, sealed segments then the live one, and a last line without its
newline (the writer was killed mid-write) is detected as torn and skipped, never misread.
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import orjson
import zstandard

from . import _segments
from .records import MAX_RECORD_BYTES, RecordError, all_valid, decode, may_hold_nonfinite, validate

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # replay reads and sends the journal in pieces of about this size

#: Every file of a journal (given its live segment's path): what it occupies on disk, what deleting it means.
journal_files = _segments.journal_files
#: The whole lines of about a journal's last N bytes, across its live segment and the one sealed before.
journal_tail_bytes = _segments.tail


class _Sealed:
    """A sealed segment as the writer serves it: from its plain file and per-record offsets until its `.zst`
    is in place, then from the `.zst` and its frame index (a few entries per MiB: the offsets are dropped)."""

    __slots__ = ("first", "end", "plain", "offsets", "size", "index", "seal")

    def __init__(self, first: int, end: int, plain: Path, offsets: array, size: int):
        self.first, self.end, self.plain = first, end, plain  # records first..end-1
        self.offsets: array | None = offsets
        self.size = size
        self.index: _segments.FrameIndex | None = None
        self.seal: Future | None = None  # the compression in progress in the seal thread

    @property
    def zst(self) -> Path:
        return self.plain.with_name(self.plain.name + ".zst")


class JournalWriter:
    """The journal of one (run, rank), written by the bus thread.

    The live segment is the plain file at `path`; past `segment_bytes` (FG_JOURNAL_SEGMENT_BYTES, 8 MiB by
    default) it is sealed under its first seq's name and a new live segment starts at `path`, and a seal
    thread compresses the sealed one (`_segments.compress`), off the bus thread's way. Memory: one offset
    per record of the live segment (and of a sealed one until its `.zst` is in place), a few index entries
    per MiB of a compressed one."""

    def __init__(self, path: str | os.PathLike, segment_bytes: int | None = None):
        self.path = Path(path)
        self.segment_bytes = _segments.segment_bytes() if segment_bytes is None else segment_bytes
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=1 << 16)
        # One read handle, opened with the writer, serves every replay of the live segment (os.pread at its
        # offsets): a flood of replay requests costs no file descriptor, and the journal stays readable if its
        # path is deleted. A sealed segment is opened for the one piece read from it.
        self._read_fd = os.open(self.path, os.O_RDONLY)
        self._first = 0  # the seq of the live segment's first record
        self._offsets = array("q")  # byte offset in the live segment of record seq _first + i
        self._size = 0
        self._seal_at = self.segment_bytes
        self._sealed: list[_Sealed] = []
        self._sealing: list[_Sealed] = []  # those being compressed
        self._sealer: ThreadPoolExecutor | None = None  # started at the first seal, joined at close
        self._dctx = zstandard.ZstdDecompressor()
        self._unsynced_seal = False  # a seal since the last sync: the directory is fsynced too
        self._seal_failing = False  # the last compression failed (said once until one works again)
        self.failed: OSError | None = None

    @property
    def next_seq(self) -> int:
        return self._first + len(self._offsets)

    def append(self, data: bytes) -> None:
        """Append the record with seq == next_seq. A write error is kept in `failed` (raised once)."""
        error = self._seal_live() if self.failed is None and self._size >= self._seal_at else None
        self._offsets.append(self._size)
        self._size += len(data) + 1
        if error is not None:
            raise error
        if self.failed is not None:
            return
        try:
            self._file.write(data)
            self._file.write(b"\n")
        except OSError as e:
            self.failed = e
            raise

    def _seal_live(self) -> OSError | None:
        """Seal the live segment and start a new one at the path. The sealed records get their sealed name as
        a second link first, then an empty file is renamed over the path: the path never lacks a journal, and a
        reader meeting both names of one file reads it once. Returns the write error met flushing (kept in
        `failed`); a seal that cannot be done otherwise is logged, and tried again one segment later."""
        try:
            self._file.flush()
        except OSError as e:
            self.failed = e
            return e
        sealed = _Sealed(self._first, self.next_seq, _segments.sealed_path(self.path, self._first), self._offsets,
                         self._size)
        tmp = self.path.with_name(f".{self.path.name}.next")
        try:
            os.link(self.path, sealed.plain)
            fds = []
            try:
                fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW, 0o600))
                fds.append(os.open(tmp, os.O_RDONLY))
                os.rename(tmp, self.path)
            except OSError:
                for fd in fds:
                    os.close(fd)
                tmp.unlink(missing_ok=True)
                sealed.plain.unlink(missing_ok=True)
                raise
        except OSError as e:
            self._seal_at = self._size + self.segment_bytes
            logger.warning("journal %s: could not seal the live segment at %d bytes (%s: %s); it goes on, sealed "
                           "%d bytes later", self.path, self._size, type(e).__name__, e, self.segment_bytes)
            return None
        old_file, old_fd = self._file, self._read_fd
        self._file, self._read_fd = os.fdopen(fds[0], "ab", buffering=1 << 16), fds[1]
        old_file.close()  # flushed above: nothing left to write
        os.close(old_fd)
        self._first, self._offsets, self._size, self._seal_at = sealed.end, array("q"), 0, self.segment_bytes
        self._sealed.append(sealed)
        self._unsynced_seal = True
        self._start_seals()
        return None

    def _start_seals(self) -> None:
        """Compress, in the seal thread, every sealed segment still plain: the one just sealed, and any whose
        compression failed before (a full disk: it is tried again at each seal)."""
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fg-journal-seal-{self.path.name}")
        self._adopt_seals()
        for s in self._sealed:
            if s.index is None and s.seal is None:
                s.seal = self._sealer.submit(_segments.compress, s.plain, s.first, s.offsets, s.size)
                self._sealing.append(s)

    def _adopt_seals(self) -> None:
        """The compressions done: serve those segments from their `.zst`, drop their offsets, remove their plain
        file (only now: the `.zst` is fsynced and in place). One that failed stays plain and is served so."""
        still = []
        for s in self._sealing:
            if not s.seal.done():
                still.append(s)
                continue
            future, s.seal = s.seal, None
            try:
                s.index = future.result()
            except (OSError, zstandard.ZstdError) as e:
                if not self._seal_failing:  # once until a compression works again, not at every try
                    logger.warning("journal %s: could not compress the sealed segment %s (%s: %s); it stays plain, "
                                   "tried again at the next seal", self.path, s.plain.name, type(e).__name__, e)
                self._seal_failing = True
                continue
            self._seal_failing = False
            s.offsets = None
            try:
                s.plain.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # both stay: a reader reads either
                logger.warning("journal %s: could not remove %s after compressing it: %s", self.path, s.plain.name, e)
        self._sealing = still

    def flush(self) -> None:
        if self._sealing:
            self._adopt_seals()
        if self.failed is None:
            try:
                self._file.flush()
            except OSError as e:
                self.failed = e
                raise

    def sync(self) -> None:
        """Flush and fsync: durable on disk (at checkpoints and at the end), a seal's new names too."""
        self.flush()
        if self.failed is None:
            os.fsync(self._file.fileno())
            if self._unsynced_seal:
                _segments.fsync_dir(self.path.parent)
                self._unsynced_seal = False

    def complete_on_disk(self) -> int:
        """How many records (seq 0..n-1) are wholly in the journal: after a write error, the rest are not.
        Pushes what is still buffered first (as much as the disk takes). Only the live segment is written to,
        so only it can be short."""
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass
        try:
            size = os.fstat(self._file.fileno()).st_size
        except (OSError, ValueError):
            return self._first
        ends = self._offsets[1:]
        ends.append(self._size)
        return self._first + bisect.bisect_right(ends, size)

    def read_chunks(self, from_seq: int, to_seq: int) -> Iterator[bytes]:
        """Raw lines for seq in [from_seq, to_seq), in pieces of about CHUNK_BYTES (a compressed segment: one
        frame) that end at a newline. Each piece is found afresh from its seq, so a seal completed between two
        pieces changes nothing, and any number of these may be in progress at once."""
        self.flush()
        seq, to_seq = from_seq, min(to_seq, self.next_seq)
        while seq < to_seq:
            piece = self._piece(seq, to_seq)
            if not piece:
                return
            seq += piece.count(b"\n")
            yield piece

    def _piece(self, seq: int, to_seq: int) -> bytes:
        """Whole lines from seq `seq` on, up to `to_seq` and within one segment (one frame of a compressed one)."""
        if seq >= self._first:
            return _plain_piece(self._read_fd, self._offsets, self._size, seq - self._first, to_seq - self._first)
        s = self._sealed[bisect.bisect_right(self._sealed, seq, key=lambda s: s.first) - 1]
        stop = min(to_seq, s.end)
        fd = os.open(s.plain if s.index is None else s.zst, os.O_RDONLY)
        try:
            if s.index is None:
                return _plain_piece(fd, s.offsets, s.size, seq - s.first, stop - s.first)
            k = s.index.frame_of(seq)
            frame = _segments.read_frame(fd, s.index, k, self._dctx)
        finally:
            os.close(fd)
        first = s.index.firsts[k]
        start = _after_lines(frame, 0, seq - first)
        frame_end = s.index.firsts[k + 1] if k + 1 < len(s.index.firsts) else s.end
        return frame[start:] if stop >= frame_end else frame[start:_after_lines(frame, start, stop - seq)]

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
        """Write the live segment back at its path from the open read handle, then append to that new file.
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
        """Sync, let a compression in progress finish (a failed one leaves its plain segment), close."""
        try:
            self.sync()
        except OSError as e:
            logger.error("journal %s: final flush failed: %s", self.path, e)
        finally:
            if self._sealer is not None:
                self._sealer.shutdown(wait=True)
                self._adopt_seals()
            try:
                self._file.close()
            except OSError:
                pass
            try:
                os.close(self._read_fd)
            except OSError:
                pass


def _plain_piece(fd: int, offsets: array, size: int, i: int, j: int) -> bytes:
    """Whole lines of records i..j-1 of a plain segment (their `offsets` in it, `size` its end), from its
    start: about CHUNK_BYTES, or one record read whole if it is longer."""
    start = offsets[i]
    end = offsets[j] if j < len(offsets) else size
    piece = os.pread(fd, min(CHUNK_BYTES, end - start), start)
    if not piece or start + len(piece) >= end:
        return piece
    cut = piece.rfind(b"\n") + 1
    if cut:
        return piece[:cut]
    k = bisect.bisect_right(offsets, start)  # one record longer than a chunk: read to its end
    return os.pread(fd, (offsets[k] if k < len(offsets) else size) - start, start)


def _after_lines(data: bytes, pos: int, n: int) -> int:
    """The position just after the n-th newline from `pos` (the end if there are fewer)."""
    for _ in range(n):
        pos = data.find(b"\n", pos) + 1
        if not pos:
            return len(data)
    return pos


class JournalStats:
    def __init__(self):
        self.records = 0
        self.torn_tail = False
        self.malformed: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1


def decode_chunk(chunk: bytes, stats: JournalStats | None = None) -> list[dict]:
    """Decode the complete lines of a chunk; malformed ones are counted in `stats` and skipped.

    Fast path: the whole chunk parsed as one JSON array (one orjson call instead of one per line) and
    checked field by field over the whole list (`records.all_valid`), with the cyclic garbage collector
    paused meanwhile: a chunk is thousands of fresh dicts that hold no cycles, and letting the collector
    walk them as they are made costs about a third of the parse. A chunk that may hold non-finite floats
    is validated record by record (they are restored then); if any line is not a JSON value on its own,
    every line is parsed separately to find and skip it."""
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
        if values is not None and len(values) == body.count(b"\n") + 1:
            restore = may_hold_nonfinite(body)
            if not restore and all_valid(values):
                return values
            return _validated(values, restore, stats)
        out = []
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


def _validated(values: list, restore: bool, stats: JournalStats | None) -> list[dict]:
    """The values that are records, one `validate` each (restoring non-finite floats); the others skipped."""
    out = []
    for value in values:
        try:
            out.append(validate(value, restore))
        except RecordError as e:
            _skip(e, stats)
    return out


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
    """Every record with seq >= from_seq, read from the journal's files alone (`journal_chunks`). A torn
    last line is skipped, and so is a line longer than MAX_RECORD_BYTES (counted as "too-large"); the
    records after it are still read. A damaged compressed segment is skipped (counted as "damaged-segment")."""
    stats = stats if stats is not None else JournalStats()
    last = -1  # the last seq read from a sealed segment
    for chunk, live in journal_chunks(path, from_seq, stats):
        for record in decode_chunk(chunk, stats):
            seq = record["seq"]
            if not live:
                last = max(last, seq)
            if seq >= from_seq and (not live or seq > last):
                stats.records += 1
                yield record


def journal_chunks(path: str | os.PathLike, from_seq: int = 0,
                   stats: JournalStats | None = None) -> Iterator[tuple[bytes, bool]]:
    """The journal's complete lines in pieces, in seq order, each with whether it is from the live segment:
    its sealed segments from the one that holds `from_seq` (a compressed one from the frame that does:
    the first piece may hold earlier records), then the live segment at `path`.

    The live segment is opened first: if the writer seals it meanwhile, that open file is the segment just
    sealed, read a second time; so a reader skips live records whose seq is not past the last sealed one
    (read_journal does). A damaged compressed segment is skipped, counted in `stats`."""
    stats = stats if stats is not None else JournalStats()
    path = Path(path)
    with open(path, "rb") as live:
        sealed = _segments.sealed_segments(path)
        for files in sealed[max(bisect.bisect_right(sealed, from_seq, key=lambda s: s.first) - 1, 0):]:
            try:
                for chunk in _complete_lines(_segments.plain_pieces(files, from_seq, CHUNK_BYTES),
                                             files.plain or files.zst, stats):
                    yield chunk, False
            except _segments.CorruptSegment as e:
                stats.count("damaged-segment")
                logger.error("%s: skipping the journal segment that starts at seq %d: %s", path, files.first, e)
        for chunk in _complete_lines(iter(lambda: live.read(CHUNK_BYTES), b""), path, stats):
            yield chunk, True


def _complete_lines(pieces: Iterator[bytes], path, stats: JournalStats) -> Iterator[bytes]:
    """A segment's pieces re-cut into pieces of whole lines. Linear in its size: a line longer than a piece
    is kept as a list of pieces and joined once, when its newline comes (`pending += piece` would copy it at
    every piece), and one longer than MAX_RECORD_BYTES is dropped as it is read, never held whole."""
    held: list[bytes] = []  # the start of a line whose newline has not come yet
    held_bytes = 0
    oversized = False  # the held line is over the bound: its pieces are dropped until its newline
    for piece in pieces:
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
