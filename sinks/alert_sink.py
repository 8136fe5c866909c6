"""`fg-sink alert`: rules over a run's stream that raise alerts, delivered to stderr, a webhook and a command.

Rules (each on by default; `disable` turns one off by name):
  nonfinite-loss   a NaN/Inf `loss` in on_log or on_step_end metrics (once, until a finite loss is seen again)
  trainer-alert    an `alert` record the trainer published (the DivergenceDetector): forwarded as it is
  stalled          a `warning` record of kind `stalled` (the bus's stall watcher)
  run-end          the run died (no heartbeat, no end record) or failed (its end record says `failed`): the
                   alert gives the reason (the exception and where it was raised; what the follower saw);
                   a run completed, stopped (`fg-bus ctl`, a callback) or interrupted (a signal: someone
                   meant it) raises none
  eval-plateau     the eval metric (`eval_loss`, or `eval_metric`) did not improve for `eval_patience` evaluations
  throughput-drop  training `samples_per_second` below `throughput_drop` x the median of the earlier logs (after
                   at least 10 logs; once, until it recovers)

Each alert is delivered once: one line on stderr, a JSON POST to `webhook` (payload `json`: the alert itself,
`slack`: {"text": ...}, `discord`: {"content": ...}; a few tries with backoff, bounded), and `exec_cmd` run by
/bin/sh with the alert as JSON on stdin (bounded time). A failed delivery is one line on stderr and changes no
exit status. Per rule, alerts closer than `min_interval` seconds (of record time) to the last one are
suppressed and counted (the next alert says how many).

The alert log, OUTPUT_DIR/alerts/RUN.jsonl by default, holds one JSON line per alert raised (with what each
delivery did), and is how a restarted sink knows what it already sent: the sink replays the run from its start
(the rules need the history: a median, a best eval), and an alert whose key is in the log is not sent again.
The webhook URL never appears in the log or on stderr (only its host: the path may hold a token).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from fg_bus import records, registry
from fg_bus.monitor import failure_frame, reason_text
from fg_bus.registry import RunInfo

from ._output import AppendFile, OutputError, OutputLock, dir_mode, file_mode, make_dirs, printable, released
from .base import Sink, expand

logger = logging.getLogger(__name__)

DEFAULT_LOG = "{output_dir}/alerts/{run}.jsonl"
RULES = ("nonfinite-loss", "trainer-alert", "stalled", "run-end", "eval-plateau", "throughput-drop")
FORMATS = ("json", "slack", "discord")
#: training logs needed before the throughput rule compares against their median; and how many it keeps
THROUGHPUT_MIN_LOGS = 10
THROUGHPUT_WINDOW = 1000
#: webhook: tries, seconds per try, the backoff before each retry, and the most time all tries may take
WEBHOOK_TRIES = 4
WEBHOOK_TIMEOUT = 5.0
WEBHOOK_BACKOFF = (0.5, 1.0, 2.0)
WEBHOOK_BUDGET = 20.0
EXEC_TIMEOUT = 10.0


@dataclass
class Alert:
    rule: str
    key: str  # what makes it this alert and no other: a restarted sink does not send a key twice
    message: str
    run: str
    rank: int = 0
    seq: int | None = None
    global_step: int | None = None
    timestamp: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    suppressed: int = 0  # alerts of this rule suppressed by min_interval since the last one

    def line(self) -> str:
        step = f" step {self.global_step}" if self.global_step is not None else ""
        more = f" (+{self.suppressed} suppressed)" if self.suppressed else ""
        return printable(f"ALERT [{self.rule}] run {self.run}{step}: {self.message}{more}")


def webhook_host(url: str) -> str:
    """What may be shown of a webhook URL: its host (and port), never its path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def _request_parts(url: str) -> tuple[str, dict[str, str]]:
    """The URL urllib can open (it does not take user:password@host) and the headers that carry the rest."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": "fg-sink-alert"}
    if parts.username is None and parts.password is None:
        return url, headers
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    if ":" in (parts.hostname or ""):
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), headers


def _seconds(timestamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(timestamp)).timestamp()
    except ValueError:
        return None


#: record fields that are the record's own, not what a trainer's alert says
_RECORD_FIELDS = frozenset({"v", "run", "rank", "seq", "timestamp", "event", "message", "metrics", "global_step",
                            "epoch"})


def _jsonable(value: Any) -> Any:
    """Strict JSON (webhooks reject NaN): non-finite floats become their names."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class AlertSink(Sink):
    kind = "alert"

    def __init__(self, webhook: str | None = None, webhook_format: str = "json", exec_cmd: str | None = None,
                 min_interval: float = 60.0, eval_patience: int = 5, eval_metric: str = "eval_loss",
                 greater_is_better: bool = False, throughput_drop: float = 0.5, disable: list[str] | None = None,
                 alert_log: str = DEFAULT_LOG, group_readable: bool = False, stream: TextIO | None = None,
                 ranks: str = "0", webhook_tries: int = WEBHOOK_TRIES, webhook_timeout: float = WEBHOOK_TIMEOUT,
                 webhook_budget: float = WEBHOOK_BUDGET, exec_timeout: float = EXEC_TIMEOUT):
        if webhook is not None:
            parts = urllib.parse.urlsplit(webhook)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("webhook: expected an http:// or https:// URL with a host")
        if webhook_format not in FORMATS:
            raise ValueError(f"webhook_format {webhook_format!r}: choose {', '.join(FORMATS)}")
        if not (math.isfinite(min_interval) and min_interval >= 0):
            raise ValueError(f"min_interval {min_interval!r}: expected seconds, 0 or more")
        if eval_patience < 0:
            raise ValueError(f"eval_patience {eval_patience!r}: expected 0 (off) or more evaluations")
        if not (math.isfinite(throughput_drop) and 0 <= throughput_drop < 1):
            raise ValueError(f"throughput_drop {throughput_drop!r}: expected a fraction from 0 (off) to below 1")
        unknown = [r for r in disable or [] if r not in RULES]
        if unknown:
            raise ValueError(f"disable {unknown[0]!r}: the rules are {', '.join(RULES)}")
        if webhook_tries < 1 or webhook_timeout <= 0 or webhook_budget <= 0 or exec_timeout <= 0:
            raise ValueError("webhook_tries, webhook_timeout, webhook_budget and exec_timeout must be above 0")
        self.webhook = webhook
        self.webhook_format = webhook_format
        self.exec_cmd = exec_cmd
        self.min_interval = min_interval
        self.eval_patience = eval_patience
        self.eval_metric = eval_metric
        self.greater_is_better = greater_is_better
        self.throughput_drop = throughput_drop
        self.rules = frozenset(r for r in RULES if r not in (disable or []))
        if not eval_patience:
            self.rules -= {"eval-plateau"}
        if not throughput_drop:
            self.rules -= {"throughput-drop"}
        self.template = alert_log
        self.group_readable = group_readable
        self.stream = stream or sys.stderr
        self.ranks = ranks
        self.webhook_tries, self.webhook_timeout, self.webhook_budget = webhook_tries, webhook_timeout, webhook_budget
        self.exec_timeout = exec_timeout
        self.path: Path | None = None
        self._file: AppendFile | None = None
        self._lock: OutputLock | None = None
        self.raised: list[Alert] = []  # alerts raised (and delivered) by this process
        self.failures = 0  # deliveries that failed
        self._reset(None)

    def _reset(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._sent: set[str] = set()  # keys in the alert log: already sent
        self._last_fired: dict[str, float] = {}  # rule -> record time of its last alert
        self._suppressed: dict[str, int] = {}
        self._nonfinite: set[int] = set()  # ranks whose loss is non-finite now
        self._best: dict[int, float] = {}
        self._bad_evals: dict[int, int] = {}
        self._eval_steps: dict[int, int] = {}  # rank -> global step of its last eval counted (on_log + on_evaluate)
        self._throughput: dict[int, deque] = {}
        self._dropped: set[int] = set()
        self._last_time: float | None = None
        self._last_step: dict[int, int] = {}

    # -- the sink protocol --

    def open_run(self, info: RunInfo) -> int:
        self._close_log()
        self._reset(info.run_id)
        path = Path(expand(self.template, info))
        if path.is_dir():
            raise OutputError(f"--alert-log {path} is a directory; give a file name (default {DEFAULT_LOG})")
        make_dirs(path.parent, dir_mode(self.group_readable))
        self._lock_for(path)
        try:
            if path.exists():
                self._sent = self._keys_in(path)
            self._file = AppendFile(path, file_mode(self.group_readable))
        except OSError as e:
            raise OutputError(f"cannot write the alert log {path}: {e.strerror or e}; choose another "
                              "--alert-log") from None
        self.path = path
        return 0  # always the whole history: the rules need it; the log says what was already sent

    @staticmethod
    def _keys_in(path: Path) -> set[str]:
        keys = set()
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    logger.warning("%s line %d is not an alert; ignored", path, number)
        return keys

    def _lock_for(self, path: Path) -> None:
        lock = path.with_name(f".{path.name}.lock")
        if self._lock is not None and self._lock.path == lock:
            return
        self._lock = released(self._lock)
        self._lock = OutputLock(lock, f"the alert log {path}", file_mode(self.group_readable)).acquire()

    def handle(self, record: dict) -> None:
        event = record["event"]
        rank = record.get("rank", 0)
        when = _seconds(record.get("timestamp"))
        if when is not None:
            self._last_time = when
        if isinstance(record.get("global_step"), int):
            self._last_step[rank] = record["global_step"]
        metrics = record.get("metrics") or {}
        if not isinstance(metrics, dict):
            metrics = {}
        if event in ("on_log", "on_step_end") and "loss" in metrics:
            self._check_loss(record, rank, metrics["loss"])
        if event in ("on_log", "on_evaluate"):
            self._check_eval(record, rank, metrics)
        if event == "on_log" and "loss" in metrics and "samples_per_second" in metrics:
            self._check_throughput(record, rank, _number(metrics["samples_per_second"]))
        if event == "alert":
            kind = printable(record.get("kind") or "alert")
            action = record.get("action")
            message = printable(record.get("message") or kind) + (f" (action: {printable(action)})" if action else "")
            details = {k: v for k, v in record.items() if k not in _RECORD_FIELDS}
            self._fire("trainer-alert", record, message, {**details, "kind": kind, "action": action})
        elif event == "warning" and record.get("kind") == "stalled":
            self._fire("stalled", record, printable(record.get("message") or "no progress"),
                       {"stalled_for": _number(record.get("stalled_for"))})
        elif event == records.END:
            if record.get("status") == registry.FAILED:
                reason = record.get("reason") if isinstance(record.get("reason"), dict) else None
                why = reason_text(reason)
                if why is None:  # an end record from before reasons
                    why = next((record[k] for k in ("error", "exception", "message") if record.get(k)), None)
                    if isinstance(why, dict):
                        why = ": ".join(str(why[k]) for k in ("type", "message") if why.get(k)) or json.dumps(why)
                frame = failure_frame(reason)
                message = "the run failed" + (f": {why}" if why else "") + (f" (at {frame})" if frame else "")
                self._fire("run-end", record, printable(message), {"status": registry.FAILED, "reason": reason},
                           key=f"run-end:{rank}", limit=False)

    def end_run(self, status: str, reason: dict | None = None) -> None:
        if status == registry.DEAD:  # a failed end record raised this alert already: the same key
            rank = min(self._last_step) if self._last_step else 0
            why = reason_text(reason)
            self._fire("run-end", {"rank": rank, "global_step": self._last_step.get(rank)},
                       "the trainer died: " + printable(why or "no heartbeat and no end record"),
                       {"status": registry.DEAD, "reason": reason}, key=f"run-end:{rank}", limit=False)
        if self._file is not None:
            self._file.sync()

    def retry_write(self) -> None:
        """After a full disk: write the alert log's held lines (raises OSError while there is no room)."""
        if self._file is not None:
            self._file.sync()

    def close(self) -> None:
        try:
            self._close_log()
        finally:
            self._lock = released(self._lock)

    def _close_log(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.sync()
            finally:
                file.close()

    # -- rules --

    def _check_loss(self, record: dict, rank: int, loss: Any) -> None:
        value = _number(loss)
        if value is None:
            return
        if math.isfinite(value):
            self._nonfinite.discard(rank)
        elif rank not in self._nonfinite:
            self._nonfinite.add(rank)
            self._fire("nonfinite-loss", record, f"loss is {value} ({record['event']})", {"loss": str(value)})

    def _check_eval(self, record: dict, rank: int, metrics: dict) -> None:
        name = self.eval_metric if self.eval_metric in metrics else f"eval_{self.eval_metric}"
        value = _number(metrics.get(name))
        step = record.get("global_step")
        if value is None or not math.isfinite(value) or self._eval_steps.get(rank) == step:
            return  # on_log and on_evaluate both carry an evaluation's metrics: count it once
        self._eval_steps[rank] = step
        best = self._best.get(rank)
        if best is None or (value > best if self.greater_is_better else value < best):
            self._best[rank] = value
            self._bad_evals[rank] = 0
            return
        self._bad_evals[rank] = self._bad_evals.get(rank, 0) + 1
        if self._bad_evals[rank] == self.eval_patience:
            self._fire("eval-plateau", record, f"{name} has not improved for {self.eval_patience} "
                                               f"evaluation{'s' if self.eval_patience > 1 else ''} "
                                               f"(best {best:.4g}, now {value:.4g})",
                       {"metric": name, "best": best, "value": value, "patience": self.eval_patience})

    def _check_throughput(self, record: dict, rank: int, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        history = self._throughput.setdefault(rank, deque(maxlen=THROUGHPUT_WINDOW))
        if len(history) >= THROUGHPUT_MIN_LOGS:
            median = statistics.median(history)
            if value < self.throughput_drop * median:
                if rank not in self._dropped:
                    self._dropped.add(rank)
                    self._fire("throughput-drop", record, f"samples_per_second {value:.4g} is below "
                                                          f"{self.throughput_drop:g} x its median {median:.4g}",
                               {"samples_per_second": value, "median": median})
            else:
                self._dropped.discard(rank)
        history.append(value)

    # -- raising and delivering --

    def _fire(self, rule: str, record: dict, message: str, details: dict, key: str | None = None,
              limit: bool = True) -> None:
        if rule not in self.rules:
            return
        rank = record.get("rank", 0)
        key = key or f"{rule}:{rank}:{record.get('seq')}"
        when = _seconds(record.get("timestamp")) or self._last_time or time.time()
        if limit:
            last = self._last_fired.get(rule)
            if last is not None and when - last < self.min_interval and key not in self._sent:
                self._suppressed[rule] = self._suppressed.get(rule, 0) + 1
                return
            self._last_fired[rule] = when
        if key in self._sent:
            self._suppressed.pop(rule, None)
            return  # sent before this sink restarted
        alert = Alert(rule=rule, key=key, message=message, run=self.run_id or str(record.get("run", "?")), rank=rank,
                      seq=record.get("seq"), global_step=record.get("global_step"),
                      timestamp=record.get("timestamp") or datetime.fromtimestamp(when).astimezone().isoformat(),
                      details=_jsonable(details), suppressed=self._suppressed.pop(rule, 0))
        self._sent.add(key)
        self.raised.append(alert)
        self._say(alert.line())
        delivered = {"stderr": True}
        if self.webhook:
            delivered["webhook"] = self._post(alert)
        if self.exec_cmd:
            delivered["exec"] = self._exec(alert)
        if self._file is not None:
            self._file.write(json.dumps({**asdict(alert), "delivered": delivered}).encode() + b"\n")
            self._file.sync()

    def _say(self, text: str) -> None:
        self.stream.write(printable(f"fg-sink alert: {text}") + "\n")
        self.stream.flush()

    def payload(self, alert: Alert) -> bytes:
        if self.webhook_format == "slack":
            body: dict = {"text": alert.line()}
        elif self.webhook_format == "discord":
            body = {"content": alert.line()[:2000]}  # Discord's limit for a message
        else:
            body = asdict(alert)
        return json.dumps(body).encode()

    def _post(self, alert: Alert) -> bool:
        host = webhook_host(self.webhook)
        data = self.payload(alert)
        url, headers = _request_parts(self.webhook)
        deadline = time.monotonic() + self.webhook_budget
        why = "?"
        tries = 0
        for attempt in range(self.webhook_tries):
            if attempt:
                pause = WEBHOOK_BACKOFF[min(attempt - 1, len(WEBHOOK_BACKOFF) - 1)]
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            tries += 1
            request = urllib.request.Request(url, data=data, method="POST", headers=headers)
            timeout = max(0.1, min(self.webhook_timeout, deadline - time.monotonic()))
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    response.read(1 << 16)
                return True
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:
                    break  # the server refuses this request: trying again will not help
            except urllib.error.URLError as e:
                why = printable(getattr(e.reason, "strerror", None) or e.reason)
            except (OSError, ValueError) as e:  # a timeout, a reset connection, a bad response
                why = type(e).__name__ + (f": {e.strerror}" if getattr(e, "strerror", None) else "")
        self.failures += 1
        self._say(f"could not deliver alert [{alert.rule}] to the webhook at {host}: {why} "
                  f"({tries} {'try' if tries == 1 else 'tries'}); it stays in {self.path or 'the alert log'}")
        return False

    def _exec(self, alert: Alert) -> bool:
        try:
            done = subprocess.run(["/bin/sh", "-c", self.exec_cmd], input=json.dumps(asdict(alert)).encode(),
                                  timeout=self.exec_timeout)
        except subprocess.TimeoutExpired:
            why = f"still running after {self.exec_timeout:g} s: killed"
        except OSError as e:
            why = e.strerror or str(e)
        else:
            if done.returncode == 0:
                return True
            why = f"exit status {done.returncode}"
        self.failures += 1
        self._say(f"could not deliver alert [{alert.rule}] with --exec: {why}")
        return False
