"""`fg-sink tb`: a run's metrics as TensorBoard event files, one run directory per run.

Scalars use transformers' TensorBoard naming: `on_log` metrics become `train/loss`,
`train/learning_rate`, `train/grad_norm`, ...; `eval_*` become `eval/*`, `test_*` become `test/*`. The
per-step values of `on_step_end` become `train/step_loss` and `train/step_grad_norm`; gradient statistics
(`grad_norm_*` from GradLogger) go under `grad/`. The run's `meta` is written as text (`run/meta`, with
configuration, name, description, date) and generated samples as text (`textgen/sample_N`). NaN stays NaN.

All scalars of one record go into one Event (one framing and two CRCs per record, rather than per
scalar). A sidecar, `fg-position.json`, records the event file's size and the next seq after every flush:
a restarted sink truncates the file to that size and continues from that seq, with no duplicate and no
hole. For a torchrun job, rank 0's figures are written by default; `--ranks all` adds each other rank's
in `RUN/rankN/` (its own event file and sidecar).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.text.summary_v2 import text_pb

from fg_bus import records
from fg_bus.registry import RunInfo, write_json_atomic

from .base import Sink, expand

logger = logging.getLogger(__name__)

DEFAULT_LOGDIR = "{output_dir}/tb"
POSITION_FILE = "fg-position.json"
_SKIP = {"epoch", "total_flos"}


def scalar_tag(key: str) -> str:
    for prefix in ("eval", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    if key.startswith("grad_norm_"):
        return f"grad/{key}"
    return f"train/{key}"


def _framed(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventFile:
    """An append-only TensorBoard event file written directly (no queue, no thread)."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        new = not path.exists()
        self._file = open(path, "ab")
        if truncate_to is not None:
            self._file.truncate(truncate_to)
            self._file.seek(0, os.SEEK_END)  # truncate() does not move the position tell() reports
        if new:
            event = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._file.write(_framed(event.SerializeToString()))

    def write(self, event: event_pb2.Event) -> None:
        self._file.write(_framed(event.SerializeToString()))

    def flush(self) -> int:
        self._file.flush()
        return self._file.tell()

    def sync(self) -> int:
        size = self.flush()
        os.fsync(self._file.fileno())
        return size

    def close(self) -> None:
        self._file.close()


class _RankLog:
    """One rank's event file and sidecar: rank 0 in the run's directory, rank N in its `rankN/` below it
    (TensorBoard lists that as a run of its own, RUN/rankN)."""

    def __init__(self, run_dir: Path, flush_secs: float):
        self.run_dir = run_dir
        self.flush_secs = flush_secs
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events: EventFile | None = None
        self.next_seq = 0
        self.last_flush = time.monotonic()

    def open(self) -> int | None:
        """Resume from the sidecar (returns the next seq), or start a new event file (returns None)."""
        position_path = self.run_dir / POSITION_FILE
        if position_path.exists():
            position = json.loads(position_path.read_text())
            events_path = self.run_dir / position["file"]
            if events_path.exists() and events_path.stat().st_size >= position["size"]:
                self.events = EventFile(events_path, truncate_to=position["size"])
                self.next_seq = position["next_seq"]
                return self.next_seq
            logger.warning("%s: the event file %s is missing or shorter than recorded; writing the run anew",
                           self.run_dir, position["file"])
            if events_path.exists():
                events_path.rename(events_path.with_name(events_path.name + ".broken"))
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.fg"
        self.events = EventFile(self.run_dir / name)
        self.next_seq = 0
        self._save_position(self.events.flush())
        return None

    def write(self, event, seq: int, durable: bool) -> None:
        if event is not None:
            self.events.write(event)
        self.next_seq = seq + 1
        if durable:
            self.flush(durable=True)
        elif time.monotonic() - self.last_flush > self.flush_secs:
            self.flush()

    def _save_position(self, size: int) -> None:
        write_json_atomic(self.run_dir / POSITION_FILE,
                          {"file": self.events.path.name, "size": size, "next_seq": self.next_seq})

    def flush(self, durable: bool = False) -> None:
        size = self.events.sync() if durable else self.events.flush()
        self._save_position(size)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if self.events is not None:
            try:
                self.flush(durable=True)
            finally:
                self.events.close()
                self.events = None


class TensorBoardSink(Sink):
    """`ranks`: "0" (default) writes rank 0's figures; "all" or a list such as "0,1" also writes each other
    rank's under RUN/rankN."""

    kind = "tb"

    def __init__(self, logdir: str = DEFAULT_LOGDIR, flush_secs: float = 2.0, ranks: str = "0"):
        self.logdir_template = logdir
        self.flush_secs = flush_secs
        self.ranks = ranks
        self.run_dir: Path | None = None
        self.logs: dict[int, _RankLog] = {}
        self.scalars_written = 0

    @property
    def events(self) -> EventFile | None:
        """Rank 0's event file."""
        log = self.logs.get(0)
        return log.events if log is not None else None

    # -- run lifecycle ---------------------------------------------------------------------------------

    def open_run(self, info: RunInfo) -> dict[int, int]:
        from .runner import ranks_to_follow

        self._close_logs()
        self.run_dir = Path(expand(self.logdir_template, info)) / info.run_id
        positions = {}
        for rank in ranks_to_follow(self.ranks, info):
            log = self.logs[rank] = _RankLog(self.run_dir if rank == 0 else self.run_dir / f"rank{rank}",
                                             self.flush_secs)
            position = log.open()
            if position is not None:
                positions[rank] = position
        return positions or None

    # -- records ---------------------------------------------------------------------------------------

    def handle(self, record: dict) -> None:
        event = record["event"]
        step = record.get("global_step") or 0
        values = []
        if event == "on_log":
            values = self._scalars(record.get("metrics") or {}, scalar_tag)
        elif event == "on_step_end":
            values = self._scalars(record.get("metrics") or {}, lambda k: f"train/step_{k}")
        elif event == "grad_stats":
            values = self._scalars(record.get("metrics") or {}, lambda k: f"grad/{k}")
        elif event == "on_train_begin" and record.get("meta"):
            values = list(text_pb("run/meta", _meta_markdown(record)).value)
        elif event == "textgen" and record.get("text") is not None:
            index = record.get("prompt_index", 0)
            text = f"**{record.get('prompt', '')}**{record.get('text', '')}"
            values = list(text_pb(f"textgen/sample_{index}", text).value)
        tb_event = None
        if values:
            wall = _wall_time(record)
            tb_event = event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(value=values))
            self.scalars_written += len(values)
        self.logs[record["rank"]].write(tb_event, record["seq"], durable=event in ("on_save", records.END))

    @staticmethod
    def _scalars(metrics: dict, tag) -> list:
        out = []
        for key, value in metrics.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out.append(summary_pb2.Summary.Value(tag=tag(key), simple_value=float(value)))
        return out

    def end_run(self, status: str) -> None:
        for log in self.logs.values():
            if log.events is not None:
                log.flush(durable=True)

    def _close_logs(self) -> None:
        logs, self.logs = self.logs, {}
        for log in logs.values():
            log.close()

    def close(self) -> None:
        self._close_logs()


def _wall_time(record: dict) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(record["timestamp"]).timestamp()
    except (TypeError, ValueError):
        return time.time()


def _meta_markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"**run** `{record['run']}`  ", f"**date** {record['timestamp']}  "]
    for key in ("name", "description", "experiment", "date"):
        if meta.get(key):
            lines.append(f"**{key}** {meta[key]}  ")
    lines += ["", "```json", json.dumps(meta, indent=1, default=str), "```"]
    return "\n".join(lines)
