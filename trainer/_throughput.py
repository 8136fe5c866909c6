"""Throughput of the training loop, logged beside transformers' keys at every training `on_log`.

`ThroughputMeter` is fed one call per micro-batch (`count`, a few host operations on the batch's shapes)
and read once per logging step (`interval_logs`). Nothing here reads a device value between logging steps:

- samples and (default) tokens are counted from shapes, `input_ids.numel()`, a host int;
- with `include_num_input_tokens_seen="non_padding"` the non-padding tokens are a running tensor sum (of
  `attention_mask`, or of `input_ids != pad_token_id`) on the batch's device, read with one `.item()` at
  the logging step, which has synced already to read the loss;
- under torchrun the counts are summed over ranks at those steps only (one small gloo all-reduce);
- time is `time.perf_counter()` at logging steps; evaluation and checkpoint saves are left out of it;
- `torch.cuda.max_memory_allocated` is an allocator statistic kept on the host: no sync;
- `data_time` (with `log_throughput`) is this rank's own mean wait for its batches per optimizer step, in
  seconds: `time.perf_counter()` around the epoch iterator's `next` only (`Trainer.get_batch_samples`,
  summed over the step's micro-batches), never around a collective, and not summed over ranks. Under DDP
  every rank's step lasts as long as the slowest one's, so step times cannot tell which rank is slow;
  this can, for the commonest cause, slow data loading (fg_bus/monitor.py names such a rank a straggler).

MFU (model FLOPs utilisation) is the FLOPs the model's matrix multiplies need for the tokens of the
interval, over what the devices could have done at their peak in that time:

    flops per token = 6 * N + 12 * n_layer * d_model * T                       (PaLM, appendix B)
    mfu             = sum over micro-batches of tokens * flops per token(T) / (interval * world * peak)

N counts the parameters that take part in a matrix multiply for every token: all of them except those of
`nn.Embedding` lookups (an output head tied to the input embedding counts, since its matmul is real work;
transformers' `total_flos` uses `num_parameters(exclude_embeddings=True)`, which leaves a tied head out).
6 = 2 FLOPs per multiply-add x 3 (forward, backward for activations, backward for weights). The second term
is attention's QK^T and AV products over a sequence of T tokens (the batch's sequence length), counted in
full as PaLM and nanoGPT do, whatever a causal kernel skips; n_layer and d_model come from the model's
config (`n_layer` / `num_hidden_layers`, `n_embd` / `hidden_size` / `d_model`), and the term is left out
when the config has neither. Recomputation (gradient checkpointing) is not counted: this is MFU, not HFU.
A model may give its own count with a method `flops_per_token(seq_len) -> float`. Peak is the dense
bf16/fp16 tensor-core peak of the device (`PEAK_TFLOPS`, matched on `torch.cuda.get_device_name`), or
`TrainingArguments.mfu_peak_tflops`; with neither (the CPU, an unknown GPU) no `mfu` is logged. Encoder-
decoder models get no `mfu` (6N per input token does not describe them).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)

# The keys this trainer adds to training logs that transformers' Trainer does not (with its default
# arguments: `num_input_tokens_seen` is also transformers' key when include_num_input_tokens_seen is set).
FG_ONLY_LOG_KEYS = frozenset({"samples_per_second", "steps_per_second", "step_time", "data_time",
                              "tokens_per_second", "num_input_tokens_seen", "peak_memory_mb", "mfu"})

# Dense (no sparsity) bf16 / fp16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets. The
# first pattern that matches torch.cuda.get_device_name() wins (so the specific ones come first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGB200\b", 2500.0),
    (r"\bB200\b", 2250.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),   # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b", 989.0),   # also GH200
    (r"\bH800\b", 989.0),
    (r"\bH20\b", 148.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bV100\b", 125.0),
    (r"\bT4\b", 65.0),
    (r"\bMI300X\b", 1307.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a device named `device_name`, or None when it is not in the table."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def matmul_parameters(model: torch.nn.Module) -> int:
    """N of the MFU formula: the (distinct) parameters used by a matrix multiply for every token, that is all
    parameters but those that only an `nn.Embedding` looks up (a tied output head counts)."""
    lookup_only, used_elsewhere = set(), set()
    for module in model.modules():
        target = lookup_only if isinstance(module, torch.nn.Embedding) else used_elsewhere
        target.update(id(p) for p in module.parameters(recurse=False))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in lookup_only or id(p) in used_elsewhere:
            total += p.numel()
    return total


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _FlopsPerToken:
    """flops_per_token(seq_len) of a model: its own method if it has one, else 6N + 12 * L * d * T."""

    def __init__(self, model: torch.nn.Module):
        self.custom = getattr(model, "flops_per_token", None)
        if not callable(self.custom):
            self.custom = None
        config = getattr(model, "config", None)
        self.known = self.custom is not None or not getattr(config, "is_encoder_decoder", False)
        self.six_n = 6 * matmul_parameters(model) if self.custom is None else 0
        n_layer = _config_value(config, "n_layer", "num_hidden_layers", "num_layers")
        d_model = _config_value(config, "n_embd", "hidden_size", "d_model")
        self.attention = 12 * n_layer * d_model if n_layer and d_model else 0
        self._cache: dict[int, float] = {}

    def __call__(self, seq_len: int) -> float:
        if self.custom is None:
            return self.six_n + self.attention * seq_len
        value = self._cache.get(seq_len)
        if value is None:
            value = self._cache[seq_len] = float(self.custom(seq_len))
        return value


class ThroughputMeter:
    """Counts samples, tokens and FLOPs per micro-batch on the host (or, for non-padding tokens, in a device
    tensor) and turns them into the interval's rates at a logging step.

    `token_mode` is "all" (input_ids.numel()), "non_padding" (transformers' rule: attention_mask.sum(), else
    input_ids != pad_token_id, else all) or "no" (tokens not counted)."""

    def __init__(self, args, model: torch.nn.Module, processing_class=None):
        self.args = args
        hf_mode = args.include_num_input_tokens_seen
        self.token_mode = hf_mode if hf_mode != "no" else ("all" if args.log_tokens else "no")
        self.log_throughput = args.log_throughput
        self.log_tokens = args.log_tokens
        self.device = args.device
        self.peak_memory = args.log_peak_memory and self.device.type == "cuda"
        self.main_input = getattr(model, "main_input_name", "input_ids")
        self.pad_token_id = getattr(processing_class, "pad_token_id", None)
        self.peak_flops = None
        self.flops_per_token = None
        if args.log_mfu:
            peak = args.mfu_peak_tflops
            if peak is None and self.device.type == "cuda":
                peak = peak_tflops_of(torch.cuda.get_device_name(self.device))
            if peak is not None:
                flops = _FlopsPerToken(model)
                if flops.known:
                    self.peak_flops, self.flops_per_token = peak * 1e12, flops
        self.counting = self.log_throughput or self.token_mode != "no" or self.flops_per_token is not None
        self._warned_no_input = False
        self._per_shape: dict = {}  # a batch's counts depend on its shape only: computed once per shape
        # Not yet summed over ranks (this process, since the last read): host numbers, and a device tensor
        # for non-padding tokens.
        self._samples = 0
        self._tokens = 0
        self._flops = 0.0
        self._tokens_tensor: torch.Tensor | None = None
        self._saw_input = False
        # Summed over ranks, since the last interval_logs.
        self._interval_samples = 0
        self._interval_tokens = 0
        self._interval_flops = 0.0
        self._interval_saw_input = False
        self._last_time = time.perf_counter()
        self._last_step = 0
        self._excluded = 0.0
        self._data_time = 0.0  # this rank's wait for batches since the last training log, s

    def start(self, global_step: int) -> None:
        """The first interval starts now (train begin, after any evaluation on start)."""
        self._last_time = time.perf_counter()
        self._last_step = global_step
        self._excluded = 0.0
        self._data_time = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint save) out of the current interval."""
        self._excluded += seconds

    # -- per micro-batch (training thread, hot path: host arithmetic on shapes only) -------------------

    def data_wait(self, seconds: float) -> None:
        """This rank waited `seconds` for the batches of one optimizer step (a host clock reading)."""
        self._data_time += seconds

    def count(self, inputs) -> None:
        if not self.counting:
            return
        ids = inputs.get(self.main_input) if isinstance(inputs, Mapping) else None
        shape = getattr(ids, "shape", None)
        per_shape = self._per_shape.get(shape)  # (samples, tokens, flops) of a batch of this shape
        if per_shape is None:
            if not isinstance(ids, torch.Tensor) or ids.ndim == 0:
                self._count_without_input(inputs)
                return
            flops = ids.numel() * self.flops_per_token(shape[-1]) if self.flops_per_token is not None else 0.0
            per_shape = self._per_shape[shape] = (shape[0], ids.numel(), flops)
        self._saw_input = True
        self._samples += per_shape[0]
        self._flops += per_shape[2]
        if self.token_mode == "all":
            self._tokens += per_shape[1]
        elif self.token_mode == "non_padding":
            self._count_non_padding(inputs, ids, per_shape[1])

    def _count_non_padding(self, inputs, ids: torch.Tensor, numel: int) -> None:
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            count = mask.sum()
        elif self.pad_token_id is not None:
            count = ids.ne(self.pad_token_id).sum()
        else:
            if not self._warned_no_input:
                logger.warning("include_num_input_tokens_seen='non_padding': the batches have no attention_mask "
                               "and the processing_class no pad_token_id; counting all tokens")
                self._warned_no_input = True
            self._tokens += numel
            return
        # A running sum on the batch's device: read once, at the next logging step.
        self._tokens_tensor = count if self._tokens_tensor is None else self._tokens_tensor + count

    def _count_without_input(self, inputs) -> None:
        if self.token_mode != "no" and self.args.include_num_input_tokens_seen != "no" and not self._warned_no_input:
            logger.warning("include_num_input_tokens_seen is set but the batches have no %r (the model's "
                           "main_input_name): no tokens counted", self.main_input)
            self._warned_no_input = True
        if self.log_throughput:
            from ._utils import find_batch_size

            self._samples += find_batch_size(inputs) or 0

    # -- at logging steps, evaluations, saves and the end (all of them sync already) -------------------

    def _read(self) -> tuple[int, int, float, bool]:
        """This process' counts since the last read, summed over ranks: (samples, tokens, flops, saw input).
        The only place a counted device value comes to the host."""
        tokens = self._tokens
        if self._tokens_tensor is not None:
            # Sync point (logging / evaluation / save steps only): the non-padding token count.
            tokens += int(self._tokens_tensor.item())
        local = (self._samples, tokens, self._flops, self._saw_input)
        self._samples, self._tokens, self._flops, self._tokens_tensor, self._saw_input = 0, 0, 0.0, None, False
        from . import distributed

        if not distributed.is_distributed():
            return local
        box = torch.tensor([local[0], local[1], local[2], float(local[3])], dtype=torch.float64)
        distributed.all_reduce(box, host=True)  # host values, on the gloo group
        samples, tokens, flops, saw = box.tolist()
        return int(samples), int(tokens), flops, saw > 0

    def flush(self, state) -> None:
        """Add the tokens counted since the last flush to `state.num_input_tokens_seen` (as transformers keeps
        it, summed over ranks), and the counts to the current interval. Every rank calls it at the same steps."""
        if not self.counting:
            return
        samples, tokens, flops, saw = self._read()
        self._interval_samples += samples
        self._interval_tokens += tokens
        self._interval_flops += flops
        self._interval_saw_input |= saw
        if self.token_mode != "no":
            state.num_input_tokens_seen += tokens

    def interval_logs(self, state) -> dict[str, float]:
        """The keys for a training log: rates over the interval since the last one. Starts the next interval."""
        self.flush(state)
        now = time.perf_counter()
        elapsed = max(now - self._last_time - self._excluded, 1e-9)
        steps = state.global_step - self._last_step
        logs: dict[str, float] = {}
        if self.log_throughput and steps > 0:
            if self._interval_samples:
                logs["samples_per_second"] = round(self._interval_samples / elapsed, 3)
            logs["steps_per_second"] = round(steps / elapsed, 3)
            logs["step_time"] = round(elapsed / steps, 6)
            logs["data_time"] = round(self._data_time / steps, 6)  # this rank's, not summed over ranks
        if self.log_tokens and self.token_mode != "no" and self._interval_saw_input:
            logs["tokens_per_second"] = round(self._interval_tokens / elapsed, 3)
            logs["num_input_tokens_seen"] = state.num_input_tokens_seen
        if self.peak_memory:
            # The allocator's high-water mark since the process started: never reset here (a reset would
            # change what the user's own torch.cuda.max_memory_allocated() calls see), so it never goes down.
            logs["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.flops_per_token is not None and self._interval_saw_input:
            from . import distributed

            logs["mfu"] = self._interval_flops / (elapsed * distributed.world_size() * self.peak_flops)
        self._interval_samples, self._interval_tokens, self._interval_flops = 0, 0, 0.0
        self._interval_saw_input = False
        self._last_time, self._last_step, self._excluded, self._data_time = now, state.global_step, 0.0, 0.0
        return logs
