"""fg-bus's trainer: a PyTorch training loop with transformers' (5.x) callback contract.

    from trainer import Trainer, TrainingArguments, TrainerCallback
"""

from ._utils import EvalLoopOutput, EvalPrediction, PredictionOutput, TrainOutput, set_seed
from .callbacks import EVENTS, CallbackHandler, DefaultFlowCallback, TrainerCallback
from .divergence import DivergenceDetector
from .default_callbacks import EarlyStoppingCallback, InfoCallback, PrinterCallback, ProgressCallback
from .state import ExportableState, TrainerControl, TrainerState
from .bus_callback import BusCallback, attach_bus
from .sink_callbacks import (AlertLogger, GradLogger, JsonLogger, TailLogger, TBLogger, TextgenCallback,
                             TrackerLogger)
from .trainer import Trainer
from .training_args import IntervalStrategy, SaveStrategy, SchedulerType, TrainingArguments

__all__ = [
    "AlertLogger",
    "BusCallback",
    "GradLogger",
    "JsonLogger",
    "TBLogger",
    "TailLogger",
    "TextgenCallback",
    "TrackerLogger",
    "EVENTS",
    "CallbackHandler",
    "DefaultFlowCallback",
    "DivergenceDetector",
    "EarlyStoppingCallback",
    "EvalLoopOutput",
    "EvalPrediction",
    "ExportableState",
    "InfoCallback",
    "IntervalStrategy",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "SaveStrategy",
    "SchedulerType",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "set_seed",
    "attach_bus",
]
