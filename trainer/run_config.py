"""From a loaded configuration to a ready `Trainer`.

A config's top-level keys that the trainer reads:
  args               TrainingArguments fields (a mapping), or a `!singleton:trainer:TrainingArguments`
  model              the model (required)
  train_dataset, eval_dataset, data_collator, processing_class (or `tokenizer`), compute_loss_func
  trainer_callbacks  a list of callbacks (instances or classes)
Any other top-level key is a definition for anchors to refer to (`corpus: &corpus ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any

from fg_bus.security import InsecureBus

from .callbacks import EVENTS, TrainerCallback
from .config import ConfigError, LoadedConfig, default_config_path, load_config
from .trainer import Trainer
from .training_args import TrainingArguments

logger = logging.getLogger(__name__)

TRAINER_KEYS = ("model", "args", "train_dataset", "eval_dataset", "data_collator", "processing_class", "tokenizer",
                "compute_loss_func", "trainer_callbacks")


def build_training_args(config: LoadedConfig, overrides: dict[str, Any]) -> TrainingArguments:
    raw = config.values.get("args", {})
    try:
        if isinstance(raw, TrainingArguments):
            return dataclasses.replace(raw, **overrides)
        if not isinstance(raw, dict):
            raise ConfigError(f"{config.where('args')}: args must be a mapping of TrainingArguments fields, "
                              f"got {type(raw).__name__}")
        unknown = sorted(set(raw) - TrainingArguments.field_names())
        if unknown:
            hints = {k: difflib.get_close_matches(k, TrainingArguments.field_names(), n=1) for k in unknown}
            described = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ConfigError(f"{config.where('args')}: unknown TrainingArguments field(s): {described}")
        return TrainingArguments(**{**raw, **overrides})
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{config.where('args')}: {e}") from None


def build_trainer(config: LoadedConfig, overrides: dict[str, Any] | None = None, event_bus=None) -> Trainer:
    """A Trainer from the config's values; `overrides` replace TrainingArguments fields."""
    values = config.values
    for key in values:
        if key not in TRAINER_KEYS:
            close = difflib.get_close_matches(key, TRAINER_KEYS, n=1, cutoff=0.8)
            if close:
                logger.warning("%s: top-level key %r is not read by the trainer; did you mean %r?",
                               config.where(key), key, close[0])
    if "model" not in values:
        raise ConfigError(f"{config.path}: the config has no `model`")
    if "processing_class" in values and "tokenizer" in values:
        raise ConfigError(f"{config.where('tokenizer')}: give processing_class or tokenizer, not both")
    callbacks = _callbacks(config)
    args = build_training_args(config, overrides or {})
    try:
        return Trainer(
            model=values["model"], args=args,
            data_collator=values.get("data_collator"),
            train_dataset=values.get("train_dataset"), eval_dataset=values.get("eval_dataset"),
            processing_class=values.get("processing_class", values.get("tokenizer")),
            compute_loss_func=values.get("compute_loss_func"), callbacks=callbacks, event_bus=event_bus,
        )
    except InsecureBus:  # the bus refused to start (tcp without keys): not a config problem
        raise
    except ValueError as e:
        raise ConfigError(f"{config.path}: {e}") from None


def _callbacks(config: LoadedConfig) -> list:
    """`trainer_callbacks`, each checked to be a callback (an instance or a class with event methods, such
    as a TrainerCallback or a transformers one), classes instantiated here so their errors name the entry."""
    callbacks = config.values.get("trainer_callbacks") or []
    where = config.where("trainer_callbacks")
    if not isinstance(callbacks, list):
        raise ConfigError(f"{where}: trainer_callbacks must be a list")
    out = []
    for index, cb in enumerate(callbacks):
        if not (isinstance(cb, TrainerCallback) or (isinstance(cb, type) and issubclass(cb, TrainerCallback))
                or any(callable(getattr(cb, event, None)) for event in EVENTS)):
            raise ConfigError(f"{where}: trainer_callbacks[{index}] is {_short(cb)} ({type(cb).__name__}), not a "
                              "callback: give a TrainerCallback instance (`!singleton:module:Class`) or class")
        if isinstance(cb, type):
            try:
                cb = cb()
            except Exception as e:
                raise ConfigError(f"{where}: trainer_callbacks[{index}]: {cb.__name__}() failed: "
                                  f"{type(e).__name__}: {e}; give its arguments with !singleton") from e
        out.append(cb)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_trainer(path: str | Path | None = None, variables: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> Trainer:
    """Load a config file (default: the built-in one) and build its Trainer."""
    return build_trainer(load_config(path or default_config_path(), variables), overrides)
