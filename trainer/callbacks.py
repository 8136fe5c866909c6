"""The callback contract: `TrainerCallback`, the `CallbackHandler` that dispatches events, and
`DefaultFlowCallback`, which turns the logging/evaluation/save cadences into control flags.

The contract is transformers' (5.x): every event is `(args, state, control, **kwargs)`; a callback that
returns something other than None replaces the control object, and the last such return wins.
"""

from __future__ import annotations

import logging
from typing import Any

from .state import TrainerControl, TrainerState
from .training_args import IntervalStrategy, SaveStrategy

logger = logging.getLogger(__name__)

#: The fifteen events, in the order a plain run first fires them.
EVENTS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_prediction_step",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_epoch_end",
    "on_train_end",
)
# transformers fires on_push_begin when pushing to the Hub; this trainer never pushes, but callbacks
# written for HF may define it, so it is a known name, not a typo.
_KNOWN_NON_EVENTS = frozenset({"on_push_begin"})


class TrainerCallback:
    """Base class for callbacks. Override the events you need; each receives
    `args, state, control` and the keyword arguments `model`, `processing_class`, `optimizer`,
    `lr_scheduler`, `train_dataloader`, `eval_dataloader` (plus `logs` for on_log, `metrics` for
    on_evaluate/on_predict). Return None to keep the control object, or a `TrainerControl` to replace it.
    """

    def on_init_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_epoch_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_epoch_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_pre_optimizer_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_optimizer_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_substep_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_evaluate(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_predict(self, args, state: TrainerState, control: TrainerControl, metrics=None, **kwargs):
        pass

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_log(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_prediction_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_push_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        pass


def _check_event_names(callback: Any) -> None:
    """Warn about `on_*` methods that are not events: a typo would otherwise never fire (pluggy-style)."""
    for name in dir(type(callback)):
        if name.startswith("on_") and name not in EVENTS and name not in _KNOWN_NON_EVENTS:
            if callable(getattr(type(callback), name, None)):
                logger.warning(
                    "%s.%s looks like a callback event but is not one, so it will never be called; "
                    "the events are: %s", type(callback).__name__, name, ", ".join(EVENTS),
                )


class CallbackHandler(TrainerCallback):
    """Calls the callbacks in the order they were added, passing the trainer's objects as keywords."""

    def __init__(self, callbacks, model, processing_class, optimizer, lr_scheduler):
        self.callbacks: list = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = None
        self.eval_dataloader = None
        #: (callback, event) that first set `should_training_stop` in this train() (the Trainer resets it)
        self.stopped_by: tuple | None = None
        if not any(type(cb).__name__ == "DefaultFlowCallback" for cb in self.callbacks):
            logger.warning(
                "There is no DefaultFlowCallback among the callbacks, so logging, evaluation and saving will "
                "only happen when a callback asks for them. Callbacks: %s", self.callback_list,
            )

    # -- management ------------------------------------------------------------------------------------

    def add_callback(self, callback) -> None:
        """Add a callback instance, or a class (instantiated with no arguments)."""
        cb = callback() if isinstance(callback, type) else callback
        cb_class = type(cb)
        if any(type(c) is cb_class for c in self.callbacks):
            logger.warning(
                "Adding a second %s; the callbacks are now: %s",
                cb_class.__name__, ", ".join([*(type(c).__name__ for c in self.callbacks), cb_class.__name__]),
            )
        _check_event_names(cb)
        self.callbacks.append(cb)

    def pop_callback(self, callback):
        """Remove and return the first callback matching a class, or the given instance; None if absent."""
        for cb in list(self.callbacks):
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback) -> None:
        """Remove the first callback matching a class, or the given instance (absent: no-op)."""
        self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    # -- events ----------------------------------------------------------------------------------------
    # Flag resets happen here, exactly where transformers' handler does them.

    def on_init_end(self, args, state, control, **kwargs):
        return self.call_event("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        return self.call_event("on_train_end", args, state, control, **kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.call_event("on_epoch_end", args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        control.should_log = False
        control.should_evaluate = False
        control.should_save = False
        return self.call_event("on_step_begin", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        return self.call_event("on_optimizer_step", args, state, control, **kwargs)

    def on_substep_end(self, args, state, control, **kwargs):
        return self.call_event("on_substep_end", args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        return self.call_event("on_step_end", args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics, **kwargs)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        return self.call_event("on_predict", args, state, control, metrics=metrics, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        return self.call_event("on_prediction_step", args, state, control, **kwargs)

    def on_push_begin(self, args, state, control, **kwargs):
        return self.call_event("on_push_begin", args, state, control, **kwargs)

    def call_event(self, event: str, args, state, control, **kwargs):
        # Iterate over a copy: a callback may add or remove callbacks while the event is dispatched.
        stopping = control.should_training_stop
        for callback in tuple(self.callbacks):
            result = getattr(callback, event)(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
            if not stopping and control.should_training_stop:  # who stopped training: the run's end reason
                stopping, self.stopped_by = True, (callback, event)
        return control


class DefaultFlowCallback(TrainerCallback):
    """Sets `should_log`, `should_evaluate`, `should_save` and `should_training_stop` from the arguments."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == IntervalStrategy.STEPS and state.global_step % state.logging_steps == 0:
            control.should_log = True

        evaluating_by_steps = args.eval_strategy == IntervalStrategy.STEPS and args.eval_delay <= state.global_step
        if evaluating_by_steps and state.global_step % state.eval_steps == 0:
            control.should_evaluate = True

        if args.save_strategy == SaveStrategy.STEPS and state.save_steps > 0 and state.global_step % state.save_steps == 0:
            control.should_save = True

        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            # The last step is evaluated and saved even off-cadence (once: not twice on a cadence step).
            if evaluating_by_steps and state.global_step % state.eval_steps != 0:
                control.should_evaluate = True
            if args.save_strategy == SaveStrategy.STEPS:
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy == IntervalStrategy.EPOCH:
            control.should_log = True
        if args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.EPOCH:
            control.should_save = True
        return control
