"""`DivergenceDetector`: catch a run whose loss goes non-finite or climbs away from its best, and act.

It reads only values already on the host: the `logs` of `on_log` (the training log's `loss` and
`grad_norm`, brought over by the trainer's one sync point of a logging step). It never reads a device
tensor, so it adds no sync; it checks as often as the run logs (`logging_steps`).

    trainer_callbacks: !list:@trainer_callbacks
        - !singleton:trainer:DivergenceDetector
            action: stop
            rel_threshold: 0.5
            patience: 3
            warmup: 100
"""

from __future__ import annotations

import logging
import math

from .bus_callback import active_bus
from .callbacks import TrainerCallback
from .state import ExportableState

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "save-and-stop", "abort")
#: What `state()` saves besides the constructor's arguments (and what a resumed run restores).
_ATTRIBUTES = ("ema", "best_ema", "over_count", "last_step", "alerts", "triggered")


class DivergenceDetector(TrainerCallback, ExportableState):
    """Watches the training loss (and the gradient norm) at every training log.

    - A non-finite `loss` or `grad_norm` (NaN, +-Inf) triggers at once, warmup or not.
    - Otherwise the loss goes into an exponential moving average (`ema_decay`: the weight of the old value);
      after `warmup` steps, the EMA is compared with its best (lowest) value so far. It is over threshold
      when it exceeds the best by more than `abs_threshold`, or by more than `rel_threshold` times |best|
      (either one that is set); `patience` checks over threshold in a row trigger.

    On a trigger it logs a warning, publishes an `alert` record on the run's bus (kind "non-finite" or
    "divergence", message, global_step, value, ema, best_ema, action, metric), and acts:

    - `warn`: nothing more; it alerts again only after the values have come back (finite, under threshold).
      The other actions act on every trigger: a run resumed from a save-and-stop checkpoint that still
      diverges is stopped again.
    - `stop`: training stops after this step, without a checkpoint of the diverged weights (a checkpoint
      now could rotate a good one away under save_total_limit).
    - `save-and-stop`: a checkpoint of this step is saved, then training stops.
    - `abort`: training stops at once and nothing more is saved by the loop: no checkpoint, no evaluation.
      It sets `control.should_abort` as `fg-bus ctl RUN abort` does, so fg-train skips its final save_model;
      `aborted` is then True.

    Its state (EMA, best EMA, count over threshold, ...) is saved in every checkpoint (ExportableState) and
    restored on resume, whatever `restore_callback_states_from_checkpoint` says: a detector that forgot its
    best EMA would take a diverged loss as its new baseline.
    """

    def __init__(self, action: str = "stop", abs_threshold: float | None = None, rel_threshold: float | None = 0.5,
                 patience: int = 3, warmup: int = 100, ema_decay: float = 0.9, check_grad_norm: bool = True):
        if action not in ACTIONS:
            raise ValueError(f"action={action!r}: must be one of {', '.join(ACTIONS)}")
        for name, value in (("abs_threshold", abs_threshold), ("rel_threshold", rel_threshold)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}: must be a positive number, or None (off)")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r}: must be an integer >= 1")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r}: must be an integer >= 0")
        if not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay={ema_decay!r}: must be in [0, 1)")
        self.action = action
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.patience = patience
        self.warmup = warmup
        self.ema_decay = float(ema_decay)
        self.check_grad_norm = check_grad_norm
        self.ema: float | None = None  # the loss's moving average
        self.best_ema: float | None = None  # its lowest value so far
        self.over_count = 0  # checks over threshold in a row
        self.last_step: int | None = None  # the step of the last check (None: never checked)
        self.alerts = 0  # alerts raised so far
        self.triggered: str | None = None  # the kind of the episode alerted, until the values come back
        self.aborted = False  # this run was aborted: nothing more is saved
        self.stop_reason: str | None = None  # why it stopped training (the run's end reason shows it)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {"action": self.action, "abs_threshold": self.abs_threshold, "rel_threshold": self.rel_threshold,
                     "patience": self.patience, "warmup": self.warmup, "ema_decay": self.ema_decay,
                     "check_grad_norm": self.check_grad_norm},
            "attributes": {name: getattr(self, name) for name in _ATTRIBUTES},
        }

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, take the state the checkpoint holds, unless the trainer has already restored it."""
        self.aborted = False
        if state.global_step == 0 or self.last_step is not None:
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several detectors: the one with our arguments, else the first
            mine = [s for s in saved if s.get("args") == self.state()["args"]]
            saved = (mine or saved)[0]
        if isinstance(saved, dict):
            for name, value in saved.get("attributes", {}).items():
                if name in _ATTRIBUTES:
                    setattr(self, name, value)

    # -- the checks ----------------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # an evaluation's log, or the end-of-training summary
            return
        self.check(logs, state.global_step, control, epoch=state.epoch, publish=state.is_world_process_zero)

    def check(self, logs: dict, step: int, control=None, epoch: float | None = None, publish: bool = True) -> str | None:
        """Check one training log (host floats); returns the kind of alert raised ("non-finite",
        "divergence") or None. Applies the action to `control` when one is given."""
        self.last_step = step
        loss = _as_float(logs.get("loss"))
        grad_norm = _as_float(logs.get("grad_norm")) if self.check_grad_norm else None
        for metric, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                if self.triggered == "non-finite" and self.action == "warn":
                    return None  # the same episode: alerted already (the other actions act again, on resume)
                self.triggered = "non-finite"
                self._alert("non-finite", f"{metric} is {value} at step {step}", metric, value, step, epoch,
                            control, publish)
                return "non-finite"
        if loss is None:
            return None
        if self.triggered == "non-finite":
            self.triggered = None  # finite again
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        if self.best_ema is None or self.ema < self.best_ema:
            self.best_ema = self.ema
        if step <= self.warmup:
            return None
        excess = self.ema - self.best_ema
        over = ((self.abs_threshold is not None and excess > self.abs_threshold) or
                (self.rel_threshold is not None and excess > self.rel_threshold * abs(self.best_ema)))
        if not over:
            self.over_count = 0
            if self.triggered == "divergence":
                self.triggered = None  # back under threshold
            return None
        self.over_count += 1
        if self.over_count < self.patience or (self.triggered == "divergence" and self.action == "warn"):
            return None
        self.triggered = "divergence"
        ratio = f", {self.ema / self.best_ema:.3g}x" if self.best_ema > 0 else ""
        self._alert("divergence", f"loss EMA {self.ema:.4g} is {excess:.4g} over its best {self.best_ema:.4g}{ratio}, "
                    f"for {self.over_count} checks in a row, at step {step}", "loss", loss, step, epoch, control,
                    publish)
        return "divergence"

    def _alert(self, kind: str, message: str, metric: str, value: float, step: int, epoch: float | None,
               control, publish: bool) -> None:
        self.alerts += 1
        consequence = {"warn": "training goes on", "stop": "stopping training after this step",
                       "save-and-stop": "saving a checkpoint and stopping training",
                       "abort": "aborting training, nothing saved"}[self.action]
        logger.warning("DivergenceDetector: %s: %s; %s", kind, message, consequence)
        if control is not None:
            self._act(control)
            if self.action != "warn":
                self.stop_reason = f"{kind}: {message}"  # the run's end reason names it (BusCallback.ending)
        bus = active_bus() if publish else None
        if bus is not None:
            bus.publisher.publish("alert", step, epoch, kind=kind, message=message, value=value, ema=self.ema,
                                  best_ema=self.best_ema, action=self.action, metric=metric,
                                  source=type(self).__name__)

    def _act(self, control) -> None:
        if self.action == "warn":
            return
        control.should_training_stop = True
        if self.action == "save-and-stop":
            control.should_save = True  # on_log comes before the loop's save of this step
        elif self.action == "abort":
            self.aborted = True
            self._nothing_more(control)

    # -- abort: nothing saved or evaluated after it -------------------------------------------------------

    def _nothing_more(self, control) -> None:
        # should_abort: what `fg-bus ctl RUN abort` sets too; the Trainer keeps every rank from saving or
        # evaluating from here on, and fg-train skips its final save_model.
        control.should_training_stop = control.should_abort = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.aborted:
            self._nothing_more(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.aborted:  # after DefaultFlowCallback's on_epoch_end, which may ask for an epoch's save
            self._nothing_more(control)


def _as_float(value) -> float | None:
    """A log value as a float; None when absent or not a number (never a device tensor: logs hold floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
