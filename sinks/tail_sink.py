"""`fg-sink tail`: a live, human-readable view of a run (colour on a terminal, plain when piped), or the
records themselves with `--json`.

Record text never reaches the terminal raw: in the human view every string from a record is shown with its
control characters escaped (`\x1b`), and the JSON lines escape the ones orjson leaves raw (DEL, C1,
bidirectional overrides), so a run name or a sample cannot retitle the window or clear the screen.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from fg_bus import records

from ._output import has_controls, json_safe_line, printable
from .base import Sink

DEFAULT_EVENTS = ("on_train_begin", "on_log", "on_save", "textgen", "control", "warning", records.END)
_COLOURS = {"step": "\033[36m", "eval": "\033[33m", "save": "\033[32m", "text": "\033[35m", "bad": "\033[31m",
            "dim": "\033[2m"}
_RESET = "\033[0m"
_OWN_CODES = re.compile("|".join(re.escape(code) for code in (*_COLOURS.values(), _RESET)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return printable(value)


def _text(value) -> str:
    """A string from a record, quoted and escaped (repr escapes controls, printable() what repr leaves)."""
    return printable(repr(value))


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
        line = json_safe_line(records.encode(record)).decode() if self.as_json else self._safe(self.format(record))
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _safe(self, line: str | None) -> str | None:
        """A last guard: if anything but this sink's own colour codes is a control character (a field that
        format() did not escape), escape the whole line."""
        if line is None or not has_controls(_OWN_CODES.sub("", line) if self.colour else line):
            return line
        return printable(_OWN_CODES.sub("", line))

    def format(self, record: dict) -> str | None:
        event = printable(record["event"])
        rank = f"rank {_fmt(record.get('rank', 0))} | " if self.ranks != "0" else ""
        where = self._paint("dim", f"[{rank}step {_fmt(record.get('global_step', 0))} | "
                                   f"epoch {_fmt(record.get('epoch') or 0.0)}]")
        metrics = record.get("metrics") or {}
        if event == "on_train_begin":
            meta = record.get("meta") or {}
            model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            return (f"{self._paint('step', 'run ' + _fmt(record['run']))}: {_fmt(meta.get('name', ''))} "
                    f"{_fmt(model.get('factory', ''))}, {meta.get('num_parameters', '?'):,} parameters, "
                    f"{_fmt(meta.get('max_steps', '?'))} steps") if isinstance(meta.get("num_parameters"), int) else \
                f"run {_fmt(record['run'])} started"
        if event == "on_log":
            if any(k.startswith("eval_") for k in metrics):
                shown = "  ".join(f"{_fmt(k)} {_fmt(v)}" for k, v in metrics.items()
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
            return f"{where} {self._paint('save', 'saved')} {_fmt(record.get('checkpoint', ''))}"
        if event == "textgen" and record.get("text") is None:
            return (f"{where} {self._paint('bad', 'sample skipped')} {_text(record.get('prompt', ''))}: "
                    f"{_fmt(record.get('skipped', ''))}")
        if event == "textgen":
            return (f"{where} {self._paint('text', 'sample')} {_text(record.get('prompt', ''))} -> "
                    f"{_text(record.get('text', ''))}")
        if event == "control":
            state = "applied" if record.get("applied") else ("accepted" if record.get("accepted") else "refused")
            reason = f" ({_fmt(record['reason'])})" if record.get("reason") else ""
            return f"{where} control {_fmt(record.get('cmd', '?'))} {state}{reason}"
        if event == "warning":
            return f"{where} {self._paint('bad', 'warning')} {_fmt(record.get('message', ''))}"
        if event == records.END:  # the end record has a step but no epoch
            status = record.get("status", "?")
            step = self._paint("dim", f"[{rank}step {_fmt(record.get('global_step', 0))}]")
            return f"{step} {self._paint('save' if status == 'completed' else 'bad', 'end: ' + _fmt(status))}"
        return f"{where} {event} {' '.join(f'{_fmt(k)}={_fmt(v)}' for k, v in metrics.items())}".rstrip()
