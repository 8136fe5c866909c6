"""How a monitor writes numbers for a person: durations, metric values with units, the order of metrics; and
how a run ended, on one line. Public through `fg_bus.monitor`."""

from __future__ import annotations

import math
from typing import Any

from .records import describe_end

#: Metrics shown first, in this order; then every other one a-z (custom metrics too).
_FIRST = ("loss", "eval_loss", "grad_norm", "learning_rate", "tokens_per_second", "samples_per_second",
          "steps_per_second", "step_time", "num_input_tokens_seen", "peak_memory_mb", "mfu")
_RANK = {name: i for i, name in enumerate(_FIRST)}


def format_duration(seconds: float | None) -> str:
    """"12s", "3m05s", "1h02m", "2d03h"; "-" for None or a value that is not finite."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _compact(value: float) -> str:
    """1234 -> 1.23k, 12345678 -> 12.3M (3 significant figures)."""
    magnitude = abs(value)
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _unit(name: str) -> str | None:
    if name.endswith(("utilization", "_percent")):
        return "%"
    if name.endswith("_mb"):
        return "MB"
    if name.endswith("_gb"):
        return "GB"
    if name.endswith("_w"):
        return "W"
    if name.endswith("_c") and "temperature" in name:
        return "C"
    if name.endswith("_mhz"):
        return "MHz"
    return None


def format_value(name: str, value: Any) -> str:
    """A metric's value for a person: learning rates as 1.00e-03, losses and norms to 4 significant figures,
    rates with their unit (1.23k tok/s, 45.6 samples/s, 2.50 steps/s), step_time as 12.3ms / 1.23s, memory
    in MB/GB, mfu and utilisations as %, counts compact (1.23M); nan and inf as such; "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        from_record = str(value)
        return from_record if len(from_record) <= 60 else from_record[:57] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    base = name.rsplit("/", 1)[-1]
    if base == "learning_rate" or base == "lr" or base.endswith(("_lr", "learning_rate")):
        return f"{value:.2e}"
    if base.endswith("tokens_per_second"):
        return f"{_compact(value)} tok/s"
    if base.endswith("samples_per_second"):
        return f"{_compact(value)} samples/s"
    if base.endswith("steps_per_second"):
        return f"{_compact(value)} steps/s"
    if base in ("step_time", "data_time") or base.endswith(("_time", "_runtime")):
        return f"{value * 1000:.3g}ms" if abs(value) < 1 else f"{value:.3g}s"
    if base == "mfu":
        return f"{value * 100:.1f}%"
    if base.endswith("_mb"):
        return f"{value / 1024:.1f} GB" if abs(value) >= 10240 else f"{value:.0f} MB"
    if base in ("num_input_tokens_seen", "total_flos") or base.endswith(("_seen", "_count", "_tokens")):
        return _compact(value)
    unit = _unit(base)
    if unit is not None:
        return f"{value:.0f}{unit}" if unit in ("%", "W", "C", "MHz") else f"{value:.3g} {unit}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) < 1_000_000 else _compact(value)
    return f"{value:.4g}"


_LABELS = {"learning_rate": "lr", "tokens_per_second": "", "samples_per_second": "", "steps_per_second": "",
           "peak_memory_mb": "peak", "num_input_tokens_seen": "tokens", "step_time": "step"}


def metric_label(name: str) -> str:
    """A short label for a metric in a line of text ("" where the unit says it: "1.2k tok/s")."""
    return _LABELS.get(name, name)


def ordered_metrics(names) -> list[str]:
    """loss, eval_loss, grad_norm, learning_rate, the throughput figures, then every other name a-z."""
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (0, _RANK[n], "") if n in _RANK else (1, 0, n))


# -- how a run ended, for a line --------------------------------------------------------------------------------

def end_text(status: str | None, reason: Any, limit: int = 300) -> str:
    """`records.describe_end` on one line: "stopped: `fg-bus ctl stop` from alice@gpu1 (pid 12) at step 40";
    a many-line exception message keeps its first line (and "…"); at most `limit` characters."""
    return _one_line(describe_end(status, reason), limit)


def reason_text(reason: Any, limit: int = 300) -> str | None:
    """The reason's `text` on one line (as `end_text`), or None where it has none."""
    text = reason.get("text") if isinstance(reason, dict) else None
    return _one_line(text, limit) if isinstance(text, str) and text else None


def _one_line(text: str, limit: int) -> str:
    first, _, rest = text.partition("\n")
    text = first.rstrip() + (" …" if rest.strip() else "")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def failure_frame(reason: Any) -> str | None:
    """A failed run's innermost traceback frame, "trainer/trainer.py:412 in training_step: loss = ...", or None
    (no exception in the reason, or no frames)."""
    exception = reason.get("exception") if isinstance(reason, dict) else None
    frames = exception.get("traceback") if isinstance(exception, dict) else None
    if not isinstance(frames, list) or not frames or not isinstance(frames[-1], dict):
        return None
    frame = frames[-1]
    where = f"{frame.get('file', '?')}:{frame.get('line', '?')} in {frame.get('function', '?')}"
    code = frame.get("code")
    return where + (f": {code.strip()}" if isinstance(code, str) and code.strip() else "")
