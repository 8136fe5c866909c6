"""AdamW and the learning-rate schedules named by `TrainingArguments.lr_scheduler_type`."""

from __future__ import annotations

import functools
import math

import torch

from .training_args import SchedulerType


def create_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (every parameter with fewer than two dimensions) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )


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


def create_scheduler(optimizer: torch.optim.Optimizer, args, num_training_steps: int):
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
