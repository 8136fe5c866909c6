"""Small helpers shared by the loop: seeding, speed metrics, moving batches, result tuples, and the nested
(tensor / tuple / dict) helpers evaluation uses to gather predictions as transformers does."""

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
                  num_steps: int | None = None, num_tokens: int | None = None) -> dict[str, float]:
    runtime = time.time() - start_time
    result = {f"{split}_runtime": round(runtime, 4)}
    if runtime > 0:
        if num_samples is not None:
            result[f"{split}_samples_per_second"] = round(num_samples / runtime, 3)
        if num_steps is not None:
            result[f"{split}_steps_per_second"] = round(num_steps / runtime, 3)
        if num_tokens is not None:
            result[f"{split}_tokens_per_second"] = round(num_tokens / runtime, 3)
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


def call_model(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


# -- evaluation: what compute_metrics receives, and gathering nested per-batch outputs ------------------

class EvalPrediction:
    """What `compute_metrics` receives (transformers' class of the same name): predictions and label_ids, plus
    `inputs` and `losses` when `include_for_metrics` asks for them. Unpacks as a tuple of the ones present, so
    `preds, labels = eval_pred` works."""

    def __init__(self, predictions, label_ids, inputs=None, losses=None):
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        self.elements = (predictions, label_ids) + ((inputs,) if inputs is not None else ()) + \
            ((losses,) if losses is not None else ())

    def __iter__(self):
        return iter(self.elements)

    def __getitem__(self, idx):
        if idx < 0 or idx >= len(self.elements):
            raise IndexError("tuple index out of range")
        return self.elements[idx]


def denumpify_detensorize(metrics: Any) -> Any:
    """numpy scalars and one-element tensors become Python numbers (recursively), so metrics are JSON-ready."""
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(denumpify_detensorize(m) for m in metrics)
    if isinstance(metrics, dict):
        return type(metrics)({k: denumpify_detensorize(v) for k, v in metrics.items()})
    if isinstance(metrics, np.generic):
        return metrics.item()
    if isinstance(metrics, torch.Tensor) and metrics.numel() == 1:
        return metrics.item()
    return metrics


def find_batch_size(tensors: Any) -> int | None:
    """The first dimension of the first tensor (or array) with one, searching nested lists / tuples / dicts."""
    if isinstance(tensors, (list, tuple)):
        for t in tensors:
            found = find_batch_size(t)
            if found is not None:
                return found
    elif isinstance(tensors, Mapping):
        for t in tensors.values():
            found = find_batch_size(t)
            if found is not None:
                return found
    elif isinstance(tensors, (torch.Tensor, np.ndarray)):
        return tensors.shape[0] if tensors.ndim >= 1 else None
    return None


def nested_detach(tensors: Any) -> Any:
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(nested_detach(t) for t in tensors)
    if isinstance(tensors, Mapping):
        return type(tensors)({k: nested_detach(t) for k, t in tensors.items()})
    return tensors.detach() if isinstance(tensors, torch.Tensor) else tensors


def nested_numpify(tensors: Any) -> Any:
    """Tensors (nested) to CPU numpy arrays, dtype kept (bfloat16, which numpy lacks, becomes float32)."""
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(nested_numpify(t) for t in tensors)
    if isinstance(tensors, Mapping):
        return type(tensors)({k: nested_numpify(t) for k, t in tensors.items()})
    t = tensors.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def pad_and_concatenate(arrays: list[np.ndarray], padding_index: int = -100) -> np.ndarray:
    """Concatenate per-batch arrays on the first axis; when their second axis differs (ragged sequence lengths)
    the shorter ones are padded on the right with `padding_index`. The same result as transformers' pairwise
    `numpy_pad_and_concatenate` applied batch after batch, done in one allocation."""
    arrays = [np.atleast_1d(a) for a in arrays]
    first = arrays[0]
    if first.ndim == 1 or all(a.shape[1] == first.shape[1] for a in arrays):
        return np.concatenate(arrays, axis=0)
    width = max(a.shape[1] for a in arrays)
    result = np.full_like(first, padding_index, shape=(sum(a.shape[0] for a in arrays), width, *first.shape[2:]))
    row = 0
    for a in arrays:
        result[row:row + a.shape[0], :a.shape[1]] = a
        row += a.shape[0]
    return result


def _concat_all(chunks: list, padding_index: int) -> Any:
    first = chunks[0]
    if isinstance(first, (list, tuple)):
        return type(first)(_concat_all(list(parts), padding_index) for parts in zip(*chunks))
    if isinstance(first, Mapping):
        return type(first)({k: _concat_all([c[k] for c in chunks], padding_index) for k in first})
    if isinstance(first, torch.Tensor):
        return torch.from_numpy(pad_and_concatenate([c.cpu().numpy() for c in chunks], padding_index))
    if isinstance(first, np.ndarray):
        return pad_and_concatenate(chunks, padding_index)
    raise TypeError(f"Unsupported type for concatenation: got {type(first)}")


def nested_concat(tensors: Any, new_tensors: Any = None, padding_index: int = -100) -> Any:
    """transformers' `nested_concat(tensors, new_tensors)`: concatenate two nested structures of tensors or
    arrays on the first axis, padding the second. Called with one argument, a list of per-batch structures,
    it concatenates them all at once."""
    if new_tensors is None:
        return _concat_all(list(tensors), padding_index)
    return _concat_all([tensors, new_tensors], padding_index)


class EvalLoopContainer:
    """Collects one nested output per batch (on the CPU, as numpy), and gives them back concatenated with -100
    padding (`eval_do_concat_batches=True`, transformers' default) or as a list of per-batch structures."""

    def __init__(self, do_nested_concat: bool = True, padding_index: int = -100):
        self.do_nested_concat = do_nested_concat
        self.padding_index = padding_index
        self.chunks: list = []

    def add(self, tensors: Any) -> None:
        self.chunks.append(nested_numpify(tensors))  # sync point (evaluation only): one batch to the host

    def get_arrays(self) -> Any:
        if not self.chunks:
            return None
        if not self.do_nested_concat:
            return list(self.chunks)
        return _concat_all(self.chunks, self.padding_index)


def length_of(sized) -> int | None:
    """len() of a dataset or data loader, None for one without a length (an iterable dataset)."""
    try:
        return len(sized)
    except (TypeError, AttributeError):
        return None
