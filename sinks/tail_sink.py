"""`fg-sink tail`: a live, human-readable view of a run (colour on a terminal, plain when piped), or the
records themselves with `--json`."""

from __future__ import annotations

import sys
from typing import TextIO

from fg_bus import records

from .base import Sink

DEFAULT_EVENTS = ("on_train_begin", "on_log", "on_save", "textgen", "control", "warning", records.END)
_COLOURS = {"step": "\033[36m", "eval": "\033[33m", "save": "\033[32m", "text": "\033[35m", "bad": "\033[31m",
            "dim": "\033[2m"}
_RESET = "\033[0m"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TailSink(Sink):
    kind = "tail"

    def __init__(self, events: list[str] | None = None, as_json: bool = False, stream: TextIO | None = None,
                 colour: bool | None = None, ranks: str = "0"):
        self.ranks = ranks  # "0", "all" or "0,2": with more than rank 0, each line says its rank
        # --json passes every record through unless events were named; the human view has a default set.
        self.events = frozenset(events) if events else (None if as_json else frozenset(DEFAULT_EVENTS))
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() if colour is None else colour

    def _paint(self, kind: str, text: str) -> str:
        return f"{_COLOURS[kind]}{text}{_RESET}" if self.colour else text

    def handle(self, record: dict) -> None:
        if self.events is not None and record["event"] not in self.events and record["event"] != records.END:
            return
        line = records.encode(record).decode() if self.as_json else self.format(record)
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def format(self, record: dict) -> str | None:
        event = record["event"]
        rank = f"rank {record.get('rank', 0)} | " if self.ranks != "0" else ""
        where = self._paint("dim", f"[{rank}step {record.get('global_step', 0)} | epoch {_fmt(record.get('epoch') or 0.0)}]")
        metrics = record.get("metrics") or {}
        if event == "on_train_begin":
            meta = record.get("meta") or {}
            return (f"{self._paint('step', 'run ' + record['run'])}: {meta.get('name', '')} "
                    f"{(meta.get('model') or {}).get('factory', '')}, {meta.get('num_parameters', '?'):,} parameters, "
                    f"{meta.get('max_steps', '?')} steps") if isinstance(meta.get("num_parameters"), int) else \
                f"run {record['run']} started"
        if event == "on_log":
            if any(k.startswith("eval_") for k in metrics):
                shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()
                                  if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")))
                return f"{where} {self._paint('eval', 'eval')}  {shown}"
            if "train_loss" in metrics:
                return (f"{where} {self._paint('step', 'done')}  train_loss {_fmt(metrics['train_loss'])}  "
                        f"{_fmt(metrics.get('train_runtime', 0.0))} s  "
                        f"{_fmt(metrics.get('train_steps_per_second', 0.0))} steps/s")
            parts = [f"{name} {_fmt(metrics[key])}" for key, name in
                     (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm")) if key in metrics]
            return f"{where} {'  '.join(parts)}"
        if event == "on_save":
            return f"{where} {self._paint('save', 'saved')} {record.get('checkpoint', '')}"
        if event == "textgen" and record.get("text") is None:
            return f"{where} {self._paint('bad', 'sample skipped')} {record.get('prompt', '')!r}: {record.get('skipped', '')}"
        if event == "textgen":
            return f"{where} {self._paint('text', 'sample')} {record.get('prompt', '')!r} -> {record.get('text', '')!r}"
        if event == "control":
            state = "applied" if record.get("applied") else ("accepted" if record.get("accepted") else "refused")
            reason = f" ({record['reason']})" if record.get("reason") else ""
            return f"{where} control {record.get('cmd', '?')} {state}{reason}"
        if event == "warning":
            return f"{where} {self._paint('bad', 'warning')} {record.get('message', '')}"
        if event == records.END:  # the end record has a step but no epoch
            status = record.get("status", "?")
            step = self._paint("dim", f"[{rank}step {record.get('global_step', 0)}]")
            return f"{step} {self._paint('save' if status == 'completed' else 'bad', 'end: ' + status)}"
        return f"{where} {event} {' '.join(f'{k}={_fmt(v)}' for k, v in metrics.items())}".rstrip()
