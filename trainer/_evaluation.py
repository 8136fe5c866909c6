"""Evaluation and prediction: `evaluate`, `predict` and the loop under both, as transformers' Trainer runs them.

A mixin of `Trainer`; it reads `self.args`, `self.model`, `self.callback_handler`, `self.compute_loss`,
`self.label_names`, `self._get_num_items_in_batch`, `self.compute_metrics` and
`self.preprocess_logits_for_metrics`.

What a transformers user relies on, and where it lives here:
- `evaluate()`: a dict of datasets (passed, or `self.eval_dataset`) is evaluated one by one with the prefix
  `eval_NAME`, each logged and reported to `on_evaluate` on its own; the merged metrics are returned.
- `evaluation_loop()`: per batch, `prediction_step`, then `preprocess_logits_for_metrics(logits, labels)`,
  then the batch's predictions / labels / inputs / losses are kept on the CPU; at the end they are
  concatenated (sequences of different lengths padded with -100 on the right) and handed to
  `compute_metrics(EvalPrediction)`. Every metric key gets the `metric_key_prefix + "_"` prefix.
- The eval loss is a per-example mean kept on the device (one sync point at the end). Each batch counts
  `eval_batch_size` times, except the last batch, which counts as many times as it
  has examples; non-finite batch losses are left out when `logging_nan_inf_filter` is on and at least one
  batch loss is finite (transformers' rule, which makes the mean NaN/inf only when every batch is).
- `prediction_step()`: predictions are every output but the loss and `ignore_keys` (a tuple; a single one
  unwrapped), labels every `label_names` entry (a tuple when several).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Mapping

import torch

from ._utils import (EvalLoopContainer, EvalLoopOutput, EvalPrediction, PredictionOutput, call_model,
                     denumpify_detensorize, find_batch_size, length_of, nested_detach, speed_metrics, to_device)

logger = logging.getLogger(__name__)

PADDING_INDEX = -100  # what ragged predictions, labels and inputs are padded with (transformers' value)


class EvaluationMixin:
    # -- the public entry points ------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate; logs the metrics (on_log), fires on_evaluate and returns them.

        `eval_dataset` may be a dataset, a dict of them, or the name of an entry of a dict `self.eval_dataset`.
        With a dict, each dataset is evaluated (and logged) on its own under `{metric_key_prefix}_{name}`."""
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics: dict[str, float] = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(eval_dataset=dataset if override else name, ignore_keys=ignore_keys,
                                             metric_key_prefix=f"{metric_key_prefix}_{name}"))
            return metrics
        dataloader = self.get_eval_dataloader(eval_dataset)  # a name is looked up in self.eval_dataset there
        start_time = time.time()
        # Without compute_metrics there is nothing to gather predictions for (transformers' shortcut);
        # otherwise args.prediction_loss_only decides.
        output = self.evaluation_loop(dataloader, description="Evaluation",
                                      prediction_loss_only=True if self.compute_metrics is None else None,
                                      ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        self._add_speed_metrics(output, start_time, metric_key_prefix)
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Run the model over `test_dataset`: predictions, labels (if the data has them) and metrics; fires
        on_predict (nothing is logged, as in transformers)."""
        dataloader = self.get_test_dataloader(test_dataset)
        start_time = time.time()
        output = self.evaluation_loop(dataloader, description="Prediction", ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        self._add_speed_metrics(output, start_time, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control,
                                                        metrics=output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    # -- what transformers reads from the model for evaluation ------------------------------------------

    @property
    def can_return_loss(self) -> bool:
        """Whether `forward` has `return_loss=True` by default (CLIP-like models: a loss without labels)."""
        if "_can_return_loss" not in self.__dict__:
            params = inspect.signature(type(self.model).forward).parameters
            self._can_return_loss = "return_loss" in params and params["return_loss"].default is True
        return self._can_return_loss

    # -- the loop ---------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys=None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Shared by `evaluate` and `predict`; works with or without labels. `prediction_loss_only=None`
        means `args.prediction_loss_only`."""
        args = self.args
        if prediction_loss_only is None:
            prediction_loss_only = args.prediction_loss_only
        model = self._prepare_model_for_evaluation()
        dataset = getattr(dataloader, "dataset", None)
        dataset_length = length_of(dataset)
        logger.info("***** Running %s *****", description)
        logger.info("  Num examples = %s", dataset_length if dataset_length is not None else "Unknown")
        logger.info("  Batch size = %d", args.eval_batch_size)
        model.eval()
        if callable(getattr(self.optimizer, "eval", None)):  # schedule-free optimizers switch weights too
            self.optimizer.eval()
        self.callback_handler.eval_dataloader = dataloader

        include = args.include_for_metrics
        batch_metrics = args.batch_eval_metrics
        keep_outputs = not batch_metrics or description == "Prediction"
        all_losses, all_preds, all_labels, all_inputs = (
            EvalLoopContainer(args.eval_do_concat_batches, PADDING_INDEX) for _ in range(4))
        eval_loss = _EvalLossMean(args.device)
        metrics = None
        observed = 0
        for inputs, is_last in _with_last(dataloader):
            batch_size = find_batch_size(inputs)
            observed += batch_size or 0
            loss, logits, labels = self.prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            inputs_decode = self._inputs_for_metrics(inputs) if "inputs" in include else None

            losses = None
            if loss is not None:
                weight = self._loss_weight(batch_size, is_last)
                eval_loss.add(loss, weight)
                if "loss" in include:
                    losses = loss.reshape(1).repeat(weight)  # one entry per example, as transformers keeps them
                    all_losses.add(losses)
            if inputs_decode is not None and keep_outputs:
                all_inputs.add(inputs_decode)
            if logits is not None:
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                if keep_outputs:
                    all_preds.add(logits)
            if labels is not None and keep_outputs:
                all_labels.add(labels)
            self.control = self.callback_handler.on_prediction_step(args, self.state, self.control)

            if batch_metrics and self.compute_metrics is not None and logits is not None and labels is not None:
                metrics = self.compute_metrics(
                    EvalPrediction(predictions=logits, label_ids=labels, losses=losses,
                                   inputs=inputs if "inputs" in include else None),
                    compute_result=is_last)

        all_losses, all_preds, all_labels, all_inputs = (
            c.get_arrays() for c in (all_losses, all_preds, all_labels, all_inputs))
        num_samples = dataset_length if dataset_length is not None else observed
        if num_samples == 0 and observed > 0:
            num_samples = observed

        if self.compute_metrics is not None and all_preds is not None and all_labels is not None \
                and not batch_metrics:
            metrics = self.compute_metrics(EvalPrediction(
                predictions=all_preds, label_ids=all_labels,
                losses=all_losses if "loss" in include else None,
                inputs=all_inputs if "inputs" in include else None))
        elif metrics is None:
            metrics = {}
        metrics = denumpify_detensorize(metrics)  # JSON-ready: no numpy scalars or one-element tensors

        if eval_loss.weight:
            metrics[f"{metric_key_prefix}_loss"] = eval_loss.mean(args.logging_nan_inf_filter)
        if hasattr(self, "model_preparation_time"):
            metrics[f"{metric_key_prefix}_model_preparation_time"] = self.model_preparation_time
        for key in list(metrics):
            if not key.startswith(f"{metric_key_prefix}_"):
                metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        return EvalLoopOutput(all_preds, all_labels, metrics, num_samples)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """One batch: (loss or None, predictions or None, labels or None), all detached, on the device.

        There is a loss when every `label_names` key is in the batch (or the model returns one without labels,
        `return_loss`). Predictions: a dict output's values but "loss" and `ignore_keys`; a tuple output's
        items after the loss (the whole tuple when there are no labels); one of them is unwrapped."""
        is_mapping = isinstance(inputs, Mapping)
        label_names = self.label_names
        has_labels = is_mapping and bool(label_names) and all(inputs.get(k) is not None for k in label_names)
        return_loss = inputs.get("return_loss") if is_mapping else None
        if return_loss is None:
            return_loss = self.can_return_loss
        loss_without_labels = is_mapping and not label_names and return_loss

        inputs = to_device(inputs, self.args.device)
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config is not None else []
        ignore_keys = list(ignore_keys)
        labels = None
        if has_labels or loss_without_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in label_names))
            if len(labels) == 1:
                labels = labels[0]

        with torch.no_grad(), self._autocast():
            if has_labels or loss_without_labels:
                # transformers counts the labels for this one batch (used by models taking loss kwargs and
                # by compute_loss_func); the count stays on the device.
                num_items = self._get_num_items_in_batch([inputs], self.args.device)
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items)
                loss = loss.detach().mean()
                logits = _predictions_of(outputs, ignore_keys + ["loss"], after_loss=True)
            else:
                loss = None
                outputs = call_model(model, inputs)
                logits = _predictions_of(outputs, ignore_keys, after_loss=False)
        if prediction_loss_only:
            return loss, None, None
        logits = nested_detach(logits)
        if isinstance(logits, (tuple, list)) and len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels

    # -- pieces of the loop -----------------------------------------------------------------------------

    def _prepare_model_for_evaluation(self):
        """transformers prepares (wraps, places) the model the first time it evaluates when train() has not
        done it yet, and from then on reports how long that took as `{prefix}_model_preparation_time` in every
        evaluation and prediction. Here the model was placed in __init__, so the time is 0.0; the key appears
        under the same rule: once evaluate/predict has run before train() ever started."""
        prepared_by_train = hasattr(self, "_tr_loss")  # set by train() before its first batch (trainer.py)
        if not prepared_by_train and not getattr(self, "_eval_model_prepared", False):
            self.model_preparation_time = 0.0  # nothing left to do: __init__ placed the model
        self._eval_model_prepared = True
        return self.model

    def _loss_weight(self, batch_size: int | None, is_last: bool) -> int:
        """How many times a batch's mean loss counts in the eval loss (and in `EvalPrediction.losses`):
        transformers repeats it `eval_batch_size` times, and trims the last batch's repeats to the examples
        it really has (accelerate's end-of-data remainder, sized dataset or not)."""
        if is_last and batch_size is not None:
            return batch_size
        return self.args.eval_batch_size

    def _inputs_for_metrics(self, inputs):
        """The model's main input (`model.main_input_name`, default "input_ids"), for EvalPrediction.inputs."""
        name = getattr(self.model, "main_input_name", "input_ids")
        if not isinstance(inputs, Mapping) or name not in inputs:
            raise KeyError(f"include_for_metrics asks for 'inputs', but the batch has no {name!r} (the model's "
                           "main_input_name, default 'input_ids'); set model.main_input_name")
        return to_device(inputs[name], self.args.device)

    def _add_speed_metrics(self, output: EvalLoopOutput, start_time: float, prefix: str) -> None:
        # transformers leaves the model preparation out of the runtime.
        start_time += output.metrics.get(f"{prefix}_model_preparation_time", 0)
        output.metrics.update(speed_metrics(prefix, start_time, output.num_samples,
                                            math.ceil(output.num_samples / self.args.eval_batch_size)))


class _EvalLossMean:
    """The per-example mean of the batch losses, summed on the device without a sync until `mean()`.

    transformers keeps every per-example loss and, with `logging_nan_inf_filter`, averages only the finite
    ones when there is at least one (else all, so the mean is NaN or inf)."""

    def __init__(self, device):
        # [sum of the finite weighted losses, weight of the finite ones, sum of all weighted losses]
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        self.sums = torch.zeros(3, device=device, dtype=dtype)
        self.weight = 0  # the number of per-example losses added (a host count)

    def add(self, loss: torch.Tensor, weight: int) -> None:
        loss = loss.to(self.sums.dtype)
        finite = torch.isfinite(loss)
        self.sums += torch.stack([torch.where(finite, loss, 0.0), finite.to(loss.dtype), loss]) * weight
        self.weight += weight

    def mean(self, nan_inf_filter: bool) -> float:
        # Sync point (end of evaluation): the three sums in one transfer.
        finite_sum, finite_weight, total_sum = self.sums.tolist()
        if nan_inf_filter and finite_weight > 0:
            return finite_sum / finite_weight
        return total_sum / self.weight


def _predictions_of(outputs, ignore_keys: list[str], after_loss: bool):
    """The prediction part of a model output (see `prediction_step`).

    Beyond transformers (whose Trainer fails on them): a dataclass output that is not a dict (trainer.chargpt's
    CausalLMOutput) is read like a ModelOutput, by its fields that are not None; a bare tensor returned with
    labels is the loss itself here (the training loop reads it so), so it has no predictions."""
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, Mapping):
        outputs = {f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)
                   if getattr(outputs, f.name) is not None}
    if isinstance(outputs, Mapping):  # dicts and transformers' ModelOutput
        return tuple(v for k, v in outputs.items() if k not in ignore_keys)
    if isinstance(outputs, (tuple, list)):
        return outputs[1:] if after_loss else outputs
    return () if after_loss else outputs


def _with_last(iterable):
    """Yield (item, is_last): batch metrics need to know the last batch as it is computed."""
    iterator = iter(iterable)
    try:
        item = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield item, False
        item = upcoming
    yield item, True


