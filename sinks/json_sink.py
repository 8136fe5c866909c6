"""`fg-sink json`: every record of a run, one JSON object per line, in seq order.

The lines are the records' own bytes (schema v1), so they carry the seed JsonLogger's fields (`event`,
`timestamp`, `global_step`, `epoch`, `metrics`, `meta`) and read with `jq` or
`pandas.read_json(path, lines=True)`. The file is fsynced at every checkpoint (`on_save`) and at the end.
Restarted, the sink drops a torn last line and continues after the last seq in the file (for a torchrun
job, whose ranks' records are interleaved in one file: after each rank's last seq).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


from fg_bus import records
from fg_bus.registry import RunInfo

from .base import Sink, expand

logger = logging.getLogger(__name__)

DEFAULT_OUT = "{output_dir}/logs/{run}.jsonl"


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


def _decode_line(path: Path, line: bytes) -> dict:
    try:
        return records.decode(line)
    except records.RecordError as e:
        raise ValueError(f"{path}: a line is not a record ({e}); move the file away to start over") from None


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

    def __init__(self, out: str = DEFAULT_OUT, ranks: str = "all"):
        self.template = out
        self.ranks = ranks
        self.path: Path | None = None
        self._file = None
        self.written = 0

    def open_run(self, info: RunInfo) -> int | None:
        self._close_file()
        self.path = Path(expand(self.template, info))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        position = None
        if self.path.exists() and self.path.stat().st_size:
            drop_torn_tail(self.path)
            # Only a file ending with this run's records is a position in it (a shared --out holds several).
            position = positions_in(self.path, info.run_id, info.world_size) or None
        self._file = open(self.path, "ab")
        return position

    def handle(self, record: dict) -> None:
        self._file.write(records.encode(record))
        self._file.write(b"\n")
        self.written += 1
        if record["event"] in ("on_save", records.END):
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def end_run(self, status: str) -> None:
        if self._file is not None:
            self._sync()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._sync()
            finally:
                self._file.close()
                self._file = None

    def close(self) -> None:
        self._close_file()
