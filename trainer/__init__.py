"""fg-bus's trainer: a PyTorch training loop with transformers' (5.x) callback contract.

    from trainer import Trainer, TrainingArguments, TrainerCallback

The names below are imported on first use, so that `import trainer.cli` (fg-train's `--help`, an argument
error, the `--nproc-per-node` launcher) does not import torch, a second or more of CPU.
"""

from __future__ import annotations

import importlib

#: each public name, and the module of this package that defines it
_EXPORTS = {
    "AlertLogger": "sink_callbacks",
    "BusCallback": "bus_callback",
    "CallbackHandler": "callbacks",
    "DefaultFlowCallback": "callbacks",
    "DivergenceDetector": "divergence",
    "EVENTS": "callbacks",
    "EarlyStoppingCallback": "default_callbacks",
    "EvalLoopOutput": "_utils",
    "EvalPrediction": "_utils",
    "ExportableState": "state",
    "GradLogger": "sink_callbacks",
    "InfoCallback": "default_callbacks",
    "IntervalStrategy": "training_args",
    "JsonLogger": "sink_callbacks",
    "PredictionOutput": "_utils",
    "PrinterCallback": "default_callbacks",
    "ProgressCallback": "default_callbacks",
    "SaveStrategy": "training_args",
    "SchedulerType": "training_args",
    "TBLogger": "sink_callbacks",
    "TailLogger": "sink_callbacks",
    "TextgenCallback": "sink_callbacks",
    "TrackerLogger": "sink_callbacks",
    "TrainOutput": "_utils",
    "Trainer": "trainer",
    "TrainerCallback": "callbacks",
    "TrainerControl": "state",
    "TrainerState": "state",
    "TrainingArguments": "training_args",
    "attach_bus": "bus_callback",
    "set_seed": "_utils",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: the next lookup finds it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

