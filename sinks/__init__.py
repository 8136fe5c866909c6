"""Sinks: separate processes that follow a run's records (TensorBoard, JSON lines, a live tail, ...).

Each sink is a small class with `handle(record)` and an idempotent `close()` (see `sinks.base.Sink`),
unit-testable by feeding it records; `fg-sink KIND` runs one against a live or finished run.
"""

from .base import NullSink, Sink
from .json_sink import JsonSink
from .tail_sink import TailSink

__all__ = ["JsonSink", "NullSink", "Sink", "TailSink", "TensorBoardSink"]


def __getattr__(name: str):
    """`sinks.TensorBoardSink` on first use: tensorboard's import (about a second) is paid by the tb sink only,
    not by every `fg-sink` process."""
    if name == "TensorBoardSink":
        from .tb_sink import TensorBoardSink

        return TensorBoardSink
    raise AttributeError(f"module 'sinks' has no attribute {name!r}")
