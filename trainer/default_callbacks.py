"""The callbacks a `Trainer` has by default, and `EarlyStoppingCallback`.

All of them print on the main process only, so a torchrun job shows one bar, not one per rank.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from .callbacks import TrainerCallback
from .state import ExportableState
from .training_args import IntervalStrategy

logger = logging.getLogger(__name__)


def _format_logs(logs: dict, max_str_len: int = 100) -> dict:
    shown = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, float):
            shown[key] = f"{value:.4g}"
        elif isinstance(value, str) and len(value) > max_str_len:
            shown[key] = f"[string of length {len(value)}]"
        else:
            shown[key] = value
    return shown


class ProgressCallback(TrainerCallback):
    """tqdm bars: one for training (latest loss and learning rate in the postfix), one per evaluation."""

    def __init__(self, max_str_len: int = 100):
        self.max_str_len = max_str_len
        self.training_bar = None
        self.prediction_bar = None
        self.current_step = 0
        self._postfix: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True,
                                     desc="train", unit="step")
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or eval_dataloader is None:
            return
        try:
            total = len(eval_dataloader)
        except TypeError:
            return
        if self.prediction_bar is None:
            self.prediction_bar = tqdm(total=total, leave=self.training_bar is None, dynamic_ncols=True,
                                       desc="eval", unit="batch")
        self.prediction_bar.update(1)

    def _close_prediction_bar(self, state) -> None:
        if state.is_world_process_zero and self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = _format_logs(logs, self.max_str_len)
        self._postfix.update({k: shown[k] for k in ("loss", "eval_loss", "learning_rate") if k in shown})
        if self._postfix:
            self.training_bar.set_postfix(self._postfix, refresh=False)
        self.training_bar.write(str(shown))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
        self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints each `logs` dict: the plain alternative to the progress bar (`disable_tqdm=True`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(_format_logs(logs), flush=True)


def _count_parameters(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def _sized(obj) -> str:
    try:
        return f"{len(obj):,}"
    except TypeError:
        return "unsized"


class InfoCallback(TrainerCallback):
    """At train begin, on the main process: parameters, datasets, device and the run's configuration."""

    def __init__(self, stream=None):
        self.stream = stream

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None,
                       **kwargs):
        if not state.is_world_process_zero:
            return
        lines = ["***** Running training *****"]
        if model is not None:
            total, trainable = _count_parameters(model)
            lines.append(f"  Model                 = {type(model).__name__}: {total:,} parameters "
                         f"({trainable:,} trainable)")
        if train_dataloader is not None:
            lines.append(f"  Train examples        = {_sized(train_dataloader.dataset)}")
        eval_dataset = kwargs.get("eval_dataset")
        if eval_dataset is not None:
            lines.append(f"  Eval examples         = {_sized(eval_dataset)}")
        lines += [
            f"  Device                = {args.device}{' (bf16 autocast)' if args.bf16 else ''}",
            f"  Epochs                = {state.num_train_epochs:,}",
            f"  Batch size per device = {args.per_device_train_batch_size:,}",
            f"  Gradient accumulation = {args.gradient_accumulation_steps:,}",
            f"  Total optimizer steps = {state.max_steps:,}"
            + (f" (resuming at step {state.global_step:,})" if state.global_step else ""),
            f"  Learning rate         = {args.learning_rate:g} ({args.lr_scheduler_type.value}, "
            f"{args.get_warmup_steps(state.max_steps)} warmup steps)",
            f"  Logging / eval / save = {_cadence(args.logging_strategy, state.logging_steps)} / "
            f"{_cadence(args.eval_strategy, state.eval_steps)} / {_cadence(args.save_strategy, state.save_steps)}",
            f"  Output directory      = {args.output_dir}",
        ]
        if self.stream is None:
            tqdm.write("\n".join(lines))  # above any progress bar already on the screen
        else:
            print("\n".join(lines), file=self.stream, flush=True)


def _cadence(strategy, steps: int) -> str:
    if strategy == IntervalStrategy.STEPS:
        return f"every {steps} steps"
    return "every epoch" if strategy == IntervalStrategy.EPOCH else strategy.value


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training when `metric_for_best_model` has not improved for `early_stopping_patience` evaluations."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0):
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold or 0.0
        self.early_stopping_patience_counter = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback needs TrainingArguments.metric_for_best_model to be set")
        if args.eval_strategy == IntervalStrategy.NO:
            raise ValueError("EarlyStoppingCallback needs TrainingArguments.eval_strategy 'steps' or 'epoch'")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        if not name.startswith("eval_"):
            name = f"eval_{name}"
        value = (metrics or {}).get(name)
        if value is None:
            logger.warning("EarlyStoppingCallback: metric %r not in the evaluation metrics %s; not stopping",
                           name, sorted(metrics or {}))
            return
        best = state.best_metric
        improved = best is None or (
            (value > best if args.greater_is_better else value < best)
            and abs(value - best) > self.early_stopping_threshold
        )
        if improved:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True
            # the run's end reason (fg-bus: BusCallback.ending); transformers' callback has no such attribute
            self.stop_reason = (f"{args.metric_for_best_model} did not improve for {self.early_stopping_patience} "
                                "evaluations")

    def state(self) -> dict:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
