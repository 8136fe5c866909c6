"""A follower's model of one run: feed it the run's records (in seq order per rank) and read what a monitor
shows: progress, step rate, ETA, the latest metrics and their history, system metrics per rank, samples,
warnings, stalls and stragglers. `fg-sink tail`, `fg-bus ls` and `fg-bus top` all build on it.

`RunView` is pure: no sockets, no threads, no clock of its own (every time comes from a record's
timestamp), so a replayed history gives the same view as the live run did, and tests feed it records.

Stragglers (torchrun), once at least two ranks have `STRAGGLER_MIN_STEPS` (20) of the last
`STRAGGLER_WINDOW` (50) steps in common (always the same steps for every rank, so a late join that replays
one rank's journal after another's compares like with like):
- a rank's step time is `on_step_end - on_step_begin` of one step; its figure is the median over the window;
- a rank's lateness at a step is how long after the first rank it began it; its figure is the median too;
- a rank's data time is the `data_time` of its `on_step_end` records: the seconds it waited for that step's
  batches (this trainer measures it on the host around the data iterator only, outside every collective,
  so it stays this rank's own under DDP); its figure is the median too;
- a rank's step period is the time from one `on_step_end` to the next (the whole step, its data wait and
  the collectives between steps included: what a training log's `step_time` is); its figure is the median.
Rule 1, data (DDP): a rank whose median data time is above `STRAGGLER_RATIO` (1.5) times the median of the
other ranks' medians, by more than `DATA_EXCESS` (0.1) times the median step period (over the ranks), is a
straggler: slow data loading, the commonest cause. When it names a rank, the timestamp rules
below are not applied (under DDP the others' steps are the long ones: they wait for it).
Rule 2, timestamps, for runs whose ranks do not sync inside a step (where rule 1 names none, or the records
have no data time). A rank that begins late by more than `STRAGGLER_RATIO - 1` (0.5) times its own median
step time, but by no more than one step of the others (ranks that wait for each other are never further
apart), is a straggler: the others wait for it inside their step, so theirs grow and its own does not.
Failing that, a rank whose median step time is above `STRAGGLER_RATIO` (1.5) times the median of the other
ranks' medians is one. What timestamps cannot see: under DDP the gradient all-reduce inside the step makes
every rank's step as long as the slowest's (measured with 2 CPU ranks under torchrun, rank 1 sleeping 50 ms
in each step: 75.8 vs 73.8 ms), and this trainer's token-count all-reduce before `on_step_begin` makes a
rank slow between steps hold the others there, so all begin together. Under DDP, rule 1 names a rank slow
to load its data; a slow device shows in the per-rank system records (utilisation, throttling).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from datetime import datetime
from typing import Any

from ._format import (end_text, failure_frame, format_duration, format_value, metric_label, ordered_metrics,
                      reason_text)

__all__ = ["RunView", "end_text", "failure_frame", "reason_text", "format_duration", "format_value", "metric_label",
           "ordered_metrics"]

#: How many points a metric's series keeps before it is thinned (every other old point dropped).
SERIES_MAX = 1000
STRAGGLER_WINDOW = 50
STRAGGLER_MIN_STEPS = 20
STRAGGLER_RATIO = 1.5
#: rule 1 (data time) also needs the excess wait to be more than this fraction of the median step time
DATA_EXCESS = 0.1
#: on_step_end timestamps the step rate is measured over (the recent rate, not the run's average).
RATE_WINDOW = 50
SAMPLES_KEPT = 20
#: statuses of a run that goes on; and of one that is over (the end record's, or dead as a follower saw it)
LIVE_STATUSES = ("live", "stalled", "paused", "running")
END_STATUSES = ("completed", "stopped", "interrupted", "failed", "dead")
EVENTS_KEPT = 100

#: keys of a training on_log that are not metrics of the run's progress
_NOT_METRICS = frozenset({"epoch", "total_flos"})
_TRAINER_EVENTS = frozenset({"on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
                             "on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step",
                             "on_step_end", "on_evaluate", "on_predict", "on_save", "on_log", "on_prediction_step"})


# -- the model ------------------------------------------------------------------------------------------------

def _time(value: Any) -> float | None:
    """A record's timestamp (ISO 8601, or a number) as unix seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value.timestamp()
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


class _Series(list):
    """(step, value) points; beyond SERIES_MAX, every other older point goes (the newest always stays)."""

    def add(self, step: int, value: float) -> None:
        if self and self[-1][0] == step:  # the same step logged twice (on_log and on_evaluate): one point
            self[-1] = (step, value)
            return
        self.append((step, value))
        if len(self) > SERIES_MAX:
            last = self[-1]
            self[:] = self[:-1:2] + [last]


class RunView:
    """What a monitor knows of one run, built from its records. Feed records of every followed rank, each
    rank's in seq order; metrics come from `metrics_rank` (rank 0 by default), steps and system metrics are
    kept per rank."""

    def __init__(self, run_id: str | None = None, metrics_rank: int = 0):
        self.run_id = run_id
        self.metrics_rank = metrics_rank
        self.name: str | None = None
        self._status = "unknown"
        self.end_status: str | None = None  # the end record's: completed / stopped / interrupted / failed
        #: why it ended: the end record's `reason` (fg_bus.records.end_reason: `text`, who stopped it, the
        #: signal, the exception), or what the follower saw for a dead run (`set_status(..., reason)`)
        self.end_reason: dict | None = None
        self.world_size = 1
        self.max_steps: int | None = None
        self.epoch: float | None = None
        self.steps: dict[int, int] = {}  # global step per rank
        self.latest: dict[str, float] = {}
        self.latest_step: int | None = None
        self.eval_latest: dict[str, float] = {}
        self.eval_step: int | None = None
        self.final: dict[str, float] = {}  # the last on_log of training (train_loss, train_runtime, ...)
        self.series: dict[str, _Series] = {}
        self.system: dict[int, dict[str, float]] = {}
        self.gpus: dict[int, list] = {}
        self.samples: deque = deque(maxlen=SAMPLES_KEPT)
        self.events: deque = deque(maxlen=EVENTS_KEPT)
        self.last_timestamp: float | None = None
        self.meta: dict = {}
        self._best_metric = "eval_loss"
        self._greater_is_better = False
        self._best: tuple[str, float, int] | None = None
        self._step_times: deque = deque(maxlen=RATE_WINDOW)  # (timestamp, step) of on_step_end, metrics rank
        self._logged_rate: float | None = None
        self._begun: dict[int, tuple[int, float]] = {}  # rank -> (step, on_step_begin timestamp)
        self._durations: dict[int, deque] = {}
        self._medians: dict[int, float] = {}  # rank -> median step time over the same steps for every rank
        self._data_times: dict[int, deque] = {}  # rank -> (step, data_time) of its on_step_end records
        self._data_medians: dict[int, float] = {}  # rank -> median data_time over those same steps
        self._last_end: dict[int, tuple[int, float]] = {}  # rank -> (step, timestamp) of its last on_step_end
        self._periods: dict[int, deque] = {}  # rank -> (step, time since the previous step's on_step_end)
        self._period_medians: dict[int, float] = {}
        self._compared_upto = -1
        self._starts: dict[int, dict[int, float]] = {}  # step -> {rank: on_step_begin timestamp}, bounded
        self._stepping: set[int] = set()  # ranks that have begun a step
        self._lateness: dict[int, deque] = {}  # rank -> how long after the first rank it began each step
        self._late_medians: dict[int, float] = {}
        self._stalled: dict[int, float] = {}  # rank -> stalled_for as last reported
        self._stragglers: list[int] = []
        self.new_stragglers: list[int] = []  # ranks that became stragglers with the last fed record

    # -- input --

    def set_status(self, status: str, reason: dict | None = None) -> None:
        """The run's status as the subscriber or the registry sees it: live / stalled / paused while it runs,
        completed / stopped / interrupted / failed / dead once it is over; `reason` (a dict with `text`), why
        it ended, where the end record did not say (a dead run: what the follower saw)."""
        self._status = status
        if status not in LIVE_STATUSES:
            self._stalled.clear()
            if isinstance(reason, dict) and self.end_status is None:  # the end record's own reason wins
                self.end_reason = reason

    @property
    def ended(self) -> bool:
        """The run is over (its end record came, or its follower gave it up as dead)."""
        return self.end_status is not None or self._status in END_STATUSES

    def describe_end(self) -> str | None:
        """"stopped: `fg-bus ctl stop` from alice@host ..." (one line, `end_text`) for an ended run, else None."""
        if not self.ended:
            return None
        return end_text(self.end_status or self._status, self.end_reason)

    def feed(self, record: dict) -> None:
        event = record.get("event")
        rank = record.get("rank", 0) if isinstance(record.get("rank", 0), int) else 0
        ts = _time(record.get("timestamp"))
        if ts is not None:
            self.last_timestamp = ts if self.last_timestamp is None else max(self.last_timestamp, ts)
        if self.run_id is None and isinstance(record.get("run"), str):
            self.run_id = record["run"]
        step = record.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            # a heartbeat carries the bus's last step, which may lag the record just fed
            self.steps[rank] = max(self.steps.get(rank, 0), step) if event == "heartbeat" else step
        if isinstance(record.get("epoch"), (int, float)) and rank == self.metrics_rank:
            self.epoch = record["epoch"]
        self.new_stragglers = []
        if event in _TRAINER_EVENTS and rank in self._stalled:
            del self._stalled[rank]  # steps resumed (the stall-cleared warning says so too)
        handler = getattr(self, "_on_" + event, None) if isinstance(event, str) else None
        if handler is not None:
            handler(record, rank, ts)

    def _on_on_train_begin(self, record: dict, rank: int, ts: float | None) -> None:
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        if rank == self.metrics_rank or not self.meta:
            self.meta = meta
        if self._status == "unknown":
            self._status = "live"
        self.name = meta.get("name") if isinstance(meta.get("name"), str) else self.name
        if isinstance(meta.get("world_size"), int) and meta["world_size"] > 0:
            self.world_size = meta["world_size"]
        args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
        for candidate in (meta.get("max_steps"), args.get("max_steps")):
            if isinstance(candidate, int) and not isinstance(candidate, bool) and candidate > 0:
                self.max_steps = candidate
                break
        metric = args.get("metric_for_best_model")
        if isinstance(metric, str) and metric:
            self._best_metric = metric if metric.startswith("eval_") else "eval_" + metric
            greater = args.get("greater_is_better")
            # transformers' default: greater is better unless the metric is a loss
            self._greater_is_better = bool(greater) if greater is not None else not metric.endswith("loss")

    def _on_on_step_begin(self, record: dict, rank: int, ts: float | None) -> None:
        if ts is not None and isinstance(record.get("global_step"), int):
            step = record["global_step"]
            self._begun[rank] = (step, ts)
            self._stepping.add(rank)
            starts = self._starts.setdefault(step, {})
            starts[rank] = ts
            if len(starts) >= 2 and len(starts) == len(self._stepping):  # every rank has begun this step
                del self._starts[step]
                first = min(starts.values())
                for r, t in starts.items():
                    late = self._lateness.setdefault(r, deque(maxlen=STRAGGLER_WINDOW))
                    late.append(t - first)
                    if len(late) >= STRAGGLER_MIN_STEPS:
                        self._late_medians[r] = statistics.median(late)
                if len(self._medians) >= 2:
                    self._update_stragglers()
            while len(self._starts) > 4 * STRAGGLER_WINDOW:  # a rank far behind, or gone: forget the oldest
                del self._starts[next(iter(self._starts))]

    def _on_on_step_end(self, record: dict, rank: int, ts: float | None) -> None:
        step = record.get("global_step")
        if ts is None or not isinstance(step, int):
            return
        if rank == self.metrics_rank:
            self._step_times.append((ts, step))
        metrics = record.get("metrics")
        data_time = _number(metrics.get("data_time")) if isinstance(metrics, dict) else None
        if data_time is not None:
            self._data_times.setdefault(rank, deque(maxlen=4 * STRAGGLER_WINDOW)).append((step, data_time))
            last = self._last_end.get(rank)
            if last is not None and last[0] == step - 1:
                self._periods.setdefault(rank, deque(maxlen=4 * STRAGGLER_WINDOW)).append((step, ts - last[1]))
            self._last_end[rank] = (step, ts)
        begun = self._begun.pop(rank, None)
        if begun is None or begun[0] != step - 1:
            return
        # (step, duration), kept beyond the window: a rank replayed ahead of the others (a late join reads
        # one rank's journal, then the next) is compared with them over the same steps
        self._durations.setdefault(rank, deque(maxlen=4 * STRAGGLER_WINDOW)).append((step, ts - begun[1]))
        if len(self._durations) < 2:
            return
        upto = min(d[-1][0] for d in self._durations.values())  # the last step every rank has done
        if upto <= self._compared_upto:
            return  # evaluated once per step, not once per rank's step end
        self._compared_upto = upto
        self._medians = self._window_medians(self._durations, upto)
        self._data_medians = self._window_medians(self._data_times, upto)
        # the periods between the same step ends: one fewer than the steps (the first has no previous end)
        self._period_medians = self._window_medians(self._periods, upto, STRAGGLER_MIN_STEPS - 1)
        self._update_stragglers()

    @staticmethod
    def _window_medians(per_rank: dict[int, deque], upto: int, least: int = STRAGGLER_MIN_STEPS) -> dict[int, float]:
        """rank -> median of its (step, value) pairs over the straggler window ending at step `upto` (ranks
        with at least `least` of them there)."""
        medians = {}
        for r, values in per_rank.items():
            window = [v for s, v in values if upto - STRAGGLER_WINDOW < s <= upto]
            if len(window) >= least:
                medians[r] = statistics.median(window)
        return medians

    def _on_on_log(self, record: dict, rank: int, ts: float | None) -> None:
        if rank != self.metrics_rank:
            return
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        step = record.get("global_step") if isinstance(record.get("global_step"), int) else 0
        if any(k.startswith("eval_") for k in metrics):
            self._eval(metrics, step)
            return
        if "train_loss" in metrics or "train_runtime" in metrics:
            self.final = {k: v for k, v in metrics.items() if _number(v) is not None}
            return
        for key, value in metrics.items():
            if key in _NOT_METRICS or _number(value) is None:
                continue
            self.latest[key] = value
            self.series.setdefault(key, _Series()).add(step, value)
        self.latest_step = step
        if _number(metrics.get("steps_per_second")) is not None:
            self._logged_rate = metrics["steps_per_second"]

    def _on_on_evaluate(self, record: dict, rank: int, ts: float | None) -> None:
        if rank == self.metrics_rank:
            metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
            self._eval(metrics, record.get("global_step") if isinstance(record.get("global_step"), int) else 0)

    def _eval(self, metrics: dict, step: int) -> None:
        shown = {k: v for k, v in metrics.items() if k not in _NOT_METRICS and _number(v) is not None}
        if not shown:
            return
        self.eval_latest = shown
        self.eval_step = step
        for key, value in shown.items():
            if not key.endswith(("_runtime", "_per_second")):
                self.series.setdefault(key, _Series()).add(step, value)
        value = shown.get(self._best_metric)
        if value is not None and not math.isnan(value):
            best = self._best
            if best is None or (value > best[1] if self._greater_is_better else value < best[1]):
                self._best = (self._best_metric, value, step)

    def _on_system(self, record: dict, rank: int, ts: float | None) -> None:
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        values = {k: v for k, v in metrics.items() if _number(v) is not None}
        values["timestamp"] = ts if ts is not None else 0.0
        self.system[rank] = values
        gpus = record.get("gpus", metrics.get("gpus"))
        if isinstance(gpus, list):
            self.gpus[rank] = gpus

    def _on_textgen(self, record: dict, rank: int, ts: float | None) -> None:
        step = record.get("global_step", 0)
        if record.get("text") is None:
            self._event(ts, "warning", f"sample skipped: {record.get('skipped', '')}")
            return
        self.samples.append((step, str(record.get("prompt", "")), str(record.get("text", ""))))

    def _on_warning(self, record: dict, rank: int, ts: float | None) -> None:
        kind = record.get("kind")
        stalled_for = _number(record.get("stalled_for"))
        where = f"rank {rank}: " if self.world_size > 1 else ""
        if kind == "stalled":
            self._stalled[rank] = stalled_for if stalled_for is not None else 0.0
            self._event(ts, "stalled", where + str(record.get("message") or
                                                   f"no step for {format_duration(stalled_for)}"))
        elif kind == "stall-cleared":
            self._stalled.pop(rank, None)
            self._event(ts, "stall-cleared", where + str(record.get("message") or "steps resumed"))
        else:
            self._event(ts, "warning", where + str(record.get("message", "")))

    def _on_heartbeat(self, record: dict, rank: int, ts: float | None) -> None:
        stalled_for = _number(record.get("stalled_for"))
        if stalled_for is not None:
            self._stalled[rank] = stalled_for
        else:
            self._stalled.pop(rank, None)
        if self._status == "unknown":
            self._status = "live"

    def _on_control(self, record: dict, rank: int, ts: float | None) -> None:
        if rank != self.metrics_rank:
            return
        state = "applied" if record.get("applied") else ("accepted" if record.get("accepted") else "refused")
        reason = f" ({record['reason']})" if record.get("reason") else ""
        self._event(ts, "control", f"{record.get('cmd', '?')} {state}{reason}")

    def _on_on_save(self, record: dict, rank: int, ts: float | None) -> None:
        if rank == self.metrics_rank:
            self._event(ts, "save", f"saved {record.get('checkpoint', '')}")

    def _on_end(self, record: dict, rank: int, ts: float | None) -> None:
        status = record.get("status")
        self._stalled.pop(rank, None)
        if rank == self.metrics_rank:
            self.end_status = status if isinstance(status, str) else "?"
            reason = record.get("reason")
            self.end_reason = reason if isinstance(reason, dict) and isinstance(reason.get("text"), str) else None
            self._status = self.end_status
            self._event(ts, "end", end_text(self.end_status, self.end_reason))

    def _event(self, ts: float | None, kind: str, text: str) -> None:
        self.events.append((ts if ts is not None else 0.0, kind, text))

    def _update_stragglers(self) -> None:
        medians, reasons, waits = self._medians, {}, self._data_medians
        if len(waits) >= 2 and self._period_medians:
            # Rule 1: a rank that waits longer for its data than the others, by a share of the step that counts.
            step = statistics.median(self._period_medians.values())
            for rank, wait in waits.items():
                others = statistics.median(w for r, w in waits.items() if r != rank)
                if wait > STRAGGLER_RATIO * others and wait - others > DATA_EXCESS * step:
                    reasons[rank] = (f"rank {rank} is a straggler: it waits a median "
                                     f"{format_value('step_time', wait)} per step for its data against "
                                     f"{format_value('step_time', others)} on the other ranks (steps take "
                                     f"{format_value('step_time', step)})")
        if len(medians) >= 2 and not reasons:
            # Synchronous ranks (DDP): a rank that begins its steps late makes the others wait inside theirs,
            # so their step times grow, not its own: name the late one, not the ones that wait.
            for rank, late in self._late_medians.items():
                others = [m for r, m in medians.items() if r != rank]
                # more than a whole step late: the ranks do not wait for each other (see the module docstring)
                if rank in medians and others and \
                        (STRAGGLER_RATIO - 1) * medians[rank] < late <= statistics.median(others):
                    reasons[rank] = (f"rank {rank} is a straggler: it begins its steps a median "
                                     f"{format_value('step_time', late)} after the first rank, and steps take "
                                     f"{format_value('step_time', statistics.median(others))} on the others")
            if not reasons:
                for rank, median in medians.items():
                    others = statistics.median(m for r, m in medians.items() if r != rank)
                    if median > STRAGGLER_RATIO * others:
                        reasons[rank] = (f"rank {rank} is a straggler: median step "
                                         f"{format_value('step_time', median)} against "
                                         f"{format_value('step_time', others)} on the other ranks")
        found = sorted(reasons)
        self.new_stragglers = [r for r in found if r not in self._stragglers]
        for rank in self.new_stragglers:
            self._event(self.last_timestamp, "straggler", reasons[rank])
        self._stragglers = found

    # -- output --

    @property
    def status(self) -> str:
        if self._status in ("live", "running") and self._stalled:
            return "stalled"
        return self._status

    @property
    def global_step(self) -> int:
        return self.steps.get(self.metrics_rank, max(self.steps.values(), default=0))

    @property
    def progress(self) -> float | None:
        if not self.max_steps:
            return None
        return min(1.0, max(0.0, self.global_step / self.max_steps))

    @property
    def steps_per_second(self) -> float | None:
        """Over the last RATE_WINDOW on_step_end records; else the last logged steps_per_second."""
        if len(self._step_times) >= 2:
            (t0, s0), (t1, s1) = self._step_times[0], self._step_times[-1]
            if t1 > t0 and s1 > s0:
                return (s1 - s0) / (t1 - t0)
        return self._logged_rate

    @property
    def eta_s(self) -> float | None:
        rate = self.steps_per_second
        if not self.max_steps or not rate or self.ended:
            return None
        return max(0, self.max_steps - self.global_step) / rate

    @property
    def last_loss(self) -> float | None:
        return self.latest.get("loss")

    @property
    def best_eval(self) -> tuple[str, float, int] | None:
        return self._best

    @property
    def stalled_for(self) -> float | None:
        return max(self._stalled.values()) if self._stalled else None

    @property
    def stalled_ranks(self) -> list[int]:
        return sorted(self._stalled)

    @property
    def stragglers(self) -> list[int]:
        return list(self._stragglers)

    def step_time_medians(self) -> dict[int, float]:
        """The median on_step_end - on_step_begin per rank over the same last steps (the straggler figures;
        empty until two ranks have STRAGGLER_MIN_STEPS steps in common)."""
        return dict(self._medians)

    def data_time_medians(self) -> dict[int, float]:
        """The median `data_time` (s a rank waited for its batches per step) per rank over those same steps."""
        return dict(self._data_medians)

    def summary(self) -> dict:
        best = self.best_eval
        return {
            "run_id": self.run_id, "name": self.name, "status": self.status, "end_status": self.end_status,
            "end_reason": self.end_reason,
            "world_size": self.world_size, "global_step": self.global_step, "max_steps": self.max_steps,
            "epoch": self.epoch, "progress": self.progress, "steps_per_second": self.steps_per_second,
            "eta_s": self.eta_s, "last_loss": self.last_loss,
            "best_eval": {"name": best[0], "value": best[1], "step": best[2]} if best else None,
            "latest": dict(self.latest), "eval_latest": dict(self.eval_latest), "final": dict(self.final),
            "steps": {str(r): s for r, s in sorted(self.steps.items())},
            "system": {str(r): dict(v) for r, v in sorted(self.system.items())},
            "stalled_for": self.stalled_for, "stalled_ranks": self.stalled_ranks, "stragglers": self.stragglers,
            "samples": [{"step": s, "prompt": p, "text": t} for s, p, t in self.samples],
            "events": [{"timestamp": ts, "kind": k, "text": t} for ts, k, t in self.events],
        }
