"""`fg-sink json`: every record of a run, one JSON object per line, in seq order.

The lines are the records' own bytes (schema v1), so they carry the seed JsonLogger's fields (`event`,
`timestamp`, `global_step`, `epoch`, `metrics`, `meta`) and read with `jq` or
`pandas.read_json(path, lines=True)`. The file is fsynced at every checkpoint (`on_save`) and at the end.
Restarted, the sink drops a torn last line and continues after the last seq in the file.
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


def last_complete_record(path: Path) -> dict | None:
    """Truncate a torn last line (a crash mid-write) and return the last complete record."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        tail = b""
        pos = size
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        end = tail.rfind(b"\n") + 1
        if pos + end != size:
            logger.warning("%s: dropping a torn last line (%d bytes)", path, size - pos - end)
            f.truncate(pos + end)
        lines = tail[:end].splitlines()
        if not lines:
            return None
        try:
            return records.decode(lines[-1])
        except records.RecordError as e:
            raise ValueError(f"{path}: the last line is not a record ({e}); move the file away to start over") from None


class JsonSink(Sink):
    kind = "json"

    def __init__(self, out: str = DEFAULT_OUT):
        self.template = out
        self.path: Path | None = None
        self._file = None
        self.written = 0

    def open_run(self, info: RunInfo) -> int | None:
        self._close_file()
        self.path = Path(expand(self.template, info))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        position = None
        if self.path.exists() and self.path.stat().st_size:
            last = last_complete_record(self.path)
            # Only a file ending with this run's records is a position in it (a shared --out holds several).
            if last is not None and last["run"] == info.run_id:
                position = last["seq"] + 1
        self._file = open(self.path, "ab")
        return position if position is not None else None

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
