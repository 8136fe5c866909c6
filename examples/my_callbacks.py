"""User callbacks for examples/custom_callbacks.yaml.

The config reaches these as `!singleton:my_callbacks:LossThresholdCallback`: the loader puts the config's
own directory on `sys.path`, so a module beside the YAML file imports like one beside a script.

Each class overrides only the events it needs; every event receives `(args, state, control, **kwargs)`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer import TrainerCallback


class LossThresholdCallback(TrainerCallback):
    """Stops training once a logged training loss (`logs["loss"]`) drops below `threshold`."""

    def __init__(self, threshold: float):
        if not threshold > 0:
            raise ValueError(f"threshold={threshold!r}: must be > 0")
        self.threshold = threshold
        self.stopped_at: int | None = None  # the global step that stopped training, if one did

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")  # evaluation logs carry eval_loss, the final summary train_loss
        if loss is None or loss >= self.threshold:
            return
        control.should_training_stop = True
        if self.stopped_at is None:
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                print(f"LossThresholdCallback: loss {loss:.4f} < {self.threshold} at step {state.global_step}; "
                      "stopping", flush=True)


class StepTimerCallback(TrainerCallback):
    """Times optimizer steps (the wall time between consecutive on_step_end events) and prints the mean at
    train end. On a GPU this is host time; averaged over many steps it approaches the device's pace."""

    def __init__(self, skip_first: int = 1):
        if skip_first < 0:
            raise ValueError(f"skip_first={skip_first!r}: must be >= 0")
        self.skip_first = skip_first  # the first steps include warm-up (allocations, kernel selection)
        self.step_times: list[float] = []
        self._last: float | None = None

    @property
    def mean_step_time(self) -> float | None:
        times = self.step_times[self.skip_first:]
        return sum(times) / len(times) if times else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_times.clear()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._last = time.perf_counter()  # an evaluation is not part of the next step's time

    def on_save(self, args, state, control, **kwargs):
        self._last = time.perf_counter()  # neither is a checkpoint

    def on_train_end(self, args, state, control, **kwargs):
        mean = self.mean_step_time
        if state.is_world_process_zero and mean is not None:
            print(f"StepTimerCallback: mean step time {mean * 1000:.1f} ms over "
                  f"{len(self.step_times) - self.skip_first} steps", flush=True)


class ExperimentLogger(TrainerCallback):
    """Writes one JSON line per log (and a header with the experiment's description) to
    `<output_dir>/<filename>`; the last line carries the mean step time of `timer`, if given."""

    def __init__(self, filename: str = "experiment.jsonl", *, name: str, description: str = "",
                 run_name: str | None = None, timer: StepTimerCallback | None = None, **meta):
        self.filename = filename
        self.meta = {"name": name, "description": description, "run_name": run_name, **meta}
        self.timer = timer
        self.path: Path | None = None
        self._file = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path = Path(args.output_dir, self.filename)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._write({"meta": self.meta, "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._file is not None and logs:
            self._write({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        if self._file is None:
            return
        mean = self.timer.mean_step_time if self.timer is not None else None
        self._write({"step": state.global_step, "end": True, "mean_step_time": mean})
        self._file.close()
        self._file = None

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
