"""The journal's sealed segments: how they are named, listed, compressed and read.

A journal is a live segment, the plain file at the journal's path (`journal.rank0.jsonl`, where every tool
looks for it), and the segments sealed before it, named by the seq of their first record:
`journal.rank0.00000000000000123456.jsonl` while plain, `....jsonl.zst` once compressed. A segment holds
the records from its first seq to the next segment's first (the live one holds the rest).

A compressed segment is a series of independent zstd frames of whole records (about FRAME_BYTES of plain
bytes each), then one zstd skippable frame holding its index (the first seq and byte offset of every
frame), so a reader starts at any seq by decompressing one frame. `zstd -dc` skips the index frame: it
prints the segment's lines as they were.

The seal is crash-safe at every point: the `.zst` is written as `.zst.tmp`, fsynced, renamed into place
(and the directory fsynced) before the plain file is removed. A reader therefore ignores `.tmp` files and,
for a segment found both plain and compressed, reads the plain one (falling back to the `.zst` if the
plain one is removed meanwhile).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

#: A live segment is sealed once it holds this many bytes (a record is never split). FG_JOURNAL_SEGMENT_BYTES
#: overrides it (tests use small segments).
SEGMENT_BYTES = 8 << 20
#: Plain bytes per zstd frame: a replay from any seq decompresses at most this much (plus one record) first.
FRAME_BYTES = 1 << 18
#: zstd's level: 3 compresses the journal about 10x at a few hundred MB/s, off the training thread.
LEVEL = 3

_SKIPPABLE_MAGIC = 0x184D2A5E  # a zstd skippable frame (0x184D2A50..5F): decoders step over it
_INDEX_TAG = b"FGJI"  # the last 4 bytes of a compressed segment: its index frame is there
_FOOTER = struct.Struct("<I4s")  # frame count, tag
_ENTRY = 16  # first seq (int64), byte offset (int64)
_NAME = re.compile(r"(\d{20})\.jsonl(\.zst)?")


def segment_bytes() -> int:
    """The size at which the live segment is sealed: FG_JOURNAL_SEGMENT_BYTES, else SEGMENT_BYTES."""
    value = os.environ.get("FG_JOURNAL_SEGMENT_BYTES")
    if value is None:
        return SEGMENT_BYTES
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"FG_JOURNAL_SEGMENT_BYTES must be a number of bytes, not {value!r}") from None
    if size < 1:
        raise ValueError(f"FG_JOURNAL_SEGMENT_BYTES must be at least 1, not {size}")
    return size


def sealed_path(live: Path, first: int, compressed: bool = False) -> Path:
    """The name of the sealed segment of `live`'s journal whose first record has seq `first`."""
    return live.with_name(f"{_prefix(live)}{first:020d}.jsonl{'.zst' if compressed else ''}")


def _prefix(live: Path) -> str:
    name = live.name
    return (name[:-len(".jsonl")] if name.endswith(".jsonl") else name) + "."


@dataclass
class SealedFiles:
    """One sealed segment as found on disk: its plain file, its compressed one, or both (a seal cut short)."""

    first: int
    plain: Path | None = None
    zst: Path | None = None


def sealed_segments(live: str | os.PathLike) -> list[SealedFiles]:
    """The sealed segments of the journal whose live segment is `live`, in seq order (none if the
    directory cannot be read). Partial `.zst.tmp` files are not segments."""
    live = Path(live)
    prefix = _prefix(live)
    found: dict[int, SealedFiles] = {}
    try:
        names = os.listdir(live.parent)
    except OSError:
        return []
    for name in names:
        if not name.startswith(prefix) or (m := _NAME.fullmatch(name, len(prefix))) is None:
            continue
        files = found.setdefault(int(m[1]), SealedFiles(int(m[1])))
        if m[2]:
            files.zst = live.parent / name
        else:
            files.plain = live.parent / name
    return [found[first] for first in sorted(found)]


def journal_files(live: str | os.PathLike) -> list[Path]:
    """Every file of the journal: its sealed segments (both forms of one cut short, and a partial `.zst.tmp`)
    and its live segment, the ones that exist. What the journal occupies on disk, and what deleting it means."""
    live = Path(live)
    files = [p for s in sealed_segments(live) for p in (s.plain, s.zst) if p is not None]
    return files + partial_seals(live) + ([live] if live.exists() else [])


def partial_seals(live: str | os.PathLike) -> list[Path]:
    """The `.zst.tmp` files of `live`'s journal: compressions cut short (by a crash, or in progress)."""
    live = Path(live)
    return sorted(live.parent.glob(f"{_prefix(live)}*.jsonl.zst.tmp"))


@dataclass
class FrameIndex:
    """Where each frame of a compressed segment starts: its first record's seq and its byte offset; frame
    k ends where k + 1 starts, the last one at `end` (the index frame)."""

    firsts: array
    offsets: array
    end: int

    def frame_of(self, seq: int) -> int:
        """The frame that holds `seq` (the first one for a seq before the segment)."""
        return max(bisect.bisect_right(self.firsts, seq) - 1, 0)

    def span(self, k: int) -> tuple[int, int]:
        start = self.offsets[k]
        return start, self.offsets[k + 1] if k + 1 < len(self.offsets) else self.end


class CorruptSegment(OSError):
    """A compressed segment whose index or frames cannot be read (a damaged file)."""


def compress(plain: Path, first: int, offsets: array, size: int) -> FrameIndex:
    """Write the sealed segment `plain` (records `first`... at `offsets`, `size` bytes) as its `.zst`, durably:
    written to `.zst.tmp`, fsynced, renamed, the directory fsynced. Runs in the journal's seal thread: zstd
    and the file system release the GIL. Raises OSError (a full disk, ...) with nothing left behind but
    the plain segment."""
    target = plain.with_name(plain.name + ".zst")
    tmp = target.with_name(target.name + ".tmp")
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    firsts, starts = array("q"), array("q")
    src = os.open(plain, os.O_RDONLY)
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            written, i = 0, 0
            while i < len(offsets):
                j = bisect.bisect_left(offsets, offsets[i] + FRAME_BYTES, i + 1)  # at least one record
                end = offsets[j] if j < len(offsets) else size
                frame = cctx.compress(_pread_exactly(src, end - offsets[i], offsets[i]))
                firsts.append(first + i)
                starts.append(written)
                written += _write_all(out, frame)
                i = j
            _write_all(out, _index_frame(firsts, starts))
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(src)
    fsync_dir(target.parent)
    return FrameIndex(firsts, starts, written)


def _index_frame(firsts: array, starts: array) -> bytes:
    entries = b"".join(struct.pack("<qq", f, s) for f, s in zip(firsts, starts))
    payload = entries + _FOOTER.pack(len(firsts), _INDEX_TAG)
    return struct.pack("<II", _SKIPPABLE_MAGIC, len(payload)) + payload


def read_index(fd: int) -> FrameIndex:
    """The index at the end of the compressed segment open at `fd`; CorruptSegment if it has none."""
    size = os.fstat(fd).st_size
    if size < 8 + _FOOTER.size:
        raise CorruptSegment(f"a compressed journal segment of {size} bytes has no index")
    count, tag = _FOOTER.unpack(os.pread(fd, _FOOTER.size, size - _FOOTER.size))
    end = size - _FOOTER.size - count * _ENTRY - 8
    if tag != _INDEX_TAG or end < 0:
        raise CorruptSegment("a compressed journal segment without its index (cut short or damaged)")
    magic, length = struct.unpack("<II", os.pread(fd, 8, end))
    entries = os.pread(fd, count * _ENTRY, end + 8)
    if magic != _SKIPPABLE_MAGIC or length != count * _ENTRY + _FOOTER.size or len(entries) != count * _ENTRY:
        raise CorruptSegment("a compressed journal segment whose index frame is damaged")
    pairs = array("q", entries)
    return FrameIndex(pairs[0::2], pairs[1::2], end)


def read_frame(fd: int, index: FrameIndex, k: int, dctx: zstandard.ZstdDecompressor) -> bytes:
    """Frame k's plain bytes (whole records)."""
    start, end = index.span(k)
    try:
        return dctx.decompress(_pread_exactly(fd, end - start, start))
    except zstandard.ZstdError as e:
        raise CorruptSegment(f"a compressed journal segment's frame {k} cannot be decompressed: {e}") from e


def plain_pieces(files: SealedFiles, from_seq: int, piece_bytes: int) -> Iterator[bytes]:
    """The segment's plain bytes in pieces, from the frame that holds `from_seq` on for a compressed one
    (a plain one from its start, in pieces of `piece_bytes`). The plain file is read if it is there; if it
    was removed meanwhile (its seal just completed), the `.zst`."""
    if files.plain is not None:
        try:
            f = open(files.plain, "rb")
        except FileNotFoundError:
            if files.zst is None:
                files.zst = files.plain.with_name(files.plain.name + ".zst")
        else:
            with f:
                while piece := f.read(piece_bytes):
                    yield piece
            return
    fd = os.open(files.zst, os.O_RDONLY)
    try:
        index = read_index(fd)
        dctx = zstandard.ZstdDecompressor()
        for k in range(index.frame_of(from_seq), len(index.firsts)):
            yield read_frame(fd, index, k, dctx)
    finally:
        os.close(fd)


def tail(live: Path, max_bytes: int) -> bytes:
    """The whole lines in about the journal's last `max_bytes`, across the live segment and the one sealed
    before it (just after a seal the live segment is nearly empty). Raises OSError if the live one cannot be
    read; a sealed one that cannot is left out."""
    with open(live, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        data = f.read(max_bytes)
        live_id = _file_id(os.fstat(f.fileno()))
    cut = size > max_bytes  # the first line is cut
    sealed = sealed_segments(live) if not cut else []
    if sealed and sealed[-1].plain is not None and _same_file(sealed[-1].plain, live_id):
        sealed.pop()  # a seal cut short between its two steps: the live file under its sealed name too
    if sealed:
        try:
            before = b"".join(_last_pieces(sealed[-1], max_bytes - len(data)))
        except OSError:
            before = b""
        data, cut = before[-(max_bytes - len(data)):] + data, bool(before)
    if cut:
        data = data[data.find(b"\n") + 1:]
    return data[:data.rfind(b"\n") + 1]  # the last one may be torn


def _last_pieces(files: SealedFiles, want: int) -> list[bytes]:
    """About the last `want` plain bytes of a sealed segment (whole frames of a compressed one)."""
    if files.plain is not None:
        try:
            with open(files.plain, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - want))
                return [f.read(want)]
        except FileNotFoundError:
            files.zst = files.plain.with_name(files.plain.name + ".zst")
    fd = os.open(files.zst, os.O_RDONLY)
    try:
        index, dctx = read_index(fd), zstandard.ZstdDecompressor()
        pieces: list[bytes] = []
        k, got = len(index.firsts) - 1, 0
        while k >= 0 and got < want:
            pieces.insert(0, read_frame(fd, index, k, dctx))
            got, k = got + len(pieces[0]), k - 1
        return pieces
    finally:
        os.close(fd)


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _same_file(path: Path, file_id: tuple[int, int]) -> bool:
    try:
        return _file_id(os.stat(path)) == file_id
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a link) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_exactly(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:  # a short read (large sizes, signals): go on from where it stopped
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise CorruptSegment(f"a journal segment ends at {offset + len(data)}, before {offset + n}")
        data += more
    return data


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)
