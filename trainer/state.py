"""`TrainerState`, `TrainerControl` and the `ExportableState` protocol, field for field as in transformers 5.x.

`trainer_state.json` written here loads in transformers and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any


class ExportableState:
    """A callback whose state is saved in checkpoints (`state()`) and restored on resume (`from_state`).

    `state()` returns `{"args": {...constructor kwargs...}, "attributes": {...set after construction...}}`.
    """

    def state(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement state() to be saved in checkpoints")

    @classmethod
    def from_state(cls, state: dict):
        instance = cls(**state["args"])
        for key, value in state["attributes"].items():
            setattr(instance, key, value)
        return instance


def _is_exportable(obj: Any) -> bool:
    # transformers' own ExportableState is a different class; accept either by protocol.
    return isinstance(obj, ExportableState) or any(
        base.__name__ == "ExportableState" for base in type(obj).__mro__
    )


@dataclass
class TrainerState:
    """The loop's state, passed to every callback and saved as `trainer_state.json` in each checkpoint.

    One step is one optimizer update (several micro-batches under gradient accumulation).
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = None
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: list | dict | None = None

    def __post_init__(self) -> None:
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif not isinstance(self.stateful_callbacks, dict):
            self.stateful_callbacks = self.export_callback_states(self.stateful_callbacks)

    @staticmethod
    def export_callback_states(callbacks: list) -> dict[str, Any]:
        """`{class name: state}` (a list of states when a class appears more than once)."""
        states: dict[str, Any] = {}
        for callback in callbacks:
            if not _is_exportable(callback):
                raise TypeError(
                    f"stateful_callbacks must implement ExportableState (state/from_state); got {type(callback)}"
                )
            name = type(callback).__name__
            if name in states:
                if not isinstance(states[name], list):
                    states[name] = [states[name]]
                states[name].append(callback.state())
            else:
                states[name] = callback.state()
        return states

    def compute_steps(self, args, max_steps: int) -> None:
        """Resolve logging/eval/save steps: a value below 1 is a ratio of `max_steps`."""
        for kind in ("logging", "eval", "save"):
            steps = getattr(args, f"{kind}_steps")
            if steps is not None:
                if steps < 1:
                    steps = math.ceil(max_steps * steps)
                setattr(self, f"{kind}_steps", int(steps))

    def save_to_json(self, json_path: str) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load_from_json(cls, json_path: str) -> "TrainerState":
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainerControl(ExportableState):
    """Switches callbacks flip to steer the loop.

    `should_training_stop` is never reset once set during a run; `should_epoch_stop` is reset at each
    epoch begin; `should_log`/`should_evaluate`/`should_save` are reset before each step begins and
    after the loop has acted on them.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}
