"""The optimizer (transformers' parameter groups and default AdamW) and the learning-rate schedules named by
`TrainingArguments.lr_scheduler_type`."""

from __future__ import annotations

import functools
import math
import re

import torch

from .training_args import SchedulerType

# transformers' rule (`Trainer.get_decay_parameter_names`): no weight decay for parameters inside an
# nn.LayerNorm, nor for any whose dotted name (lower-cased) matches one of these.
NO_DECAY_NAME_PATTERNS = tuple(re.compile(p) for p in
                               (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))
NO_DECAY_MODULE_TYPES = (torch.nn.LayerNorm,)
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get weight decay. The patterns are tested at every level of nesting,
    on the name relative to that level, as transformers' `get_parameter_names` tests them."""
    def forbidden(name: str) -> bool:
        return any(p.search(name.lower()) for p in NO_DECAY_NAME_PATTERNS)

    names = []
    for child_name, child in model.named_children():
        if isinstance(child, NO_DECAY_MODULE_TYPES):
            continue
        names += [f"{child_name}.{n}" for n in decay_parameter_names(child) if not forbidden(f"{child_name}.{n}")]
    names += [k for k in model._parameters if not forbidden(k)]
    return names


def parameter_groups(model: torch.nn.Module, decay_names, weight_decay: float) -> list[dict]:
    """Two groups, always both and in this order (either may be empty), as transformers builds them:
    trainable parameters named in `decay_names`, then the other trainable parameters."""
    decay = set(decay_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def default_optimizer_cls_and_kwargs(args) -> tuple[type, dict]:
    """torch's AdamW from the arguments' `optim`: "adamw_torch" (plain) or "adamw_torch_fused". transformers'
    default is the fused one on torch >= 2.8; ours is too on CUDA, but on the CPU it is the plain one: torch's
    fused CPU kernel took a resume test from 1 s to 45 s with two busy processes beside it (its worker
    threads contend for the cores), and the two give equal results to float rounding. Other optimizers:
    pass `optimizer_cls_and_kwargs=` or `optimizers=` to the Trainer."""
    default = "adamw_torch_fused" if _TORCH_VERSION >= (2, 8) and args.device.type == "cuda" else "adamw_torch"
    optim = getattr(args, "optim", None) or default
    optim = str(getattr(optim, "value", optim))
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"optim={optim!r} is not supported here (only 'adamw_torch' and 'adamw_torch_fused'); "
                         "pass optimizer_cls_and_kwargs=(cls, kwargs) to the Trainer instead")
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW, kwargs


def build_optimizer(model: torch.nn.Module, groups: list[dict], optimizer_cls, optimizer_kwargs: dict):
    """Instantiate as transformers does: a `torch.optim.Optimizer` subclass gets the groups (or the
    `params` / `model` / `optimizer_dict` its kwargs carry instead); anything else is a factory, called
    with no arguments, whose result is called with (model, **kwargs)."""
    kwargs = dict(optimizer_kwargs)  # transformers pops from the caller's dict; we leave it alone
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        return optimizer_cls()(model, **kwargs)
    for key in ("params", "model", "optimizer_dict"):
        if key in kwargs:
            groups = kwargs.pop(key)
    return optimizer_cls(groups, **kwargs)


class OptimizerMixin:
    """transformers' optimizer and schedule methods, for `Trainer` (it reads `self.model`, `self.args`,
    `self.optimizer`, `self.lr_scheduler`, `self.optimizer_cls_and_kwargs`)."""

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """AdamW (or `optimizer_cls_and_kwargs`) over transformers' two parameter groups; kept if one exists."""
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.get_decay_parameter_names(model), self.args.weight_decay)
            cls, kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                           else self.get_optimizer_cls_and_kwargs(self.args, model))
            self.optimizer = build_optimizer(model, groups, cls, kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(optimizer if optimizer is not None else self.optimizer, self.args,
                                                num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[type, dict]:
        return default_optimizer_cls_and_kwargs(args)

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)


# Each factor is a module-level function bound with functools.partial: picklable, and LambdaLR's
# state_dict keeps only the step count, which is what a resume needs.
def _constant(step: int, warmup: int) -> float:
    return min(1.0, step / warmup) if warmup and step < warmup else 1.0


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int, cycles: float = 0.5) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))


def _cosine_restarts(step: int, warmup: int, total: int, cycles: int = 1) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7,
                power: float = 1.0) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if step > total or lr_init <= lr_end:
        return lr_end / lr_init if lr_init > 0 else 0.0
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _inverse_sqrt(step: int, warmup: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    shift = warmup or 10_000
    return 1.0 / math.sqrt((step + shift - warmup) / shift)


def build_scheduler(optimizer: torch.optim.Optimizer, args, num_training_steps: int):
    warmup = args.get_warmup_steps(num_training_steps)
    kind = args.lr_scheduler_type
    factors = {
        SchedulerType.CONSTANT: functools.partial(_constant, warmup=0),
        SchedulerType.CONSTANT_WITH_WARMUP: functools.partial(_constant, warmup=warmup),
        SchedulerType.LINEAR: functools.partial(_linear, warmup=warmup, total=num_training_steps),
        SchedulerType.COSINE: functools.partial(_cosine, warmup=warmup, total=num_training_steps),
        SchedulerType.COSINE_WITH_RESTARTS: functools.partial(_cosine_restarts, warmup=warmup,
                                                              total=num_training_steps),
        SchedulerType.POLYNOMIAL: functools.partial(_polynomial, warmup=warmup, total=num_training_steps,
                                                    lr_init=args.learning_rate),
        SchedulerType.INVERSE_SQRT: functools.partial(_inverse_sqrt, warmup=warmup),
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[kind])
