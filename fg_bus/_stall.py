"""What the trainer's events say about the run, read on the bus thread as they are drained: its progress
(step, rate, ETA, last loss, best eval: `run.json`'s `progress`) and whether it has stalled.

Both are fed `observe(event, fields)` for every trainer event (`on_*`) once it is encoded, so the values
in it are host values by then; they look only at `on_train_begin`, `on_step_end`, `on_log` and
`on_evaluate` (a dict lookup for any other event), and keep a bounded window.

A stall: while training (between `on_train_begin` and `on_train_end`), no trainer event for
`max(stall_after, STEP_FACTOR x the median step time)` seconds. Every event counts as progress, the
batches of an evaluation (`on_prediction_step`) too, so a long evaluation is not a stall; a long checkpoint
save, which fires nothing until it is written, can be. Time in which the bus thread itself did not run
(the process stopped by SIGSTOP, or suspended) does not count.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from typing import Any

#: The stall threshold is at least this many median step times (a run of slow steps is not stalled early).
STEP_FACTOR = 10
#: The step-rate window: one (time, step) point per this many seconds at most, this many points.
_POINT_EVERY_S = 0.5
_POINTS = 64


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Progress:
    """The `progress` summary: `{"global_step", "max_steps", "steps_per_second", "eta_s", "last_loss",
    "best_eval": {"name", "value", "step"} | None}`."""

    def __init__(self):
        self.global_step: int | None = None
        self.max_steps: int | None = None
        self.last_loss: float | None = None
        self.best_name = "eval_loss"
        self.greater_is_better = False
        self.best: tuple[float, int] | None = None  # (value, step)
        self._points: collections.deque = collections.deque(maxlen=_POINTS)  # (publish time, step), >= 0.5 s apart
        self._latest: tuple[float, int] | None = None  # the last on_step_end

    def observe(self, event: str, fields: tuple) -> None:
        timestamp, _, step = fields[:3]
        if type(step) is int:
            self.global_step = step
        if event == "on_step_end":
            self._step_end(timestamp, step)
        elif event == "on_log":
            loss = _number((fields[4] or {}).get("loss"))
            if loss is not None:
                self.last_loss = loss
        elif event == "on_evaluate":
            self._evaluate(fields[4] or {}, step)
        elif event == "on_train_begin":
            self._train_begin(fields[5].get("meta") or {})

    def _train_begin(self, meta: dict) -> None:
        max_steps = meta.get("max_steps")
        self.max_steps = max_steps if type(max_steps) is int and max_steps > 0 else None
        args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
        name = args.get("metric_for_best_model")
        name = name if isinstance(name, str) and name else "eval_loss"
        self.best_name = name if name.startswith("eval_") else f"eval_{name}"  # transformers' rule
        greater = args.get("greater_is_better")
        self.greater_is_better = greater if isinstance(greater, bool) else not self.best_name.endswith("loss")
        self.best = None
        self._points.clear()
        self._latest = None

    def _step_end(self, timestamp: float, step: Any) -> None:
        if type(step) is not int:
            return
        points = self._points
        if self._latest is not None and step < self._latest[1]:
            points.clear()  # a new train() (or a resume) from an earlier step
        if not points or timestamp - points[-1][0] >= _POINT_EVERY_S:
            points.append((timestamp, step))
        self._latest = (timestamp, step)

    def _evaluate(self, metrics: dict, step: Any) -> None:
        value = _number(metrics.get(self.best_name))
        if value is None or math.isnan(value):
            return
        if (self.best is None or (value > self.best[0] if self.greater_is_better else value < self.best[0])):
            self.best = (value, step if type(step) is int else None)

    @property
    def steps_per_second(self) -> float | None:
        """Over the window (the last half minute or more of steps)."""
        if not self._points or self._latest is None:
            return None
        (t0, s0), (t1, s1) = self._points[0], self._latest
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    @property
    def median_step_s(self) -> float | None:
        """The median time per step between the window's points (None before two points)."""
        points = list(self._points)
        times = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(points, points[1:]) if b[1] > a[1]]
        return statistics.median(times) if times else None

    def summary(self) -> dict:
        rate = self.steps_per_second
        eta = None
        if rate and self.max_steps is not None and self.global_step is not None:
            eta = max(self.max_steps - self.global_step, 0) / rate
        best = None
        if self.best is not None:
            best = {"name": self.best_name, "value": self.best[0], "step": self.best[1]}
        return {"global_step": self.global_step, "max_steps": self.max_steps, "steps_per_second": rate,
                "eta_s": eta, "last_loss": self.last_loss, "best_eval": best}


class StallDetector:
    """`progress()` for each trainer event, `check()` at each heartbeat; both return the fields of the
    `warning` record to publish (`kind` "stall-cleared" / "stalled"), or None. `stall_after` None or 0: off.
    Times are time.monotonic() values; `check_every` is how often `check()` is called (for the pause rule)."""

    def __init__(self, stall_after: float | None, check_every: float = 1.0):
        self.stall_after = float(stall_after) if stall_after else 0.0
        self.check_every = check_every
        self.training = False
        self.global_step: int | None = None
        self.last_event: str | None = None
        self._last_progress = 0.0
        self._last_check: float | None = None
        self._stalled_at: float | None = None  # monotonic time of the last progress, while stalled
        self.stalls = 0

    @property
    def enabled(self) -> bool:
        return self.stall_after > 0

    def threshold(self, median_step_s: float | None) -> float:
        return max(self.stall_after, STEP_FACTOR * median_step_s if median_step_s else 0.0)

    def progress(self, event: str, global_step: Any, now: float) -> dict | None:
        if type(global_step) is int:
            self.global_step = global_step
        self.last_event = event
        cleared = None
        if self._stalled_at is not None:
            stalled_for = now - self._stalled_at
            self._stalled_at = None
            cleared = {"kind": "stall-cleared", "global_step": self.global_step, "stalled_for": stalled_for,
                       "message": f"training resumed ({event} at step {self.global_step}) after a stall of "
                                  f"{stalled_for:.1f} s"}
        self._last_progress = now
        if event == "on_train_begin":
            self.training = True
        elif event == "on_train_end":
            self.training = False
        return cleared

    def check(self, now: float, median_step_s: float | None) -> dict | None:
        last, self._last_check = self._last_check, now
        if last is not None and now - last > max(5.0, 5 * self.check_every):
            # This thread did not run for that long (the process was stopped or suspended): nobody could make
            # progress then, so that time is not the trainer's.
            self._last_progress += now - last - self.check_every
        if not (self.enabled and self.training) or self._stalled_at is not None:
            return None
        silent = now - self._last_progress
        limit = self.threshold(median_step_s)
        if silent <= limit:
            return None
        self._stalled_at = self._last_progress
        self.stalls += 1
        return {"kind": "stalled", "global_step": self.global_step, "stalled_for": silent,
                "message": f"no training event for {silent:.1f} s (the limit is {limit:.1f} s): the run looks "
                           f"stalled at step {self.global_step}, last event {self.last_event} (a hung collective, "
                           "a stuck data loader, slow I/O?)"}

    def stalled_for(self, now: float) -> float | None:
        return now - self._stalled_at if self._stalled_at is not None else None

    def stalled_since(self, now: float) -> float | None:
        """The stall's start as a unix time, or None."""
        stalled_for = self.stalled_for(now)
        return time.time() - stalled_for if stalled_for is not None else None
