"""Evaluation and prediction: `evaluate`, `predict` and the loop under both, as transformers' Trainer runs them.

A mixin of `Trainer`; it reads `self.args`, `self.model`, `self.callback_handler`, `self.compute_loss`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch

from ._utils import (EvalLoopOutput, PredictionOutput, batch_size_of, call_model, logits_from_outputs,
                     nested_concat, speed_metrics, to_device)


class EvaluationMixin:
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate; logs `{prefix}_loss` and speed metrics (on_log), then fires on_evaluate."""
        output = self._timed_loop(eval_dataset, "Evaluation", True, metric_key_prefix)
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Run the model over `test_dataset`; returns predictions (logits), labels and metrics; fires on_predict."""
        output = self._timed_loop(test_dataset, "Prediction", False, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control,
                                                        metrics=output.metrics)
        return PredictionOutput(output.predictions, output.label_ids, output.metrics)

    def _timed_loop(self, dataset, description: str, prediction_loss_only: bool, prefix: str) -> EvalLoopOutput:
        dataloader = self.get_eval_dataloader(dataset)
        start_time = time.time()
        output = self.evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                      metric_key_prefix=prefix)
        batches = math.ceil(output.num_samples / self.args.eval_batch_size)
        output.metrics.update(speed_metrics(prefix, start_time, output.num_samples, batches))
        return output

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys=None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        self.callback_handler.eval_dataloader = dataloader
        model = self.model
        model.eval()
        loss_sum = torch.zeros((), device=self.args.device, dtype=torch.float64)
        has_loss = False
        num_samples = 0
        logits_chunks, label_chunks = [], []
        for inputs in dataloader:
            batch_size = batch_size_of(inputs)
            loss, logits, labels = self.prediction_step(model, inputs, prediction_loss_only)
            if loss is not None:
                loss_sum += loss.double() * batch_size  # mean over examples, as transformers computes it
                has_loss = True
            if not prediction_loss_only:
                if logits is not None:
                    logits_chunks.append(logits.detach().float().cpu())
                if labels is not None:
                    label_chunks.append(labels.detach().cpu())
            num_samples += batch_size
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics: dict[str, float] = {}
        if has_loss:
            # Sync point (end of evaluation): one read of the summed loss.
            metrics[f"{metric_key_prefix}_loss"] = loss_sum.item() / max(num_samples, 1)
        predictions = nested_concat(logits_chunks) if logits_chunks else None
        label_ids = nested_concat(label_chunks) if label_chunks else None
        return EvalLoopOutput(predictions, label_ids, metrics, num_samples)

    def prediction_step(self, model, inputs, prediction_loss_only: bool | None, ignore_keys=None):
        inputs = to_device(inputs, self.args.device)
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        with torch.no_grad(), self._autocast():
            if labels is not None or self.compute_loss_func is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
            else:
                loss, outputs = None, call_model(model, inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits_from_outputs(outputs), labels
