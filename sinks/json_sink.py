"""`fg-sink json`: every record of a run, one JSON object per line, in seq order.

The lines are the records' own bytes (schema v1), so they carry the seed JsonLogger's fields (`event`,
`timestamp`, `global_step`, `epoch`, `metrics`, `meta`) and read with `jq` or
`pandas.read_json(path, lines=True)`. The file is fsynced at every checkpoint (`on_save`) and at the end.
Restarted, the sink drops a torn last line and continues after the last seq in the file (for a torchrun
job, whose ranks' records are interleaved in one file: after each rank's last seq).

One writer per file: a hidden lock file beside it (`.NAME.lock`, holding the writer's pid) refuses a
second sink. An existing file is checked to be a log of records (its first and last complete lines)
before anything is written or truncated; a file that is not is left as it was. New files are 0600 and new
directories 0700 (0640/0750 with `group_readable`). A write that fails for a full disk keeps the bytes
(`AppendFile`) and `retry_write()` writes them when space returns.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fg_bus import records
from fg_bus.registry import RunInfo

from ._output import AppendFile, OutputError, OutputLock, dir_mode, file_mode, make_dirs
from .base import Sink, expand

logger = logging.getLogger(__name__)

DEFAULT_OUT = "{output_dir}/logs/{run}.jsonl"
#: A checkpoint's record, found in encoded lines without a decode: a top-level field (`encode`
#: escapes a quote inside a string); without the closing quote, so the search skips on a rarer last byte. A
#: nested or longer match only syncs once more.
_SAVE_EVENT = b'"event":"on_sav'


def drop_torn_tail(path: Path) -> None:
    """Truncate a last line without its newline (the writer died mid-line)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        tail = b""
        pos = size
        while pos > 0 and b"\n" not in tail:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        end = tail.rfind(b"\n") + 1
        if pos + end != size:
            logger.warning("%s: dropping a torn last line (%d bytes)", path, size - pos - end)
            f.truncate(pos + end)


def _records_backwards(path: Path, block: int = 1 << 16):
    """The file's records from the last line to the first (read in blocks from the end)."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        pending = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            pending = f.read(step) + pending
            lines = pending.split(b"\n")
            pending = lines[0]  # may be the end of a line that starts in an earlier block
            for line in reversed(lines[1:]):
                if line:
                    yield _decode_line(path, line)
        if pending:
            yield _decode_line(path, pending)


def _decode_line(path: Path, line: bytes, which: str = "a line") -> dict:
    try:
        return records.decode(line)
    except records.RecordError as e:
        raise OutputError(f"{path}: {which} is not a record ({e}); it is not a log fg-sink json wrote, and was "
                          "left as it was: move the file away to start over, or choose another --out") from None


#: the longest first line checked for being a record (a record is far smaller; a binary file has no newline)
_FIRST_LINE_LIMIT = 64 << 20


def check_record_log(path: Path) -> None:
    """Refuse (OutputError, naming the file) a non-empty file that is not a log of records: its first line and
    its last complete line must decode as records; a file with no complete line must look like a record torn
    mid-line. Reads only: a file that is not ours is left exactly as it was."""
    with open(path, "rb") as f:
        first = f.readline(_FIRST_LINE_LIMIT)
    if not first:
        return
    if not first.endswith(b"\n"):
        if first.startswith(b'{"v":') and len(first) < _FIRST_LINE_LIMIT:
            return  # a sink died while writing its first record: drop_torn_tail removes it
        raise OutputError(f"{path}: its first line is not a record (no newline in its first "
                          f"{min(len(first), _FIRST_LINE_LIMIT):,} bytes); it is not a log fg-sink json wrote, and "
                          "was left as it was: move the file away to start over, or choose another --out")
    _decode_line(path, first.rstrip(b"\n"), "its first line")
    _decode_line(path, _last_complete_line(path), "its last complete line")


def _last_complete_line(path: Path) -> bytes:
    """The last line that has its newline (a torn tail after it is ignored), without the newline."""
    with open(path, "rb") as f:
        end = _rfind_newline(f, f.seek(0, os.SEEK_END))
        start = _rfind_newline(f, end) + 1
        f.seek(start)
        return f.read(end - start)


def _rfind_newline(f, before: int, block: int = 1 << 16) -> int:
    """The offset of the last newline before `before`, reading back in blocks; -1 if there is none."""
    pos = before
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        found = f.read(step).rfind(b"\n")
        if found >= 0:
            return pos + found
    return -1


def positions_in(path: Path, run_id: str, ranks: int) -> dict[int, int]:
    """The next seq of each rank of `run_id` in the file, read from the end: only the block of this run's
    lines at the end of the file counts (a shared --out holds several runs, one after another)."""
    found: dict[int, int] = {}
    for record in _records_backwards(path):
        if record["run"] != run_id or len(found) == ranks:
            break
        found.setdefault(record["rank"], record["seq"] + 1)
    return found


class JsonSink(Sink):
    kind = "json"

    def __init__(self, out: str = DEFAULT_OUT, ranks: str = "all", group_readable: bool = False):
        self.template = out
        self.ranks = ranks
        self.group_readable = group_readable
        self.path: Path | None = None
        self._file: AppendFile | None = None
        self._lock: OutputLock | None = None
        self.written = 0

    def open_run(self, info: RunInfo) -> int | None:
        self._close_file()
        path = Path(expand(self.template, info))
        if path.is_dir():
            raise OutputError(f"--out {path} is a directory; give a file name (default {DEFAULT_OUT})")
        make_dirs(path.parent, dir_mode(self.group_readable))
        if path.exists():
            check_record_log(path)  # before the lock file is made beside it: touch nothing that is not ours
        self._lock_for(path)
        self.path = path
        position = None
        try:
            if path.exists() and path.stat().st_size:
                drop_torn_tail(path)
                # Only a file ending with this run's records is a position in it (a shared --out holds several).
                position = positions_in(path, info.run_id, info.world_size) or None
            self._file = AppendFile(path, file_mode(self.group_readable))
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None
        return position

    def _lock_for(self, path: Path) -> None:
        """Hold the lock of `path` (kept across runs of a --follow that share one file)."""
        if self._lock is not None and self._lock.path == lock_path(path):
            return
        self._release_lock()
        self._lock = OutputLock(lock_path(path), f"the JSON log {path}", file_mode(self.group_readable)).acquire()

    #: records come as their lines (`handle_raw`): written as they are, never decoded and encoded again
    raw = True

    def handle(self, record: dict) -> None:
        """One record (in-process use; `fg-sink json` goes through `handle_raw`): the same bytes."""
        self._file.write(records.encode(record) + b"\n")
        self.written += 1
        if record["event"] in ("on_save", records.END):
            self._sync()

    def handle_raw(self, data: bytes, rank: int, first_seq: int, last_seq: int) -> None:
        """Lines as the bus encodes them: appended as they are. Synced, as `handle` is, when they hold a
        checkpoint (the end record never comes raw: `handle` syncs it)."""
        self._file.write(data)
        self.written += last_seq - first_seq + 1
        if _SAVE_EVENT in data:
            self._sync()

    def retry_write(self) -> None:
        """After a full disk: write what is still held (raises OSError while there is no room)."""
        if self._file is not None:
            self._sync()

    def _sync(self) -> None:
        self._file.sync()

    def end_run(self, status: str) -> None:
        if self._file is not None:
            self._sync()

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.sync()
            finally:
                file.close()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        try:
            self._close_file()
        finally:
            self._release_lock()


def lock_path(path: Path) -> Path:
    """The lock beside a JSON log: hidden, so `ls` and globs over the logs do not see it."""
    return path.with_name(f".{path.name}.lock")
