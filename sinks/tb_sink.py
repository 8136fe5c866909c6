"""`fg-sink tb`: a run's metrics as TensorBoard event files, one run directory per run.

Scalars use transformers' TensorBoard naming: `on_log` metrics become `train/loss`,
`train/learning_rate`, `train/grad_norm`, ...; `eval_*` become `eval/*`, `test_*` become `test/*`. The
per-step values of `on_step_end` become `train/step_loss` and `train/step_grad_norm`; gradient statistics
(`grad_norm_*` from GradLogger) go under `grad/`; the `system` records' metrics (CPU, memory, disk, GPU:
`fg_bus._system`) under `system/`, at the step they were sampled at, with the sample's time as wall time.
Every `on_log` number is a scalar, `train/epoch` and `train/total_flos` included, as transformers writes
them. At train begin, as transformers' TensorBoardCallback: `args` and `model_config` as JSON text (tags
`args/text_summary`, `model_config/text_summary`, as torch's SummaryWriter names them); and
the run's `meta` (`run/meta`), its args as hyperparameters (TensorBoard's HParams dashboard), and the
seed's experiment info from TBLogger(name=..., description=...) (`run/experiment`). Generated samples are
text shown verbatim (`textgen/sample_N`, prompt and continuation in a fenced block), and how the run
ended (`run/end`: its status and why,
with a failure's innermost frame). NaN stays NaN.

All scalars of one record go into one Event (one framing and two CRCs per record, rather than per
scalar). A sidecar, `fg-position.json`, records the event file's size and the next seq after every flush:
a restarted sink truncates the file to that size and continues from that seq, with no duplicate and no
hole. For a torchrun job, rank 0's figures are written by default; `--ranks all` adds each other rank's
in `RUN/rankN/` (its own event file and sidecar).

One writer per run directory: `fg-sink.lock` in it (holding the writer's pid) refuses a second sink.
Files are 0600 and the directories it creates 0700 (0640/0750 with `group_readable`). A write that fails
for a full disk keeps the bytes, and `retry_write()` writes them (and the sidecar) when space returns.
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
from fg_bus.monitor import end_text, failure_frame
from fg_bus.registry import RunInfo, write_json_atomic

from ._output import AppendFile, OutputError, OutputLock, dir_mode, file_mode, make_dirs, released
from .base import Sink, expand, record_time

logger = logging.getLogger(__name__)

DEFAULT_LOGDIR = "{output_dir}/tb"
POSITION_FILE = "fg-position.json"
LOCK_FILE = "fg-sink.lock"
_EVENT_PREFIX = "events.out.tfevents."


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

    def __init__(self, path: Path, truncate_to: int | None = None, mode: int = 0o600):
        self.path = path
        new = not path.exists()
        self._file = AppendFile(path, mode)
        if truncate_to is not None:
            self._file.truncate(truncate_to)
        if new:
            event = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._file.write(_framed(event.SerializeToString()))

    def write(self, event: event_pb2.Event) -> None:
        self._file.write(_framed(event.SerializeToString()))

    def flush(self) -> int:
        return self._file.flush()

    def sync(self) -> int:
        return self._file.sync()

    def close(self) -> None:
        self._file.close()


class _RankLog:
    """One rank's event file and sidecar: rank 0 in the run's directory, rank N in its `rankN/` below it
    (TensorBoard lists that as a run of its own, RUN/rankN)."""

    def __init__(self, run_dir: Path, flush_secs: float, group_readable: bool = False):
        self.run_dir = run_dir
        self.flush_secs = flush_secs
        self.mode = file_mode(group_readable)
        make_dirs(self.run_dir, dir_mode(group_readable))
        self.events: EventFile | None = None
        self.next_seq = 0
        self.last_flush = time.monotonic()
        self._lock: OutputLock | None = None

    def open(self) -> int | None:
        """Lock the directory, then resume from the sidecar (returns the next seq), or start a new event file
        (returns None)."""
        self._lock = OutputLock(self.run_dir / LOCK_FILE, f"the TensorBoard run {self.run_dir}", self.mode).acquire()
        try:
            return self._open()
        except OSError as e:
            self._lock = released(self._lock)
            raise OutputError(f"cannot write the TensorBoard run {self.run_dir}: {e}") from None
        except OutputError:
            self._lock = released(self._lock)
            raise

    def _open(self) -> int | None:
        position_path = self.run_dir / POSITION_FILE
        if position_path.exists():
            position = _read_position(position_path)
            events_path = self.run_dir / position["file"]
            if events_path.exists() and events_path.stat().st_size >= position["size"]:
                self.events = EventFile(events_path, truncate_to=position["size"], mode=self.mode)
                self.next_seq = position["next_seq"]
                return self.next_seq
            logger.warning("%s: the event file %s is missing or shorter than recorded; writing the run anew",
                           self.run_dir, position["file"])
            if events_path.exists():
                events_path.rename(events_path.with_name(events_path.name + ".broken"))
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.fg"
        self.events = EventFile(self.run_dir / name, mode=self.mode)
        self.next_seq = 0
        self.flush()
        return None

    def write(self, event, seq: int, durable: bool) -> None:
        if event is not None:
            self.events.write(event)
        self.next_seq = seq + 1
        if durable:
            self.flush(durable=True)
        elif time.monotonic() - self.last_flush > self.flush_secs:
            self.flush()

    def flush(self, durable: bool = False, events: EventFile | None = None) -> None:
        events = events or self.events
        size = events.sync() if durable else events.flush()
        write_json_atomic(self.run_dir / POSITION_FILE,
                          {"file": events.path.name, "size": size, "next_seq": self.next_seq})
        self.last_flush = time.monotonic()

    def close(self) -> None:
        try:
            if self.events is not None:
                events, self.events = self.events, None
                try:
                    self.flush(durable=True, events=events)
                finally:
                    events.close()
        finally:
            self._lock = released(self._lock)


def _read_position(path: Path) -> dict:
    """The sidecar, checked: it names an event file in its own directory, so a resume truncates nothing else."""
    try:
        position = json.loads(path.read_text(encoding="utf-8"))
        name, size, next_seq = position["file"], position["size"], position["next_seq"]
    except (ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{path} is not a position file fg-sink tb wrote ({type(e).__name__}: {e}); move the "
                          "run's directory away to write it anew") from None
    if (type(name) is not str or not name.startswith(_EVENT_PREFIX) or "/" in name or name != Path(name).name
            or type(size) is not int or size < 0 or type(next_seq) is not int or next_seq < 0):
        raise OutputError(f"{path} names {name!r} at size {size!r}, seq {next_seq!r}: not an event file of this "
                          "directory; move the run's directory away to write it anew")
    return position


class TensorBoardSink(Sink):
    """`ranks`: "0" (default) writes rank 0's figures; "all" or a list such as "0,1" also writes each other
    rank's under RUN/rankN."""

    kind = "tb"

    def __init__(self, logdir: str = DEFAULT_LOGDIR, flush_secs: float = 2.0, ranks: str = "0",
                 group_readable: bool = False):
        self.logdir_template = logdir
        self.flush_secs = flush_secs
        self.ranks = ranks
        self.group_readable = group_readable
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
                                             self.flush_secs, self.group_readable)
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
        elif event == "system":
            values = self._scalars(record.get("metrics") or {}, lambda k: f"system/{k}")
        elif event == "on_train_begin" and isinstance(record.get("meta"), dict):
            values = _run_begin(record)
        elif event == "experiment" and isinstance(record.get("meta"), dict):  # TBLogger(name=..., description=...)
            values = list(text_pb("run/experiment", _experiment_markdown(record["meta"])).value)
        elif event == "textgen" and record.get("text") is not None:
            index = record.get("prompt_index", 0)
            values = list(text_pb(f"textgen/sample_{index}", _verbatim(f"{record.get('prompt', '')}"
                                                                       f"{record.get('text', '')}")).value)
        elif event == records.END:  # how the run ended, and why: "stopped: `fg-bus ctl stop` from alice@gpu1 ..."
            ended = end_text(record.get("status") if isinstance(record.get("status"), str) else "?",
                             record.get("reason"), limit=2000)
            frame = failure_frame(record.get("reason"))
            values = list(text_pb("run/end", ended + (f"\n\nat `{frame}`" if frame else "")).value)
        tb_event = None
        if values:
            wall = record_time(record)
            tb_event = event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(value=values))
            self.scalars_written += len(values)
        self.logs[record["rank"]].write(tb_event, record["seq"], durable=event in ("on_save", records.END))

    @staticmethod
    def _scalars(metrics: dict, tag) -> list:
        out = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out.append(summary_pb2.Summary.Value(tag=tag(key), simple_value=float(value)))
        return out

    def end_run(self, status: str) -> None:
        for log in self.logs.values():
            if log.events is not None:
                log.flush(durable=True)

    def retry_write(self) -> None:
        """After a full disk: write what is still held, and the sidecars (raises OSError while there is no room)."""
        self.end_run("")

    def _close_logs(self) -> None:
        """Close every rank's log (each releases its lock), then raise the first error, if any."""
        logs, self.logs = self.logs, {}
        error: OSError | None = None
        for log in logs.values():
            try:
                log.close()
            except OSError as e:
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        self._close_logs()


def _run_begin(record: dict) -> list:
    """What transformers' TensorBoardCallback writes at train begin, `args` and `model_config` as JSON text
    (under its tags, which torch's SummaryWriter.add_text names `args/text_summary`, ...),
    plus the run's meta (`run/meta`) and its hyperparameters for TensorBoard's HParams dashboard (the args'
    numbers, strings and booleans; any other value as its JSON)."""
    meta = record["meta"]
    values = list(text_pb("run/meta", _meta_markdown(record)).value)
    args = meta.get("args") if isinstance(meta.get("args"), dict) else None
    if args is not None:
        values += text_pb("args/text_summary", json.dumps(args, indent=2, sort_keys=True, default=str)).value
    config = (meta.get("model") or {}).get("config") if isinstance(meta.get("model"), dict) else None
    if config:
        values += text_pb("model_config/text_summary", json.dumps(config, indent=2, sort_keys=True, default=str)).value
    if args:
        from tensorboard.plugins.hparams import summary_v2 as hparams

        flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
                for k, v in args.items() if v is not None}
        values += hparams.hparams_pb(flat, trial_id=record["run"], start_time_secs=record_time(record)).value
    return values


def _experiment_markdown(meta: dict) -> str:
    """The seed's experiment info (TBLogger / JsonLogger name, description, ...): each field on its line."""
    lines = [f"**{key}** {_verbatim(str(value), block=False)}  " for key, value in meta.items()
             if isinstance(value, (str, int, float)) and key != "source"]
    if meta.get("source"):
        lines.append(f"*from {meta['source']}*")
    return "\n".join(lines)


def _verbatim(text: str, block: bool = True) -> str:
    """`text` as TensorBoard's markdown shows it unchanged: a fenced block (block) or an inline code span,
    so a prompt that ends in a space, or holds `*`, `_` or `#`, comes out as written."""
    if block:
        fence = "```"
        while fence in text:
            fence += "`"
        return f"{fence}\n{text}\n{fence}"
    ticks = "`"
    while ticks in text:
        ticks += "`"
    return f"{ticks} {text} {ticks}"


def _meta_markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"**run** `{record['run']}`  ", f"**date** {record['timestamp']}  "]
    for key in ("name", "description", "experiment", "date"):
        if meta.get(key):
            lines.append(f"**{key}** {meta[key]}  ")
    lines += ["", "```json", json.dumps(meta, indent=1, default=str), "```"]
    return "\n".join(lines)
