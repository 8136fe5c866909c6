"""`fg-sink tail`: a live, human-readable view of a run (colour on a terminal, plain when piped), or the
records themselves with `--json`.

Log lines show every metric of the log (custom ones too; `fg_bus.monitor`'s order and formats), then
progress (step/max and %), the recent step rate and the ETA. Eval lines show every eval metric. `system` lines
come at most once per rank per `system_every` seconds (of record time: a replayed history is thinned the
same way). A stall, its clearing and a straggler rank each get one clearly marked line. The end line says
how the run ended and why ("end: stopped: `fg-bus ctl stop` from alice@gpu1 (pid 12) at step 40"; a failure's
innermost traceback frame on the line after; a dead run, what its follower saw). With `progress`
on a terminal, one status line stays at the bottom (plain text, rewritten with a carriage return; cleared
before each normal line and drawn again after it); never when piped.

Record text never reaches the terminal raw: in the human view every string from a record is shown with its
control characters escaped (`\x1b`), and the JSON lines escape the ones orjson leaves raw (DEL, C1,
bidirectional overrides), so a run name or a sample cannot retitle the window or clear the screen.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from typing import TextIO

from fg_bus import records
from fg_bus.monitor import (RunView, end_text, failure_frame, format_duration, format_value, metric_label,
                            ordered_metrics)

from ._output import has_controls, json_safe_line, printable
from .base import Sink

DEFAULT_EVENTS = ("on_train_begin", "on_log", "on_save", "textgen", "control", "warning", "system", records.END)
#: the least time (record time, s) between two system lines of one rank
SYSTEM_EVERY = 30.0
#: the least time (wall clock, s) between two redraws of the status line between normal lines
STATUS_EVERY = 0.2
_COLOURS = {"step": "\033[36m", "eval": "\033[33m", "save": "\033[32m", "text": "\033[35m", "bad": "\033[31m",
            "dim": "\033[2m"}
_RESET = "\033[0m"
_OWN_CODES = re.compile("|".join(re.escape(code) for code in (*_COLOURS.values(), _RESET)))
_HIDDEN = frozenset({"epoch", "total_flos"})
_EVAL_TIMING = ("_runtime", "_samples_per_second", "_steps_per_second")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return printable(value)


def _text(value) -> str:
    """A string from a record, quoted and escaped (repr escapes controls, printable() what repr leaves)."""
    return printable(repr(value))


def _metric(name: str, value) -> str:
    label = printable(metric_label(name))
    shown = printable(format_value(name, value))
    return f"{label} {shown}" if label else shown


class TailSink(Sink):
    kind = "tail"

    def __init__(self, events: list[str] | None = None, as_json: bool = False, stream: TextIO | None = None,
                 colour: bool | None = None, ranks: str = "0", system_every: float = SYSTEM_EVERY,
                 progress: bool = False):
        self.ranks = ranks  # "0", "all" or "0,2": with more than rank 0, each line says its rank
        # --json passes every record through unless events were named; the human view has a default set.
        self.events = frozenset(events) if events else (None if as_json else frozenset(DEFAULT_EVENTS))
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() if colour is None else colour
        self.system_every = system_every
        # the status line: only on a terminal, never in the JSON view
        self.progress = bool(progress) and not as_json and self.stream.isatty()
        self.view = RunView()
        self._system_shown: dict[int, float] = {}  # rank -> record time of its last system line
        self._status_width = 0  # characters of the status line on screen now (0: none)
        self._status_drawn = 0.0

    def _paint(self, kind: str, text: str) -> str:
        return f"{_COLOURS[kind]}{text}{_RESET}" if self.colour else text

    # -- the sink protocol --

    def open_run(self, info):
        self.view = RunView(info.run_id)  # its status comes from the records (a replayed history reads live)
        self._system_shown.clear()
        return None

    def handle(self, record: dict) -> None:
        if self.as_json:
            if self.events is None or record["event"] in self.events or record["event"] == records.END:
                self._emit(json_safe_line(records.encode(record)).decode())
            return
        if self.view.run_id is not None and record.get("run") != self.view.run_id and \
                record["event"] == "on_train_begin":
            self.view = RunView()  # another run on the same sink (a test, or --follow without open_run)
            self._system_shown.clear()
        self.view.feed(record)
        lines = []
        if self.events is None or record["event"] in self.events or record["event"] == records.END:
            lines.append(self._safe(self.format(record)))
            if record["event"] == records.END:
                lines.append(self._safe(self._failure(record)))
        if self.view.new_stragglers and (self.events is None or "warning" in self.events):
            lines += [self._safe(self._straggler(record, rank)) for rank in self.view.new_stragglers]
        lines = [line for line in lines if line]
        if lines:
            self._emit(*lines)
        elif self.progress and time.monotonic() - self._status_drawn >= STATUS_EVERY:
            self._draw_status()

    def end_run(self, status: str, reason: dict | None = None) -> None:
        self.view.set_status(status, reason)
        self._clear_status()
        if status == "dead" and not self.as_json and self.view.end_status is None:  # no end record to show it
            self._emit(self._safe(f"{self._paint('dim', f'[step {self.view.global_step}]')} "
                                  f"{self._paint('bad', 'end: ' + printable(end_text(status, reason)))}"))

    def close(self) -> None:
        self._clear_status()

    # -- output --

    def _emit(self, *lines: str) -> None:
        self._clear_status(flush=False)
        self.stream.write("".join(line + "\n" for line in lines))
        if self.progress:
            self._draw_status(flush=False)
        self.stream.flush()

    def status_line(self) -> str:
        """One line: step/max %, step rate, ETA, the last loss (or STALLED and for how long)."""
        v = self.view
        parts = [f"step {v.global_step}" + (f"/{v.max_steps} {v.progress * 100:.0f}%" if v.max_steps else "")]
        if v.steps_per_second:
            parts.append(format_value("steps_per_second", v.steps_per_second))
        if v.eta_s is not None:
            parts.append("ETA " + format_duration(v.eta_s))
        if v.last_loss is not None:
            parts.append("loss " + format_value("loss", v.last_loss))
        if v.stalled_for is not None:
            parts.append(f"STALLED {format_duration(v.stalled_for)}")
        return printable(" | ".join(parts))

    def _draw_status(self, flush: bool = True) -> None:
        if not self.view.meta or self.view.ended:
            return  # before on_train_begin there is nothing to show yet; after the end, nothing more
        width = max(10, shutil.get_terminal_size((80, 24)).columns - 1)  # never the last column: no wrap
        line = self.status_line()[:width]
        self.stream.write("\r" + line + " " * max(0, self._status_width - len(line)) + "\r")
        self._status_width = len(line)
        self._status_drawn = time.monotonic()
        if flush:
            self.stream.flush()

    def _clear_status(self, flush: bool = True) -> None:
        if self._status_width:
            self.stream.write("\r" + " " * self._status_width + "\r")
            self._status_width = 0
            if flush:
                self.stream.flush()

    def _safe(self, line: str | None) -> str | None:
        """A last guard: if anything but this sink's own colour codes is a control character (a field that
        format() did not escape), escape the whole line."""
        if line is None or not has_controls(_OWN_CODES.sub("", line) if self.colour else line):
            return line
        return printable(_OWN_CODES.sub("", line))

    def _where(self, record: dict) -> str:
        rank = f"rank {_fmt(record.get('rank', 0))} | " if self.ranks != "0" else ""
        step = _fmt(record.get("global_step", 0))
        if "epoch" not in record:  # system records, and bus records without one
            return self._paint("dim", f"[{rank}step {step}]")
        return self._paint("dim", f"[{rank}step {step} | epoch {_fmt(record.get('epoch') or 0.0)}]")

    def format(self, record: dict) -> str | None:
        event = printable(record["event"])
        where = self._where(record)
        metrics = record.get("metrics") or {}
        if event == "on_train_begin":
            meta = record.get("meta") or {}
            model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            return (f"{self._paint('step', 'run ' + _fmt(record['run']))}: {_fmt(meta.get('name', ''))} "
                    f"{_fmt(model.get('factory', ''))}, {meta.get('num_parameters', '?'):,} parameters, "
                    f"{_fmt(meta.get('max_steps', '?'))} steps") if isinstance(meta.get("num_parameters"), int) else \
                f"run {_fmt(record['run'])} started"
        if event == "on_log":
            return self._log(record, metrics, where)
        if event == "system":
            return self._system(record, metrics, where)
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
            return self._warning(record, where)
        if event == records.END:  # the end record has a step but no epoch: "end: stopped: `fg-bus ctl stop` ..."
            status = record.get("status", "?")
            rank = f"rank {_fmt(record.get('rank', 0))} | " if self.ranks != "0" else ""
            step = self._paint("dim", f"[{rank}step {_fmt(record.get('global_step', 0))}]")
            text = printable(end_text(status if isinstance(status, str) else "?", record.get("reason")))
            return f"{step} {self._paint('save' if status == 'completed' else 'bad', 'end: ' + text)}"
        return f"{where} {event} {' '.join(f'{_fmt(k)}={_fmt(v)}' for k, v in metrics.items())}".rstrip()

    def _failure(self, record: dict) -> str | None:
        """After a failed run's end line: where it failed, its innermost traceback frame."""
        frame = failure_frame(record.get("reason")) if record.get("status") == "failed" else None
        return f"    {self._paint('dim', 'at')} {printable(frame)[:400]}" if frame else None

    def _log(self, record: dict, metrics: dict, where: str) -> str:
        if any(k.startswith("eval_") for k in metrics):
            names = ordered_metrics(k for k in metrics if k not in _HIDDEN)
            shown = "  ".join(f"{printable(k)} {printable(format_value(k, metrics[k]))}" for k in names
                              if not k.endswith(_EVAL_TIMING))
            timing = [printable(format_value(k, metrics[k])) for k in names if k.endswith(_EVAL_TIMING[:2])]
            return f"{where} {self._paint('eval', 'eval')}  {shown}" + (f"  ({', '.join(timing)})" if timing else "")
        if "train_loss" in metrics:
            return (f"{where} {self._paint('step', 'done')}  train_loss {_fmt(metrics['train_loss'])}  "
                    f"{_fmt(metrics.get('train_runtime', 0.0))} s  "
                    f"{_fmt(metrics.get('train_steps_per_second', 0.0))} steps/s")
        parts = [_metric(k, metrics[k]) for k in ordered_metrics(k for k in metrics if k not in _HIDDEN)]
        tail = []
        step, max_steps = record.get("global_step"), self.view.max_steps
        if max_steps and isinstance(step, int):
            tail.append(f"{step}/{max_steps} {min(100.0, 100 * step / max_steps):.0f}%")
        if record.get("rank", 0) == self.view.metrics_rank:
            if self.view.steps_per_second and "steps_per_second" not in metrics:  # one rate, not two
                tail.append(format_value("steps_per_second", self.view.steps_per_second))
            if self.view.eta_s is not None:
                tail.append("ETA " + format_duration(self.view.eta_s))
        return f"{where} {'  '.join(parts)}" + (
            f"  | {', '.join(tail)}" if tail else "")

    def _system(self, record: dict, metrics: dict, where: str) -> str | None:
        rank = record.get("rank", 0)
        seen = self.view.system.get(rank, {}).get("timestamp", 0.0)
        last = self._system_shown.get(rank)
        if last is not None and seen - last < self.system_every:
            return None
        self._system_shown[rank] = seen

        def num(key):
            value = metrics.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        parts = []
        if num("cpu_percent") is not None:
            parts.append(f"cpu {num('cpu_percent'):.0f}%")
        if num("rss_mb") is not None:
            parts.append("rss " + format_value("rss_mb", num("rss_mb")))
        used, total = num("host_memory_used_mb"), num("host_memory_total_mb")
        if used is not None and total:
            parts.append(f"host mem {used / 1024:.1f}/{total / 1024:.1f} GB")
        if num("disk_free_gb") is not None:
            parts.append(f"disk {num('disk_free_gb'):.0f} GB free")
        gpus = sorted({int(m.group(1)) for m in (re.match(r"gpu(\d+)_", k) for k in metrics) if m})
        throttled = {g.get("index"): g.get("throttle_reasons") for g in record.get("gpus") or []
                     if isinstance(g, dict) and g.get("throttle_reasons")}
        for i in gpus:
            gpu = [f"gpu{i}"]
            if num(f"gpu{i}_utilization") is not None:
                gpu.append(f"{num(f'gpu{i}_utilization'):.0f}%")
            mem, mem_total = num(f"gpu{i}_memory_used_mb"), num(f"gpu{i}_memory_total_mb")
            if mem is not None:
                gpu.append(f"{mem / 1024:.1f}" + (f"/{mem_total / 1024:.0f} GB" if mem_total else " GB"))
            for key in ("power_w", "temperature_c"):
                if num(f"gpu{i}_{key}") is not None:
                    gpu.append(format_value(key, num(f"gpu{i}_{key}")))
            if throttled.get(i):
                gpu.append("throttled: " + ",".join(printable(r) for r in throttled[i]))
            parts.append(" ".join(gpu))
        return f"{where} {self._paint('dim', 'system')}  {'  '.join(parts)}"

    def _warning(self, record: dict, where: str) -> str:
        kind = record.get("kind")
        message = _fmt(record.get("message", ""))
        stalled_for = record.get("stalled_for")
        how_long = format_duration(stalled_for) if isinstance(stalled_for, (int, float)) else "?"
        # the bus's message says how long already; without one, the line says it
        if kind == "stalled":
            return f"{where} {self._paint('bad', 'STALLED')}  {message or f'no progress for {how_long}'}"
        if kind == "stall-cleared":
            return f"{where} {self._paint('save', 'stall cleared')}  {message or f'after {how_long}'}"
        return f"{where} {self._paint('bad', 'warning')} {message}"

    def _straggler(self, record: dict, rank: int) -> str:
        text = next((t for _, k, t in reversed(self.view.events) if k == "straggler" and t.startswith(
            f"rank {rank} ")), f"rank {rank} is a straggler")
        return f"{self._where(record)} {self._paint('bad', 'STRAGGLER')}  {printable(text)}"
