"""`fg-sink mlflow`: a run replayed into MLflow with mlflow's own client (`MlflowClient`), from the journal.

What lands in MLflow is what transformers' `MLflowCallback` (`report_to="mlflow"`) logs for the same run:
- metrics: every number of each `on_log` record under its own name (`loss`, `grad_norm`, `learning_rate`,
  `epoch`, `eval_loss`, `train_runtime`, ...: no prefix), the name sanitized as the callback does, at
  `step=global_step`, each point stamped with the record's training time (not the replay time);
- params: the model config and the args (args win a clash), flattened with "/" under
  `MLFLOW_FLATTEN_PARAMS`, a value longer than mlflow's limit dropped with a warning, at most
  `MLFLOW_MAX_LOG_PARAMS`; the run name (`args.run_name`, else the run's name); `MLFLOW_TAGS` as tags.
Plus what only fg-bus has: `system/...` metrics from the trainer's `system` records; each `textgen` sample
as a text artifact `textgen/step_NNNNNNN_sample_I.txt`; `warning`, `control` and `alert` records as tags
`fg.warning.SEQ`, `fg.control.SEQ`, `fg.alert.SEQ`; tags `fg.run_id`, `fg.rank`; and the end: tags
`fg.end_status`, `fg.end_reason`, a run note, and the run's status: completed / stopped -> FINISHED,
interrupted (a signal: someone meant it) -> KILLED, failed / dead (no heartbeat, no end record) -> FAILED.
A sink stopped before the run's end leaves the MLflow run RUNNING: started again, it continues.

Exactly once. Points go in batches (`log_batch`, at most every `flush_secs` of records, and at a save, an
evaluation or the end). A state file beside the run's output, `{output_dir}/mlflow/RUN.HASH.json` (HASH:
of the tracking URI and experiment, so two trackers keep two positions), holds per rank the MLflow run id,
`next_seq` (everything before it is in MLflow) and `sent_to` (written before a batch goes: records below
it may be in MLflow). A restarted sink continues that MLflow run from `next_seq`; for records below
`sent_to`, and after any failed call, it reads the metric histories back and sends only the points MLflow
lacks, so no point is sent twice (MLflow's SQL store drops an exact duplicate (key, step, timestamp,
value), its file store does not: the sink never relies on either). A run made but not yet written in the
state file is found again by its `fg.run_id` / `fg.rank` tags. No credential is written: the state holds
the tracking URI without user, password or query.

The tracker down or slow: every call is retried with backoff (0.5 s doubling to 30 s), said on stderr
once per outage and once when it is back; the sink catches up from the journal. An error MLflow gives for
the request itself (a bad parameter, no such run, no permission) is not retried: the sink stops (exit 8)
with the command that resumes it. mlflow's own HTTP retries are turned down to 0 in this process (unless
MLFLOW_HTTP_REQUEST_MAX_RETRIES is set) so that the backoff is this sink's.

Ranks: rank 0 by default, as `MLflowCallback` logs on the main process only; `--ranks all` gives each rank
its own MLflow run, named `NAME-rankN`, tagged `fg.rank`.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fg_bus import records
from fg_bus.registry import RunInfo, write_json_atomic

from ._output import OutputError, OutputLock, dir_mode, file_mode, make_dirs, printable, released
from .base import Sink, expand, record_time

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "{output_dir}/mlflow"
EXTRA = "fg-sink mlflow needs the mlflow extra: pip install 'fg-bus[mlflow]'"
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: a batch: mlflow's per-request limits (1000 entities, 100 params, 100 tags)
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
MAX_TAG_VALUE = 5000
#: records after which the batch goes at once
DURABLE_EVENTS = ("on_evaluate", "on_save", "on_train_end", records.END)
#: error codes of a request MLflow refused for what it is: retrying it cannot help
PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                             "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                             "ENDPOINT_NOT_FOUND", "NOT_FOUND", "FEATURE_DISABLED"})
STATUSES = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED", "failed": "FAILED",
            "dead": "FAILED", "missing": "FAILED"}
_TRUE = {"1", "ON", "YES", "TRUE"}
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-\.\ :/]")


def add_arguments(group) -> None:
    group.add_argument("--mlflow-tracking-uri", metavar="URI",
                       help="where MLflow keeps runs (default $MLFLOW_TRACKING_URI, else mlflow's default)")
    group.add_argument("--mlflow-experiment", metavar="NAME",
                       help="experiment, made if missing (default $MLFLOW_EXPERIMENT_NAME, else Default)")
    group.add_argument("--mlflow-artifact-location", metavar="URI",
                       help="artifact location of an experiment this sink makes (default: the server's)")
    group.add_argument("--mlflow-state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                       help=f"where the sink keeps its position in MLflow; {{run}} and {{output_dir}} are replaced "
                            f"(default {DEFAULT_STATE_DIR})")


def build(opts) -> "MlflowSink":
    try:
        importlib.import_module("mlflow")  # the extra is there; the sink imports its parts when it starts
    except ImportError:
        raise ValueError(EXTRA) from None
    return MlflowSink(tracking_uri=opts.mlflow_tracking_uri, experiment=opts.mlflow_experiment,
                      artifact_location=opts.mlflow_artifact_location, state_dir=opts.mlflow_state_dir,
                      group_readable=opts.group_readable)


def public_uri(uri: str) -> str:
    """The tracking URI without user, password, query or fragment: what may be printed and kept."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password or parts.query or parts.fragment):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def metric_name(key: str) -> str:
    """transformers' MLflowCallback sanitizing: characters MLflow refuses become `_`."""
    return _METRIC_NAME.sub("_", key)


def flatten_dict(d: dict, parent_key: str = "", delimiter: str = "/") -> dict:
    """transformers.integrations.integration_utils.flatten_dict."""
    out = {}
    for k, v in d.items():
        key = f"{parent_key}{delimiter}{k}" if parent_key else k
        if v and isinstance(v, dict):
            out.update(flatten_dict(v, key, delimiter))
        else:
            out[key] = v
    return out


def timestamp_ms(record: dict) -> int:
    return int(record_time(record) * 1000)


def point_id(key: str, step: int, timestamp: int, value: float) -> tuple:
    """A metric point as MLflow keeps it: NaN as NaN, an infinity clipped to the largest float."""
    if math.isnan(value):
        value = "nan"
    elif math.isinf(value):
        value = math.copysign(sys.float_info.max, value)
    return key, int(step), int(timestamp), value


def run_params(meta: dict, max_length: int) -> tuple[dict[str, str], list[str]]:
    """MLflowCallback's params: model config, then args over it; flattened under MLFLOW_FLATTEN_PARAMS; a value
    longer than `max_length` dropped (returned too); at most MLFLOW_MAX_LOG_PARAMS."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    config = model.get("config") if isinstance(model.get("config"), dict) else {}
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    combined = {**config, **args}
    if os.environ.get("MLFLOW_FLATTEN_PARAMS", "FALSE").upper() in _TRUE:
        combined = flatten_dict(combined)
    dropped = [name for name, value in combined.items() if len(str(value)) > max_length]
    items = [(name, str(value)) for name, value in combined.items() if name not in dropped]
    limit = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
    if limit and limit.isdigit():
        items = items[:int(limit)]
    return dict(items), dropped


class _Stopped(Exception):
    """A signal asked the sink to stop while it waited for the tracker."""


class _RankRun:
    """One rank's MLflow run: its id, position, and the batch not yet sent."""

    def __init__(self, rank: int, saved: dict | None):
        saved = saved or {}
        self.rank = rank
        self.run_id: str | None = saved.get("run_id")
        self.next_seq: int = int(saved.get("next_seq", 0))
        self.sent_to: int = int(saved.get("sent_to", self.next_seq))
        self.ended: str | None = saved.get("ended")
        self.metrics: list = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.texts: list[tuple[str, str]] = []
        self.pending_to: int | None = None  # seq + 1 of the last record in the batch
        self.last_flush = time.monotonic()
        self.last_ms: int | None = None
        self.end_status: str | None = None
        self.end_reason: dict | None = None

    def state(self) -> dict:
        return {"run_id": self.run_id, "next_seq": self.next_seq, "sent_to": self.sent_to, "ended": self.ended}

    def pending(self) -> bool:
        return self.pending_to is not None


class MlflowSink(Sink):
    kind = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 artifact_location: str | None = None, state_dir: str = DEFAULT_STATE_DIR, flush_secs: float = 1.0,
                 ranks: str = "0", group_readable: bool = False, backoff: tuple[float, ...] = BACKOFF):
        self.backoff = backoff
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
        self.artifact_location = artifact_location
        self.state_dir = state_dir
        self.flush_secs = flush_secs
        self.ranks = ranks
        self.group_readable = group_readable
        self.client = None
        self.where = ""
        self.info: RunInfo | None = None
        self.runs: dict[int, _RankRun] = {}
        self.state_path: Path | None = None
        self.experiment_id: str | None = None
        self.meta: dict = {}
        self.outages = 0
        self.calls_failed = 0
        self._lock: OutputLock | None = None
        self._stop_requested = False
        self._handlers: dict = {}
        self._max_param = 6000

    # -- run lifecycle ---------------------------------------------------------------------------------

    def open_run(self, info: RunInfo) -> dict[int, int] | None:
        from .runner import ranks_to_follow

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the backoff is ours, said on stderr
        import mlflow
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._max_param = MAX_PARAM_VAL_LENGTH
        self._lock = released(self._lock)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        uri = self.tracking_uri or mlflow.get_tracking_uri()
        self.where = public_uri(str(uri))
        self.info = info
        self.meta = {}
        self._watch_signals()
        key = hashlib.sha256(f"{self.where}\n{self.experiment or ''}".encode()).hexdigest()[:8]
        directory = Path(expand(self.state_dir, info))
        make_dirs(directory, dir_mode(self.group_readable))
        self.state_path = directory / f"{info.run_id}.{key}.json"
        self._lock = OutputLock(directory / f"{info.run_id}.{key}.lock", f"the MLflow replay of run {info.run_id} "
                                f"to {self.where}", file_mode(self.group_readable)).acquire()
        saved = self._read_state()
        self.experiment_id = saved.get("experiment_id")
        ranks = ranks_to_follow(self.ranks, info)
        self.runs = {rank: _RankRun(rank, saved.get("ranks", {}).get(str(rank))) for rank in ranks}
        positions = {rank: run.next_seq for rank, run in self.runs.items() if run.run_id is not None}
        return positions or None

    def _read_state(self) -> dict:
        if not self.state_path.exists():
            return {}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            for entry in state["ranks"].values():
                if type(entry["run_id"]) is not str or type(entry["next_seq"]) is not int:
                    raise TypeError("run_id / next_seq")
            return state
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OutputError(f"{self.state_path} is not a state file fg-sink mlflow wrote ({type(e).__name__}: "
                              f"{e}); move it away to replay the run into a new MLflow run") from None

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, {
            "tracking_uri": self.where, "experiment": self.experiment, "experiment_id": self.experiment_id,
            "run": self.info.run_id, "ranks": {str(r): run.state() for r, run in self.runs.items()}})
        if self.group_readable:
            os.chmod(self.state_path, file_mode(True))

    # -- records ---------------------------------------------------------------------------------------

    def handle(self, record: dict) -> None:
        run = self.runs[record["rank"]]
        event = record["event"]
        step = int(record.get("global_step") or 0)
        ms = timestamp_ms(record)
        try:
            if run.run_id is None:
                self._start(run, record, ms)
            if event == "on_train_begin" and isinstance(record.get("meta"), dict):
                self._on_meta(run, record["meta"])
            elif event == "on_log":
                self._add_metrics(run, record.get("metrics"), step, ms, metric_name)
            elif event == "system":
                self._add_metrics(run, record.get("metrics"), step, ms, lambda k: "system/" + metric_name(k))
            elif event == "textgen" and record.get("text") is not None:
                name = f"textgen/step_{step:07d}_sample_{record.get('prompt_index', 0)}.txt"
                run.texts.append((name, f"{record.get('prompt', '')}{record.get('text', '')}"))
            elif event in ("warning", "control", "alert"):
                run.tags[f"fg.{event}.{record['seq']:08d}"] = _note(event, record, step)
            elif event == records.END:
                run.end_status = record.get("status") if isinstance(record.get("status"), str) else None
                run.end_reason = record.get("reason") if isinstance(record.get("reason"), dict) else None
            run.pending_to = record["seq"] + 1
            run.last_ms = ms
            if (event in DURABLE_EVENTS or len(run.metrics) >= MAX_METRICS
                    or time.monotonic() - run.last_flush >= self.flush_secs):
                self._flush(run)
        except _Stopped:
            pass  # the batch is not sent; restarted, the sink sends it from the state file's position

    def _start(self, run: _RankRun, record: dict, ms: int) -> None:
        """The MLflow run for this rank: one a crashed sink made (found by its tags), else a new one."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        if self.experiment_id is None:
            self.experiment_id = self._call("the experiment", self._experiment)
        rank_filter = f"tags.`fg.run_id` = '{self.info.run_id}' and tags.`fg.rank` = '{run.rank}'"
        found = self._call("a search", lambda: self.client.search_runs([self.experiment_id], rank_filter,
                                                                       max_results=1))
        if found:
            run.run_id, run.next_seq, run.sent_to = found[0].info.run_id, 0, 1 << 62  # check every point
        else:
            name = str(self.info.data.get("name") or self.info.run_id)
            tags = {"fg.run_id": self.info.run_id, "fg.rank": str(run.rank), MLFLOW_RUN_NAME: self._name(name, run)}
            tags.update(_env_tags())
            created = self._call("a new run", lambda: self.client.create_run(
                self.experiment_id, start_time=ms, tags=tags, run_name=tags[MLFLOW_RUN_NAME]))
            run.run_id, run.next_seq, run.sent_to = created.info.run_id, record["seq"], record["seq"]
        self._save_state()

    def _name(self, name: str, run: _RankRun) -> str:
        return name if len(self.runs) == 1 and run.rank == 0 else f"{name}-rank{run.rank}"

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        if not self.experiment:
            return "0"  # MLflow's Default experiment
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def _on_meta(self, run: _RankRun, meta: dict) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        self.meta = meta
        params, dropped = run_params(meta, self._max_param)
        if dropped:
            logger.warning("params %s not logged: longer than MLflow's %d characters (as transformers' MLflowCallback "
                           "drops them; MLFLOW_FLATTEN_PARAMS=1 splits nested values)", ", ".join(dropped),
                           self._max_param)
        run.params.update(params)
        args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
        name = args.get("run_name") or meta.get("name")
        if name:
            run.tags[MLFLOW_RUN_NAME] = self._name(str(name), run)
        for key in ("host", "world_size", "output_dir", "description", "experiment"):
            if meta.get(key) not in (None, ""):
                run.tags[f"fg.{key}"] = str(meta[key])[:MAX_TAG_VALUE]

    def _add_metrics(self, run: _RankRun, metrics: Any, step: int, ms: int, name) -> None:
        from mlflow.entities import Metric

        for key, value in (metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            run.metrics.append(Metric(name(key), float(value), ms, step))

    # -- sending ---------------------------------------------------------------------------------------

    def _flush(self, run: _RankRun) -> None:
        """Send the batch: mark it possibly sent, send what MLflow lacks, then advance the position."""
        if not run.pending():
            return
        to = run.pending_to
        check = run.sent_to > run.next_seq  # an earlier sink may have sent some of these before it was killed
        if run.sent_to < to:
            run.sent_to = to
            self._save_state()
        self._call("a batch", lambda: self._send(run, check_existing=check or self.calls_failed > 0))
        run.metrics, run.params, run.tags, run.texts = [], {}, {}, []
        run.next_seq, run.pending_to = to, None
        run.last_flush = time.monotonic()
        self._save_state()

    def _send(self, run: _RankRun, check_existing: bool) -> None:
        from mlflow.entities import Param, RunTag

        metrics = run.metrics
        if check_existing and metrics:
            metrics = self._missing(run.run_id, metrics)
        params = [Param(k, v) for k, v in run.params.items()]
        tags = [RunTag(k, v[:MAX_TAG_VALUE]) for k, v in run.tags.items()]
        while metrics or params or tags:
            p, params = params[:MAX_PARAMS], params[MAX_PARAMS:]
            t, tags = tags[:MAX_TAGS], tags[MAX_TAGS:]
            room = min(MAX_METRICS, MAX_ENTITIES - len(p) - len(t))
            m, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run.run_id, metrics=m, params=p, tags=t, synchronous=True)
        for name, text in run.texts:
            self.client.log_text(run.run_id, text, name)  # the same name again overwrites: sent once in effect

    def _missing(self, run_id: str, metrics: list) -> list:
        """The points of `metrics` MLflow does not hold yet (a batch that may have gone before)."""
        held: dict[str, set] = {}
        out, seen = [], set()
        for m in metrics:
            if m.key not in held:
                held[m.key] = {point_id(h.key, h.step, h.timestamp, h.value)
                               for h in self.client.get_metric_history(run_id, m.key)}
            pid = point_id(m.key, m.step, m.timestamp, m.value)
            if pid not in held[m.key] and pid not in seen:
                out.append(m)
            seen.add(pid)
        return out

    def _call(self, what: str, action):
        """`action()`, retried with backoff while the tracker is down; said once per outage."""
        from mlflow.exceptions import MlflowException

        tries, down_since = 0, None
        while True:
            try:
                result = action()
            except MlflowException as e:
                if e.error_code in PERMANENT_CODES:
                    raise OSError(errno.EIO, f"MLflow refused {what}: {e.error_code}: {str(e)[:500]}",
                                  self.where) from None
                error = e
            except Exception as e:  # noqa: BLE001 - a connection, a timeout, a locked store: the tracker is down
                error = e
            else:
                if down_since is not None:
                    self._say(f"MLflow at {self.where} is back after {time.monotonic() - down_since:.0f} s; catching "
                              f"up from the journal")
                    self.calls_failed = 0
                return result
            self.calls_failed += 1
            if down_since is None:
                down_since = time.monotonic()
                self.outages += 1
                self._say(f"MLflow at {self.where} is not answering ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:300] if str(error) else ''}); retrying with backoff, "
                          f"training is not affected")
            if self._sleep(self.backoff[min(tries, len(self.backoff) - 1)]):
                raise _Stopped()
            tries += 1

    def _say(self, text: str) -> None:
        print(printable(f"fg-sink mlflow: {text}"), file=sys.stderr, flush=True)

    def _sleep(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._stop_requested

    def _watch_signals(self) -> None:
        """A signal during a backoff wait stops the wait (and still reaches the runner's handler)."""
        if self._handlers or threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(s)

            def handler(signum, frame, previous=previous):
                self._stop_requested = True
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.SIG_DFL and signum == signal.SIGINT:
                    raise KeyboardInterrupt
            self._handlers[s] = previous
            signal.signal(s, handler)

    # -- the end ---------------------------------------------------------------------------------------

    def end_run(self, status: str, reason: dict | None = None) -> None:
        try:
            for run in self.runs.values():
                self._flush(run)
                own = run.end_status or status  # the rank's own end record, else what the follower saw
                mlflow_status = STATUSES.get(own)
                if run.run_id is None or mlflow_status is None:
                    continue  # no record at all, or the sink was stopped (not the run): it stays RUNNING
                self._end(run, own, run.end_reason or reason, mlflow_status)
        except _Stopped:
            pass

    def _end(self, run: _RankRun, status: str, reason: dict | None, mlflow_status: str) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        text = records.describe_end(status, reason)
        note = f"fg-bus run `{self.info.run_id}` rank {run.rank}: **{text}**"
        frame = None
        if isinstance(reason, dict) and isinstance(reason.get("exception"), dict):
            tb = reason["exception"].get("traceback") or []
            if tb and isinstance(tb[-1], dict):
                frame = f"{tb[-1].get('file')}:{tb[-1].get('line')} in {tb[-1].get('function')}"
        if frame:
            note += f"\n\nat `{frame}`"
        tags = [RunTag("fg.end_status", status), RunTag("fg.end_reason", text[:MAX_TAG_VALUE]),
                RunTag(MLFLOW_RUN_NOTE, note[:MAX_TAG_VALUE])]
        end_ms = run.last_ms or int(time.time() * 1000)
        self._call("the end", lambda: (self.client.log_batch(run.run_id, tags=tags, synchronous=True),
                                       self.client.set_terminated(run.run_id, mlflow_status, end_time=end_ms)))
        run.ended = mlflow_status
        self._save_state()

    def close(self) -> None:
        """Release the lock and the signal handlers; a batch not sent is sent by the next sink (its position)."""
        self._lock = released(self._lock)
        for s, previous in self._handlers.items():
            signal.signal(s, previous)
        self._handlers = {}


def _env_tags() -> dict[str, str]:
    """MLFLOW_TAGS, a JSON object, as MLflowCallback reads it."""
    text = os.environ.get("MLFLOW_TAGS")
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        logger.warning("MLFLOW_TAGS is not JSON; ignored")
        return {}
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}


def _note(event: str, record: dict, step: int) -> str:
    """One line for a warning / control / alert record."""
    if event == "control":
        state = "applied" if record.get("applied") else ("accepted" if record.get("accepted") else "refused")
        text = f"{record.get('cmd', '?')} {state}" + (f" ({record['reason']})" if record.get("reason") else "")
        source = record.get("source") or record.get("origin")
        if source:
            text += f" from {source}"
    else:
        kind = record.get("kind")
        text = (f"{kind}: " if kind else "") + str(record.get("message", ""))
    return printable(f"step {step} at {record.get('timestamp')}: {text}")[:MAX_TAG_VALUE]
