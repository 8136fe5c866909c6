"""`TrainingArguments`: the same names, defaults and meaning as `transformers.TrainingArguments` (5.x).

The fields this trainer acts on are here, and those transformers' shipped callbacks read (report_to,
run_name, project, trackio_*, hub_*, log levels, JIT checkpointing, ...), so that those callbacks run in
this Trainer. Every value is checked when the object is built, and a bad one raises `ValueError` naming
the field, so a typo in a config fails before any model is built.
"""

from __future__ import annotations

import dataclasses
import enum
import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any


class _StrEnum(str, enum.Enum):
    """A `str` enum that prints as its value, so it compares equal to `"steps"` and to transformers' enums."""

    def __str__(self) -> str:
        return self.value


class IntervalStrategy(_StrEnum):
    """When to log / evaluate / save. A `str` enum, so it compares equal to `"steps"` and to HF's enum."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(_StrEnum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class HubStrategy(_StrEnum):
    END = "end"
    EVERY_SAVE = "every_save"
    CHECKPOINT = "checkpoint"
    ALL_CHECKPOINTS = "all_checkpoints"


class ParallelMode(_StrEnum):
    """transformers' values; this trainer runs one process (NOT_PARALLEL) or torchrun ranks (DISTRIBUTED)."""

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"


# transformers' `trainer_log_levels`: "passive" (-1) leaves the level as it is.
LOG_LEVELS = {"detail": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL, "passive": -1}


class SchedulerType(_StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"


def _in_a_kubeflow_trainjob() -> bool:
    """transformers' `is_kubeflow_available`: the TrainJob controller sets KUBEFLOW_TRAINER_SERVER_URL."""
    if os.environ.get("DISABLE_KUBEFLOW_INTEGRATION", "FALSE").upper() == "TRUE":
        return False
    return os.environ.get("KUBEFLOW_TRAINER_SERVER_URL") is not None


def _enum_field(name: str, enum_cls: type[enum.Enum], value: Any) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}") from None


@dataclass(kw_only=True)
class TrainingArguments:
    """Arguments of a training run. Field names and defaults follow transformers 5.x."""

    output_dir: str | None = None
    run_name: str | None = None

    # Length of training
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1

    # Optimizer (AdamW) and schedule
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str | None = None  # "adamw_torch" or "adamw_torch_fused"; None: fused on CUDA, plain on the CPU
    max_grad_norm: float = 1.0
    lr_scheduler_type: SchedulerType | str = "linear"
    warmup_steps: float = 0
    # transformers 4.x spelling, kept so old configs run: a ratio of max_steps; warmup_steps wins if both set.
    warmup_ratio: float | None = None

    # Cadences
    logging_strategy: IntervalStrategy | str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    logging_nan_inf_filter: bool = True
    # transformers' token count: "all" (input_ids.numel()), "non_padding" (attention_mask.sum()), "no"; True /
    # False mean "all" / "no". When set, every log carries num_input_tokens_seen and the training logs
    # train_runtime and train_tokens_per_second, as transformers' logs do.
    include_num_input_tokens_seen: str | bool = "no"
    eval_strategy: IntervalStrategy | str = "no"
    eval_steps: float | None = None
    eval_delay: float = 0
    eval_on_start: bool = False

    # Evaluation and prediction
    prediction_loss_only: bool = False
    eval_do_concat_batches: bool = True
    include_for_metrics: list[str] = dataclasses.field(default_factory=list)  # "inputs", "loss"
    batch_eval_metrics: bool = False
    save_strategy: SaveStrategy | str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    save_on_each_node: bool = False
    # Read by transformers' JITCheckpointCallback (save a checkpoint on SIGTERM, then stop).
    enable_jit_checkpoint: bool = False

    # Best model
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False

    # Resuming
    resume_from_checkpoint: str | None = None
    restore_callback_states_from_checkpoint: bool = False
    ignore_data_skip: bool = False

    # Runtime
    seed: int = 42
    bf16: bool = False
    use_cpu: bool = False
    disable_tqdm: bool | None = None
    dataloader_num_workers: int = 0
    dataloader_drop_last: bool = False

    # Columns and loss
    remove_unused_columns: bool = True
    label_names: list[str] | None = None
    average_tokens_across_devices: bool = True

    # Logging and experiment tracking (read by transformers' integration callbacks)
    report_to: str | list[str] | None = "none"
    project: str = "huggingface"
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | None = None
    log_level: str = "passive"
    log_level_replica: str = "warning"
    log_on_each_node: bool = True

    # Throughput keys this trainer adds to every training log (not transformers' fields; see
    # trainer/_throughput.py): samples_per_second, steps_per_second and step_time over the interval since
    # the last log; tokens_per_second and num_input_tokens_seen when batches have input_ids; peak_memory_mb on
    # CUDA; mfu where the model's FLOPs per token and the device's peak are known (mfu_peak_tflops: the
    # peak, dense TFLOP/s per device, for a device not in the table, the CPU included).
    log_throughput: bool = True
    log_tokens: bool = True
    log_peak_memory: bool = True
    log_mfu: bool = True
    mfu_peak_tflops: float | None = None

    # The Hub: read by callbacks (hub_private_repo by trackio); this trainer never pushes (needs the network).
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: HubStrategy | str = "every_save"
    hub_always_push: bool = False
    hub_revision: str | None = None

    # For scripts (transformers' Trainer does not read them either); do_eval turns on with an eval_strategy.
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    local_rank: int = -1

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        self.output_dir = os.path.expanduser(str(self.output_dir))
        if self.disable_tqdm is None:
            self.disable_tqdm = False

        self.logging_strategy = _enum_field("logging_strategy", IntervalStrategy, self.logging_strategy)
        self.eval_strategy = _enum_field("eval_strategy", IntervalStrategy, self.eval_strategy)
        self.save_strategy = _enum_field("save_strategy", SaveStrategy, self.save_strategy)
        self.lr_scheduler_type = _enum_field("lr_scheduler_type", SchedulerType, self.lr_scheduler_type)
        self.hub_strategy = _enum_field("hub_strategy", HubStrategy, self.hub_strategy)
        if self.eval_strategy != IntervalStrategy.NO:
            self.do_eval = True
        if isinstance(self.include_num_input_tokens_seen, bool):  # as transformers
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"

        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            # As in transformers: eval_steps falls back to logging_steps.
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.report_to in ("none", ["none"], None):
            self.report_to = []
        elif isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if _in_a_kubeflow_trainjob() and "kubeflow" not in self.report_to:
            self.report_to = [*self.report_to, "kubeflow"]  # as transformers: its controller set the variables
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {what}")

        need(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "must be > 0 (or set max_steps > 0)")
        need(isinstance(self.max_steps, int) and (self.max_steps > 0 or self.max_steps == -1), "max_steps",
             "must be a positive integer, or -1 to train for num_train_epochs")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, "must be an integer >= 1")
        need(self.learning_rate >= 0, "learning_rate", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.optim in (None, "adamw_torch", "adamw_torch_fused"), "optim",
             "must be 'adamw_torch' or 'adamw_torch_fused' (other optimizers: optimizer_cls_and_kwargs= on the Trainer)")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (below 1 it is a ratio of max_steps)")
        need(self.warmup_ratio is None or 0 <= self.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
        for strategy, steps in (("logging_strategy", "logging_steps"), ("eval_strategy", "eval_steps"),
                                ("save_strategy", "save_steps")):
            if getattr(self, strategy) != IntervalStrategy.STEPS:
                continue
            value = getattr(self, steps)
            need(value is not None and value > 0, steps, f"must be > 0 when {strategy}='steps'")
            need(value < 1 or value == int(value), steps,
                 "must be an integer when >= 1 (a float below 1 is a ratio of max_steps)")
        need(self.eval_delay >= 0, "eval_delay", "must be >= 0")
        need(self.include_num_input_tokens_seen in ("all", "non_padding", "no"), "include_num_input_tokens_seen",
             "must be 'all', 'non_padding', 'no', True or False")
        need(self.mfu_peak_tflops is None or (isinstance(self.mfu_peak_tflops, (int, float)) and
                                              not isinstance(self.mfu_peak_tflops, bool) and
                                              math.isfinite(self.mfu_peak_tflops) and self.mfu_peak_tflops > 0),
             "mfu_peak_tflops", "must be None (the device's peak from the table) or a number of TFLOP/s > 0")
        for name in ("log_throughput", "log_tokens", "log_peak_memory", "log_mfu"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
             "must be None (keep all) or >= 1")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
        need(isinstance(self.seed, int), "seed", "must be an integer")
        for name in ("log_level", "log_level_replica"):
            need(getattr(self, name) in LOG_LEVELS, name, f"must be one of {', '.join(LOG_LEVELS)}")
        need(not self.push_to_hub, "push_to_hub", "this trainer does not push to the Hub (it needs the network); "
             "upload output_dir yourself, or run transformers' Trainer")
        if self.load_best_model_at_end:
            need(self.eval_strategy != IntervalStrategy.NO, "load_best_model_at_end",
                 "needs an eval_strategy other than 'no'")
            if self.save_strategy != SaveStrategy.BEST:
                need(self.eval_strategy.value == self.save_strategy.value, "load_best_model_at_end",
                     f"needs save_strategy to match eval_strategy (got save_strategy={self.save_strategy.value!r}, "
                     f"eval_strategy={self.eval_strategy.value!r})")
                if self.eval_strategy == IntervalStrategy.STEPS and self.save_steps >= 1 and self.eval_steps >= 1:
                    need(self.save_steps % self.eval_steps == 0, "save_steps",
                         f"must be a multiple of eval_steps={self.eval_steps} when load_best_model_at_end=True")
        if self.save_strategy == SaveStrategy.BEST:
            need(self.metric_for_best_model is not None, "save_strategy",
                 "'best' needs metric_for_best_model")

    # -- derived values -------------------------------------------------------------------------------

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def device(self):
        """The device this process trains on: the CPU when `use_cpu` or when no CUDA device exists."""
        import torch

        if not self.use_cpu and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def n_gpu(self) -> int:
        """GPUs this process uses: 1 on CUDA, else 0 (one GPU per process; no DataParallel here)."""
        if "_n_gpu" in self.__dict__:  # set by transformers' hyperparameter search
            return self.__dict__["_n_gpu"]
        return 1 if self.device.type == "cuda" else 0

    @property
    def parallel_mode(self) -> ParallelMode:
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def should_log(self) -> bool:
        """Whether this process logs: each node's first process, or only the first of all."""
        return self.local_process_index == 0 if self.log_on_each_node else self.process_index == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes checkpoints and models: rank 0 (each node's first with save_on_each_node)."""
        return self.local_process_index == 0 if self.save_on_each_node else self.process_index == 0

    def get_process_log_level(self) -> int:
        """log_level for a process that logs (should_log), log_level_replica for the others; "passive"
        keeps the level the `trainer` logger has now."""
        level = LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        return logging.getLogger("trainer").getEffectiveLevel() if level == -1 else level

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        """Run the block on the main process first (the others wait at a barrier), as transformers."""
        from . import distributed

        is_main = (self.local_process_index if local else self.process_index) == 0
        if not is_main:
            distributed.barrier()
        try:
            yield
        finally:
            if is_main:
                distributed.barrier()

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else (self.warmup_ratio or 0.0)
        return math.ceil(num_training_steps * ratio)

    # -- serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: enums become their strings, a set token becomes `<HUB_TOKEN>`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, list) and value and isinstance(value[0], enum.Enum):
                value = [v.value for v in value]
            if f.name.endswith("_token") and value is not None:
                value = f"<{f.name.upper()}>"
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """For TensorBoard's hparams (transformers' rule): the batch sizes added, anything but a bool, int,
        float, str or tensor as its str()."""
        import torch

        data = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str, torch.Tensor) else str(v) for k, v in data.items()}

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))
