"""Small helpers shared by the loop: seeding, speed metrics, moving batches, result tuples."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class PredictionOutput(NamedTuple):
    predictions: np.ndarray | list | None
    label_ids: np.ndarray | list | None
    metrics: dict[str, float]


class EvalLoopOutput(NamedTuple):
    predictions: np.ndarray | list | None
    label_ids: np.ndarray | list | None
    metrics: dict[str, float]
    num_samples: int


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def speed_metrics(split: str, start_time: float, num_samples: float | None = None,
                  num_steps: int | None = None) -> dict[str, float]:
    runtime = time.time() - start_time
    result = {f"{split}_runtime": round(runtime, 4)}
    if runtime > 0:
        if num_samples is not None:
            result[f"{split}_samples_per_second"] = round(num_samples / runtime, 3)
        if num_steps is not None:
            result[f"{split}_steps_per_second"] = round(num_steps / runtime, 3)
    return result


def to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device` without blocking the host."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, Mapping):
        return type(data)({k: to_device(v, device) for k, v in data.items()})
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device) for v in data)
    return data


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first tensor in a batch (1 if there is none)."""
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else [inputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    return 1


def loss_from_outputs(outputs: Any) -> torch.Tensor | None:
    """A model may return an object with `.loss`, a dict with "loss", or a tuple whose first item is the loss."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, (tuple, list)):
        return outputs[0] if outputs else None
    if isinstance(outputs, torch.Tensor):
        return outputs
    return getattr(outputs, "loss", None)


def logits_from_outputs(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)):
        return outputs[1] if len(outputs) > 1 else None
    return getattr(outputs, "logits", None)


def nested_concat(chunks: list[torch.Tensor]) -> np.ndarray | list:
    """Concatenate per-batch CPU tensors along the batch axis; a list when their shapes do not line up."""
    try:
        return torch.cat(chunks, dim=0).float().numpy() if chunks[0].is_floating_point() else torch.cat(chunks).numpy()
    except RuntimeError:
        return [c.numpy() for c in chunks]


def call_model(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)
