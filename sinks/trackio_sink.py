"""`fg-sink trackio`: a run replayed into trackio (Hugging Face's local-first tracker) as `report_to="trackio"`
(transformers' `TrackioCallback`) would have logged it, each point stamped with the record's training time.

- project: `--trackio-project`, $TRACKIO_PROJECT, else the run's `args.project` (transformers: "huggingface");
  store: `--trackio-dir`, $TRACKIO_DIR, else trackio's default ($HF_HOME/trackio); run name: `--trackio-name`,
  else the run's (`args.run_name` or its output directory's); with `--ranks all`, rank N is `NAME-rankN`, one
  trackio group.
- config: the model's config, the args over it, `model/num_parameters` (as transformers), `fg_bus/run`, and at
  the end `fg_bus/status` / `fg_bus/end_reason` (trackio has no run status) and the end-of-training figures
  transformers leaves out of the history (`summary/train_loss`, ...).
- history, at the record's step: `on_log` as `train/*`, `eval/*`, `test/*` with `train/global_step`
  (transformers' `rewrite_logs`), `on_predict` likewise, `on_step_end` as `train/step_*`, `grad_stats` as
  `grad/*`; `system` records as trackio system metrics (`system/*`, by time); a `textgen` sample as a trackio
  table (`textgen/sample_N`); `alert`, `warning`, `control` records and the run's end as trackio alerts (the
  end: ERROR failed or dead, WARN stopped or interrupted, INFO completed).

It writes with trackio's `SQLiteStorage` (what its dashboard and `trackio.Api` read), in this process: no
thread, no server. (trackio's `log()` queues for a background thread, stamps the time of logging and drops a
batch it cannot write.) Each row's `log_id` is made of (run, rank, seq) and trackio inserts it once, so a
replayed record is never stored twice. The state file (`--trackio-state`, default
`{output_dir}/trackio/{run}.json`) keeps the project, the trackio runs' names and ids and the next seq,
written after each flush (every second or 500 rows, at checkpoints, at the end): a restarted sink continues the
same trackio run. An unwritable store: the rows are held and retried with backoff (1 s doubling to 30 s), said
once per outage; past MAX_HELD records the sink stops (exit 8, with the command that resumes it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fg_bus import records, registry
from fg_bus.monitor import end_text
from fg_bus.registry import RunInfo, write_json_atomic

from ._output import OutputError, OutputLock, dir_mode, file_mode, make_dirs, printable, released
from .base import Sink, expand, rewrite_logs

logger = logging.getLogger(__name__)

DEFAULT_STATE = "{output_dir}/trackio/{run}.json"
DEFAULT_PROJECT = "huggingface"  # transformers' TrainingArguments.project
#: what transformers' TrackioCallback keeps out of the history (single values at the end of training)
SINGLE_VALUE_SCALARS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                        "total_flos")
FLUSH_ROWS = 500
FLUSH_SECONDS = 1.0
MAX_BACKOFF = 30.0
#: records held while the store cannot be written, before the sink stops (a restart catches up)
MAX_HELD = 100_000
#: how long the end of a run waits for an unwritable store before giving up (a restart replays the rest)
END_WAIT = 60.0
_SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey")
_ALERT_LEVEL = {registry.COMPLETED: "info", registry.STOPPED: "warn", registry.INTERRUPTED: "warn",
                registry.FAILED: "error", registry.DEAD: "error"}


def add_arguments(group) -> None:
    from .cli import _template  # the placeholder check every sink's output path gets

    group.add_argument("--trackio-project", metavar="NAME",
                       help="trackio project (default $TRACKIO_PROJECT, else the run's args.project, as "
                            "transformers does: huggingface)")
    group.add_argument("--trackio-dir", metavar="DIR",
                       help="trackio's local store (default $TRACKIO_DIR, else trackio's default, $HF_HOME/trackio)")
    group.add_argument("--trackio-name", metavar="NAME",
                       help="the trackio run's name (default the run's name: args.run_name or its output directory)")
    group.add_argument("--trackio-state", metavar="PATH", type=_template, default=DEFAULT_STATE,
                       help=f"where the sink keeps the trackio run and its position, to resume after a restart; "
                            f"{{run}} and {{output_dir}} are replaced (default {DEFAULT_STATE})")


def build(opts) -> TrackioSink:
    return TrackioSink(project=opts.trackio_project, trackio_dir=opts.trackio_dir, name=opts.trackio_name,
                       state=opts.trackio_state, group_readable=opts.group_readable)


def _import_storage(trackio_dir: str | None):
    """trackio's SQLiteStorage, for the store `trackio_dir` (trackio reads TRACKIO_DIR once, at import)."""
    if trackio_dir:
        wanted = str(Path(trackio_dir).expanduser().absolute())
        loaded = sys.modules.get("trackio.utils")
        if loaded is not None and str(Path(loaded.TRACKIO_DIR).absolute()) != wanted:
            raise ValueError(f"--trackio-dir {wanted}: trackio is already loaded in this process for "
                             f"{loaded.TRACKIO_DIR}; run the sink in a process of its own")
        os.environ["TRACKIO_DIR"] = wanted
    try:
        from trackio.sqlite_storage import SQLiteStorage
        from trackio.table import Table
        from trackio.utils import TRACKIO_DIR
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "trackio":
            raise ValueError("fg-sink trackio needs the trackio extra: pip install 'fg-bus[trackio]'") from None
        raise
    return SQLiteStorage, Table, Path(TRACKIO_DIR)


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stamp(record: dict) -> str:
    """The record's time as trackio writes its own (datetime.isoformat, UTC)."""
    try:
        return datetime.fromisoformat(record["timestamp"]).astimezone(timezone.utc).isoformat()
    except (TypeError, ValueError, KeyError):
        return datetime.now(timezone.utc).isoformat()


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if value not in (None, "") and any(h in key.lower() for h in _SECRET_HINTS):
        return "<redacted>"
    return value


def run_config(meta: dict) -> dict:
    """What transformers' TrackioCallback puts in the config: the model's config, the args over it, and the
    number of parameters (credentials redacted; trackio reserves keys starting with `_`)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    model_config = model.get("config") if isinstance(model.get("config"), dict) else {}
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    config = {**model_config, **args}
    if isinstance(meta.get("num_parameters"), int):
        config["model/num_parameters"] = meta["num_parameters"]
    return {(k if not k.startswith("_") else "fg" + k): v for k, v in _redact(config).items()}


def trackio_run_id(run: str, rank: int) -> str:
    """The trackio run id of one rank of one fg-bus run: the same on every replay, so a lost state file still
    leads to the same trackio run (and trackio's log ids keep it free of duplicates)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"fg-bus:{run}:{rank}").hex


def log_id(run: str, rank: int, seq: int, part: str = "") -> str:
    digest = hashlib.sha1(f"{run}:{rank}:{seq}:{part}".encode()).hexdigest()[:24]
    return f"fg-{digest}"


@dataclass
class _RankRun:
    """One trackio run: a followed rank of the fg-bus run, and what is held for it until the next flush."""

    rank: int
    id: str
    name: str | None = None
    next_seq: int = 0
    config: dict = field(default_factory=dict)
    config_dirty: bool = False
    metrics: list[dict] = field(default_factory=list)  # {"metrics", "step", "timestamp", "log_id"}
    system: list[dict] = field(default_factory=list)  # {"metrics", "timestamp", "log_id"}
    alerts: list[dict] = field(default_factory=list)  # {"title", "text", "level", "step", "timestamp", "alert_id"}
    held: int = 0  # records handled since the last flush that went through
    last_timestamp: str | None = None
    ended: bool = False
    last_step: int = 0

    def pending(self) -> bool:
        return bool(self.metrics or self.system or self.alerts or self.config_dirty)


class TrackioSink(Sink):
    kind = "trackio"

    def __init__(self, project: str | None = None, trackio_dir: str | None = None, name: str | None = None,
                 state: str = DEFAULT_STATE, group_readable: bool = False):
        self.project_option = project or os.environ.get("TRACKIO_PROJECT") or None
        self.trackio_dir = trackio_dir
        self.name_option = name
        self.state_template = state
        self.group_readable = group_readable
        self.storage, self.table, self.store_dir = _import_storage(trackio_dir)
        self.project: str | None = None
        self.run_id: str | None = None
        self.state_path: Path | None = None
        self.runs: dict[int, _RankRun] = {}
        self.group: str | None = None
        self.default_name: str | None = None
        self._lock: OutputLock | None = None
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self._backoff = 1.0
        self._outage_since: float | None = None
        self.rows_written = 0

    # -- run lifecycle ---------------------------------------------------------------------------------

    def open_run(self, info: RunInfo) -> dict[int, int] | None:
        from .runner import ranks_to_follow

        self._close_run()
        self.run_id = info.run_id
        path = Path(expand(self.state_template, info))
        if path.is_dir():
            raise OutputError(f"--trackio-state {path} is a directory; give a file name (default {DEFAULT_STATE})")
        make_dirs(path.parent, dir_mode(self.group_readable))
        self._lock = OutputLock(path.with_name(f".{path.name}.lock"), f"the trackio state {path}",
                                file_mode(self.group_readable)).acquire()
        self.state_path = path
        state = self._read_state(path) if path.exists() else {}
        self.project = self.project_option or state.get("project")
        if state.get("project") is not None and self.project != state["project"]:
            self._lock = released(self._lock)
            raise OutputError(f"{path}: this run was replayed into trackio project {state.get('project')!r}, not "
                              f"{self.project!r}; move {path} away to replay it whole into {self.project!r}")
        if state and state.get("trackio_dir") != str(self.store_dir):
            self._lock = released(self._lock)
            raise OutputError(f"{path}: this run was replayed into the trackio store {state.get('trackio_dir')}, "
                              f"not {self.store_dir}; move {path} away to replay it whole into this one")
        if self.project is not None:
            self._check_project(self.project)
        ranks = ranks_to_follow(self.ranks, info)
        self.default_name = info.data.get("name") if isinstance(info.data.get("name"), str) else None
        self.group = (self.default_name or info.run_id) if len(ranks) > 1 else None
        saved = state.get("ranks", {})
        positions = {}
        for rank in ranks:
            run = self.runs[rank] = _RankRun(rank, trackio_run_id(info.run_id, rank))
            entry = saved.get(str(rank))
            if isinstance(entry, dict):
                run.name = entry.get("name") if isinstance(entry.get("name"), str) else None
                run.next_seq = entry["next_seq"] if type(entry.get("next_seq")) is int else 0
                run.config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
                positions[rank] = run.next_seq
        return positions or None

    def _check_project(self, project: str) -> None:
        try:
            self.storage.validate_project_name(project)
        except ValueError as e:
            self._lock = released(self._lock)
            raise OutputError(f"trackio project {project!r}: {e}") from None

    @staticmethod
    def _read_state(path: Path) -> dict:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("kind") != "fg-sink trackio" or not isinstance(state.get("ranks"), dict):
                raise ValueError("not a state file of fg-sink trackio")
        except (OSError, ValueError, AttributeError) as e:
            raise OutputError(f"{path} is not a state file fg-sink trackio wrote ({e}); move it away to replay the "
                              "run anew") from None
        return state

    def _write_state(self) -> None:
        runs = {str(r.rank): {"name": r.name, "id": r.id, "next_seq": r.next_seq, "config": r.config}
                for r in self.runs.values()}
        write_json_atomic(self.state_path, {"kind": "fg-sink trackio", "run": self.run_id, "project": self.project,
                                            "trackio_dir": str(self.store_dir), "ranks": runs})

    # -- records ---------------------------------------------------------------------------------------

    def handle(self, record: dict) -> None:
        run = self.runs[record["rank"]]
        event = record["event"]
        step = record.get("global_step") or 0
        stamp = _stamp(record)
        seq = record["seq"]
        metrics = record.get("metrics") or {}
        point = None
        if event == "on_train_begin" and isinstance(record.get("meta"), dict):
            self._begin(run, record["meta"], stamp)
        elif event == "on_log":
            kept = {k: v for k, v in metrics.items() if k not in SINGLE_VALUE_SCALARS}
            summary = {f"summary/{k}": v for k, v in _numbers(metrics).items() if k in SINGLE_VALUE_SCALARS}
            if summary:
                self._set_config(run, summary)
            if kept:
                point = {**_numbers(rewrite_logs(kept)), "train/global_step": step}
        elif event == "on_predict":
            point = _numbers(rewrite_logs(metrics))
        elif event == "on_step_end":
            point = {f"train/step_{k}": v for k, v in _numbers(metrics).items()}
        elif event == "grad_stats":
            point = {f"grad/{k}": v for k, v in _numbers(metrics).items()}
        elif event == "system":
            values = {f"system/{k}": v for k, v in _numbers(metrics).items()}
            if values:
                self._named(run, stamp, settle=False)
                run.system.append({"metrics": values, "timestamp": stamp, "log_id": log_id(self.run_id, run.rank, seq)})
        elif event == "textgen" and record.get("text") is not None:
            index = record.get("prompt_index", 0)
            table = {"_type": self.table.TYPE,
                     "_value": [{"step": step, "prompt": str(record.get("prompt", "")), "text": str(record["text"])}]}
            point = {f"textgen/sample_{index}": table}
        elif event in ("alert", "warning", "control"):
            self._alert(run, record, step, stamp)
        elif event == records.END:
            self._end(run, record.get("status") if isinstance(record.get("status"), str) else "?",
                      record.get("reason"), step, stamp)
        if point:
            self._named(run, stamp)
            run.metrics.append({"metrics": point, "step": step, "timestamp": stamp,
                                "log_id": log_id(self.run_id, run.rank, seq)})
        run.next_seq = seq + 1
        run.held += 1
        run.last_timestamp = stamp
        run.last_step = step
        self._maybe_flush(durable=event in ("on_save", "on_train_end", records.END))

    def _named(self, run: _RankRun, stamp: str, settle: bool = True) -> None:
        """Name the trackio run before its first row (the run's name from run.json: a `system` record may come
        before on_train_begin). `settle`: a record of the training loop, so on_train_begin has been missed
        (`--from` past it): the default project, and the config without the run's args."""
        if run.name is None:
            base = self.name_option or self.default_name or self.run_id
            run.name = str(base) if run.rank == 0 else f"{base}-rank{run.rank}"
        if settle and self.project is None:
            self.project = DEFAULT_PROJECT
        if settle and not run.config:
            self._configure(run, {}, stamp)

    def _begin(self, run: _RankRun, meta: dict, stamp: str) -> None:
        if self.project is None:
            args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
            project = args.get("project") if isinstance(args.get("project"), str) and args["project"] else None
            try:
                if project is not None:
                    self.storage.validate_project_name(project)
            except ValueError as e:
                logger.warning("the run's args.project %r cannot be a trackio project (%s); using %r", project, e,
                               DEFAULT_PROJECT)
                project = None
            self.project = project or DEFAULT_PROJECT
        if run.name is None and meta.get("name") and not self.name_option:
            run.name = str(meta["name"]) if run.rank == 0 else f"{meta['name']}-rank{run.rank}"
        self._named(run, stamp, settle=False)
        self._configure(run, meta, stamp)

    def _configure(self, run: _RankRun, meta: dict, stamp: str) -> None:
        config = {**run_config(meta), "fg_bus/run": self.run_id, "fg_bus/rank": run.rank,
                  "fg_bus/status": "running"}
        config.update({k: v for k, v in run.config.items() if k.startswith(("summary/", "fg_bus/status",
                                                                            "fg_bus/end_reason"))})
        # trackio's own keys (Run.__init__): who, when (the run's start, from the record) and the group
        config.update({"_Username": os.environ.get("USER") or None, "_Created": stamp, "_Group": self.group})
        run.config = config
        run.config_dirty = True

    def _set_config(self, run: _RankRun, values: dict) -> None:
        run.config = {**run.config, **values}
        run.config_dirty = True

    def _alert(self, run: _RankRun, record: dict, step: int, stamp: str) -> None:
        event = record["event"]
        kind = record.get("kind")
        if event == "control":
            state = "applied" if record.get("applied") else ("accepted" if record.get("accepted") else "refused")
            title = f"control: {record.get('cmd', '?')} {state}"
            text = ", ".join(f"{k}: {record[k]}" for k in ("source", "reason", "id") if record.get(k)) or None
            level = "info"
        elif event == "alert":
            title = f"alert: {kind or 'alert'}"
            text = str(record.get("message") or kind or "")
            if record.get("action"):
                text += f" (action: {record['action']})"
            level = "error" if record.get("action") in ("stop", "abort") else "warn"
        else:
            title = f"warning: {kind}" if kind else "warning"
            text = str(record.get("message") or "")
            level = "info" if kind == "stall-cleared" else "warn"
        self._named(run, stamp, settle=False)
        run.alerts.append({"title": printable(title)[:200], "text": printable(text)[:4000] or None, "level": level,
                           "step": step, "timestamp": stamp,
                           "alert_id": log_id(self.run_id, run.rank, record["seq"], "alert")})

    def _end(self, run: _RankRun, status: str, reason: Any, step: int, stamp: str) -> None:
        text = end_text(status, reason if isinstance(reason, dict) else None, limit=2000)
        self._named(run, stamp)
        self._set_config(run, {"fg_bus/status": status, "fg_bus/end_reason": text})
        run.alerts.append({"title": f"run {status}", "text": printable(text), "level": _ALERT_LEVEL.get(status, "warn"),
                           "step": step, "timestamp": stamp, "alert_id": log_id(self.run_id, run.rank, -1, "end")})
        run.ended = True

    def end_run(self, status: str, reason: dict | None = None) -> None:
        """The stream is over: a run that ended without its end record (the trainer died) is marked so; then
        everything is written, trying for up to END_WAIT seconds."""
        if status in registry.END_STATUSES:
            for run in self.runs.values():
                if not run.ended:
                    self._end(run, status, reason, run.last_step, run.last_timestamp or _stamp({}))
        self._flush_until(time.monotonic() + END_WAIT)

    # -- writing ---------------------------------------------------------------------------------------

    def _maybe_flush(self, durable: bool = False) -> None:
        now = time.monotonic()
        rows = sum(len(r.metrics) + len(r.system) + len(r.alerts) for r in self.runs.values())
        if now < self._retry_at:
            held = sum(r.held for r in self.runs.values())
            if held > MAX_HELD:
                raise OSError(errno.EIO, f"the trackio store could not be written for {now - self._outage_since:.0f} s "
                                         f"({held} records held); it is retried when the sink is started again",
                              str(self._db_path()))
            return
        if durable or rows >= FLUSH_ROWS or now - self._last_flush >= FLUSH_SECONDS:
            self._try_flush()

    def _db_path(self) -> Path:
        return self.storage.get_project_db_path(self.project) if self.project else self.store_dir

    def _try_flush(self) -> bool:
        import sqlite3

        try:
            self._flush()
        except (sqlite3.Error, OSError) as e:
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
                print(printable(f"fg-sink trackio: cannot write the trackio store {self._db_path()}: "
                                f"{type(e).__name__}: {e}; holding the records and trying again with backoff "
                                f"(up to {MAX_BACKOFF:g} s)"), file=sys.stderr, flush=True)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            return False
        if self._outage_since is not None:
            print(f"fg-sink trackio: the trackio store is writable again after "
                  f"{time.monotonic() - self._outage_since:.0f} s: caught up", file=sys.stderr, flush=True)
            self._outage_since = None
        self._backoff = 1.0
        self._retry_at = 0.0
        return True

    def _flush(self) -> None:
        """Write what is held, then the state file. A crash in between is harmless: trackio stores each row's
        log id once, and the restarted sink replays from the state's older position."""
        if self.state_path is None or (self.project is None and any(r.pending() for r in self.runs.values())):
            return  # rows before on_train_begin (system samples): held until it names the project
        for run in self.runs.values():
            if run.name is not None and self.project is not None and run.pending():
                name = run.name
                if run.metrics:
                    self.storage.bulk_log(project=self.project, run=name, run_id=run.id,
                                          metrics_list=[m["metrics"] for m in run.metrics],
                                          steps=[m["step"] for m in run.metrics],
                                          timestamps=[m["timestamp"] for m in run.metrics],
                                          log_ids=[m["log_id"] for m in run.metrics],
                                          config=run.config if run.config_dirty else None)
                    self.rows_written += len(run.metrics)
                    run.metrics = []
                    run.config_dirty = False
                elif run.config_dirty and self._has_rows(run):
                    self._write_config(run)
                if run.system:
                    self.storage.bulk_log_system(project=self.project, run=name, run_id=run.id,
                                                 metrics_list=[s["metrics"] for s in run.system],
                                                 timestamps=[s["timestamp"] for s in run.system],
                                                 log_ids=[s["log_id"] for s in run.system])
                    run.system = []
                if run.alerts:
                    a = run.alerts
                    self.storage.bulk_alert(project=self.project, run=name, run_id=run.id,
                                            titles=[x["title"] for x in a], texts=[x["text"] for x in a],
                                            levels=[x["level"] for x in a], steps=[x["step"] for x in a],
                                            timestamps=[x["timestamp"] for x in a],
                                            alert_ids=[x["alert_id"] for x in a])
                    run.alerts = []
            run.held = 0
        self._write_state()
        self._last_flush = time.monotonic()

    def _has_rows(self, run: _RankRun) -> bool:
        return self.storage.get_log_count(self.project, run=run.name, run_id=run.id) > 0

    def _write_config(self, run: _RankRun) -> None:
        """The config alone (trackio writes it with a batch of metrics; here there is none left to write)."""
        import orjson
        import sqlite3

        from trackio.utils import serialize_values

        path = self.storage.init_db(self.project)
        with self.storage._get_process_lock(self.project):
            conn = sqlite3.connect(str(path), timeout=30.0)
            try:
                with conn:
                    conn.execute("INSERT OR REPLACE INTO configs (run_id, run_name, config, created_at) "
                                 "VALUES (?, ?, ?, ?)", (run.id, run.name, orjson.dumps(serialize_values(run.config)),
                                                         datetime.now(timezone.utc).isoformat()))
            finally:
                conn.close()
        run.config_dirty = False

    def _flush_until(self, deadline: float) -> None:
        while not self._try_flush():
            if time.monotonic() >= deadline:
                raise OSError(errno.EIO, "the trackio store could not be written before the sink's end; started "
                                         "again, the sink replays what is missing", str(self._db_path()))
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))

    def retry_write(self) -> None:
        self._flush_until(time.monotonic())

    # -- closing ---------------------------------------------------------------------------------------

    def _close_run(self) -> None:
        try:
            if self.state_path is not None and any(r.pending() or r.held for r in self.runs.values()):
                if not self._try_flush():
                    print(f"fg-sink trackio: could not write the last records to {self._db_path()}; started "
                          "again, the sink replays them", file=sys.stderr, flush=True)
        finally:
            self.runs = {}
            self.state_path = None
            self._lock = released(self._lock)

    def close(self) -> None:
        self._close_run()
