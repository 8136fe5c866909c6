"""Sinks: separate processes that follow a run's event stream (TensorBoard, JSON lines, text generation,
a live tail). Each sink is a small class with `handle(record)` and `close()`; `fg-sink` runs them.
"""
