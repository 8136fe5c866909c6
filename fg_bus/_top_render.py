"""What `fg-bus top` draws: the runs table and one run's detail, as rich renderables sized to the terminal.

Pure functions of plain data (a `RowData` per run, a `RunView` for the detail): no sockets, no threads.
Every string that comes from a record or a run file goes through `safe()` and into a `Text` object, never
into rich markup: a run name or a text sample cannot move the cursor, retitle the window or inject markup.
Charts are braille line charts drawn here (2 x 4 dots a cell), so they read the same over ssh, in tmux and
in `--once`'s plain text.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.console import Group, RenderableType
from rich.text import Text

from .monitor import RunView, end_text, failure_frame, format_duration, format_value, metric_label, ordered_metrics

# C0 and C1 controls, DEL, line/paragraph separators, bidirectional overrides and isolates, and the BOM (the
# same set as sinks/_output.py `printable`, which fg_bus cannot import).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def safe(text: object, limit: int = 400) -> str:
    """`text` as one line with every control character escaped (`\\x1b`), at most `limit` characters."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                           else f"\\u{ord(m.group()):04x}", text)
    return text


def middle(text: str, width: int) -> str:
    """`text` cut to `width` cells in the middle (a run id's name and its unique tail both stay), padded to
    `width` with spaces."""
    if cell_len(text) > width:
        if width <= 1:
            return set_cell_size(text, width)
        head = set_cell_size(text, (width - 1) // 2)
        tail = set_cell_size(text[::-1], width - 1 - cell_len(head))[::-1]
        text = head + "…" + tail
    return set_cell_size(text, width)


STATUS_STYLE = {"live": "green", "stalled": "bold yellow", "paused": "yellow", "completed": "cyan", "stopped": "cyan",
                "interrupted": "yellow", "failed": "bold red", "dead": "bold red", "unknown": "dim"}


@dataclass
class RowData:
    """One run in the table (from its RunView where it has one, else from run.json's `progress`)."""

    run_id: str
    status: str
    step: int | None = None
    max_steps: int | None = None
    eta_s: float | None = None
    rate: float | None = None
    loss: float | None = None
    best: tuple[str, float, int] | None = None
    gpu_util: float | None = None
    gpu_used_mb: float | None = None
    gpu_total_mb: float | None = None
    elapsed_s: float | None = None  # since the run started (to its end, for a run that is over)
    error: str | None = None
    end_reason: dict | None = None  # why a run that is over ended (records.end_reason's dict)

    @property
    def progress(self) -> float | None:
        if not self.max_steps or self.step is None:
            return None
        return min(1.0, max(0.0, self.step / self.max_steps))


def gpu_figures(system: dict[int, dict[str, float]]) -> tuple[float | None, float | None, float | None]:
    """(mean utilisation %, memory used MB, memory total MB) over every GPU of every rank."""
    utils, used, total = [], 0.0, 0.0
    for metrics in system.values():
        for key, value in metrics.items():
            if key.startswith("gpu") and key.endswith("_utilization"):
                utils.append(value)
            elif key.startswith("gpu") and key.endswith("_memory_used_mb"):
                used += value
            elif key.startswith("gpu") and key.endswith("_memory_total_mb"):
                total += value
    return (sum(utils) / len(utils) if utils else None), (used if total else None), (total or None)


# -- pieces ----------------------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return fmt.format(value)


def _gb(mb: float) -> str:
    return f"{mb / 1024:.0f}" if mb >= 10240 else f"{mb / 1024:.1f}"


def progress_text(row: RowData) -> str:
    if row.step is None:
        return "-"
    if row.progress is None:
        return f"{row.step}"
    return f"{row.progress * 100:3.0f}% {row.step}/{row.max_steps}"


def progress_bar(fraction: float | None, width: int) -> Text:
    width = max(4, width)
    if fraction is None:
        return Text("░" * width, style="dim")
    full = int(round(fraction * width))
    return Text.assemble(("█" * full, "green"), ("░" * (width - full), "dim"))


def _cells(row: RowData) -> dict[str, Text]:
    best = row.best
    gpu = "-" if row.gpu_util is None else f"{row.gpu_util:.0f}%"
    mem = "-" if row.gpu_used_mb is None else f"{_gb(row.gpu_used_mb)}/{_gb(row.gpu_total_mb)}G"
    live = row.status in ("live", "stalled", "paused")
    return {
        "STATUS": Text(safe(row.status, 12), style=STATUS_STYLE.get(row.status, "")),
        "PROGRESS": Text(progress_text(row)),
        "ETA": Text(format_duration(row.eta_s) if live else "-"),
        "STEPS/S": Text(_num(row.rate, "{:.3g}") if live else "-"),
        "LOSS": Text(_num(row.loss)),
        "BEST EVAL": Text("-" if best is None else f"{_num(best[1])}@{best[2]}"),
        "GPU": Text(gpu),
        "GPU MEM": Text(mem),
    }


#: table columns after RUN, most important first: the last ones go when the terminal is narrow
COLUMNS = ("STATUS", "PROGRESS", "ETA", "LOSS", "STEPS/S", "GPU", "BEST EVAL", "GPU MEM")
RUN_MIN = 20
CORE_COLUMNS = 6  # STATUS .. GPU: kept even if the run id must be cut (to RUN_MIN) for them


def runs_table(rows: list[RowData], selected: int | None, width: int, height: int | None) -> list[Text]:
    """The runs as lines of text: a header and one line per run, the selected one highlighted; columns are
    dropped from the right of COLUMNS until the table fits `width`; rows scroll to keep the selection."""
    cells = [_cells(r) for r in rows]
    widths = {c: max([len(c)] + [len(cell[c].plain) for cell in cells]) for c in COLUMNS}
    shown = list(COLUMNS)
    run_w = max([3] + [cell_len(safe(r.run_id)) for r in rows])

    def rest() -> int:
        return width - sum(widths[c] + 2 for c in shown)

    while len(shown) > CORE_COLUMNS and rest() < run_w:  # the whole run id before the last columns
        shown.pop()
    while shown and rest() < min(run_w, RUN_MIN):  # then as much of it as fits beside the others
        shown.pop()
    run_w = max(3, min(run_w, rest()))
    header = Text(("RUN".ljust(run_w) + "".join("  " + c.ljust(widths[c]) for c in shown)).rstrip(), style="bold")
    lines = []
    for i, (row, cell) in enumerate(zip(rows, cells)):
        line = Text(middle(safe(row.run_id), run_w))
        for c in shown:
            line.append("  ")
            text = cell[c]
            text.pad_right(widths[c] - len(text.plain))
            line.append_text(text)
        line.rstrip()
        if i == selected:
            line.stylize("reverse")
        lines.append(line)
    if height is not None and len(lines) > height - 1 > 0:
        first = min(max(0, (selected or 0) - (height - 2)), len(lines) - (height - 1))
        lines = lines[first:first + height - 1]
    return [header] + lines


def flow(pairs: list[tuple[str, str]], width: int, max_lines: int | None, style: str = "") -> list[Text]:
    """label/value pairs laid out in as many lines as they need at `width` (up to `max_lines`)."""
    lines: list[Text] = []
    line = Text()
    for label, value in pairs:
        item = f"{label} {value}".strip() if label else value
        item = safe(item, 120)
        if line.plain and cell_len(line.plain) + 3 + cell_len(item) > width:
            lines.append(line)
            line = Text()
        if line.plain:
            line.append("   ")
        if label:
            line.append(safe(label, 40) + " ", style="dim")
        line.append(safe(value, 80), style=style)
    if line.plain:
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        if lines:
            lines[-1].append(" …", style="dim")
    return [one_line(line, width) for line in lines]


# -- charts ----------------------------------------------------------------------------------------------------

_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # braille bit of dot (row, column) in a cell


def _label(value: float) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if magnitude >= 1e-3 or value == 0 else f"{value:.1e}"


def robust_range(ys: list[float], tail: float = 0.05, fence: float = 0.5, pad: float = 0.05) -> tuple[float, float]:
    """A chart's y-range that outliers do not flatten (TensorBoard's "ignore outliers in chart scaling"). The
    bulk lies between the `tail` and 1-`tail` quantiles of `ys`; an end of min..max more than `fence` x the
    bulk's span beyond it (the first loss, a grad-norm spike) is cut to the bulk widened by `pad` x its span.
    Without such far points (a linear or cosine lr schedule) the range stays min..max exactly."""
    s = sorted(ys)
    n = len(s) - 1
    q0, q1 = s[int(n * tail)], s[n - int(n * tail)]
    span = q1 - q0
    if span == 0:  # a flat bulk: nothing to zoom into
        return s[0], s[-1]
    lo = q0 - pad * span if s[0] < q0 - fence * span else s[0]
    hi = q1 + pad * span if s[-1] > q1 + fence * span else s[-1]
    return lo, hi


def line_chart(lines: list[tuple[list[tuple[int, float]], str]], width: int, height: int) -> list[Text]:
    """Braille line chart of (step, value) series, each in its style: `height` lines of `width` cells
    including the y labels on the left (top and bottom of `robust_range`). Points beyond it are drawn on
    the top / bottom row and its label is marked ▲ / ▼. Non-finite values are left out."""
    points = [[(x, y) for x, y in pts if isinstance(y, (int, float)) and math.isfinite(y)] for pts, _ in lines]
    every = [p for pts in points for p in pts]
    if not every or height < 1 or width < 8:
        return [Text("no data yet", style="dim")] + [Text("") for _ in range(height - 1)]
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x0, x1 = min(xs), max(xs)
    y0, y1 = robust_range(ys)
    clipped = (y0 > min(ys), y1 < max(ys))
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    if x1 == x0:
        x1 = x0 + 1
    labels = ["▲" * clipped[1] + _label(y1), "▼" * clipped[0] + _label(y0)]
    label_w = max(len(s) for s in labels)
    cols = width - label_w - 1
    dots_w, dots_h = cols * 2, height * 4
    bits = [[0] * cols for _ in range(height)]
    owner = [[-1] * cols for _ in range(height)]

    def dot(px: int, py: int, series: int) -> None:
        r, c = py // 4, px // 2
        bits[r][c] |= _DOTS[py % 4][px % 2]
        owner[r][c] = series

    def line(a: tuple[int, int], b: tuple[int, int], series: int) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for i in range(1, n + 1):
            dot(a[0] + round((b[0] - a[0]) * i / n), a[1] + round((b[1] - a[1]) * i / n), series)

    for s, pts in enumerate(points):
        # Per dot column: the lowest and highest value in it (a spike stays visible), first and last.
        columns: dict[int, list[int]] = {}
        sx, sy = (dots_w - 1) / (x1 - x0), (dots_h - 1) / (y1 - y0)
        for x, y in pts:  # (the hot loop of a frame: plain arithmetic)
            px, py = int((x - x0) * sx + 0.5), min(max(int((y1 - y) * sy + 0.5), 0), dots_h - 1)
            span = columns.get(px)
            if span is None:
                columns[px] = [py, py, py, py]
            else:
                if py < span[0]:
                    span[0] = py
                elif py > span[1]:
                    span[1] = py
                span[3] = py
        prev = None
        for px in sorted(columns):
            low, high, first, last = columns[px]
            if prev is not None:
                line(prev, (px, first), s)
            for py in range(low, high + 1):
                dot(px, py, s)
            prev = (px, last)
    out = []
    for r in range(height):
        label = labels[0] if r == 0 else (labels[1] if r == height - 1 else "")
        text = Text(label.rjust(label_w) + " ", style="dim")
        out.append(text)
        row, who = bits[r], owner[r]
        start = 0
        for c in range(1, cols + 1):  # one append per run of cells of the same series
            if c == cols or who[c] != who[start]:
                cells = "".join(chr(0x2800 + b) if b else " " for b in row[start:c])
                text.append(cells, style=lines[who[start]][1] if who[start] >= 0 else "")
                start = c
    return out


CHART_STYLES = ("bright_cyan", "bright_magenta")
_CHART_CACHE: dict[tuple, list[Text]] = {}  # the last charts drawn (a Text is not changed once drawn)
CHART_LABELS = {"learning_rate": "lr", "eval_loss": "eval"}


def boxed(title: Text, subtitle: Text | None, body: list[Text], width: int, style: str = "dim") -> list[Text]:
    """`body` lines in a rounded box `width` cells wide, `title` on its top edge, `subtitle` on its bottom."""
    inner = width - 4
    title = one_line(title.copy(), max(0, width - 6))
    top = Text("╭─ ", style=style) + title + Text(" " + "─" * (width - 5 - cell_len(title.plain)) + "╮", style=style)
    lines = [top]
    for line in body:
        line = one_line(line.copy(), inner)
        lines.append(Text("│ ", style=style) + line + Text(" " * (inner - cell_len(line.plain)) + " │", style=style))
    sub = one_line(subtitle.copy(), max(0, width - 6)) if subtitle is not None else Text("")
    fill = width - 2 - (cell_len(sub.plain) + 3 if sub.plain else 0)
    bottom = Text("╰" + "─" * fill, style=style)
    if sub.plain:
        bottom += Text(" ", style=style) + sub + Text(" ─", style=style)
    lines.append(bottom + Text("╯", style=style))
    return lines


def chart_panel(view: RunView, names: tuple[str, ...], width: int, height: int) -> list[Text]:
    """A boxed chart, `width` x `height`, of the first of `names`' series (and eval_loss beside loss), its
    latest value in the title and the step range below."""
    series = view.series
    if names[0] == "loss":
        chosen = [n for n in ("loss", "eval_loss") if n in series]
    else:
        chosen = [n for n in names if n in series][:1]
    title = Text()
    for i, name in enumerate(chosen or names[:1]):
        pts = series.get(name) or []
        if i:
            title.append("  ")
        label = "throughput" if names == THROUGHPUT else CHART_LABELS.get(name, name)
        title.append(safe(label, 30), style=CHART_STYLES[i % 2] if chosen else "")
        if pts:
            title.append(" " + format_value(name, pts[-1][1]))
    lines = [(list(series[n]), CHART_STYLES[i % 2]) for i, n in enumerate(chosen)]
    steps = [p[0] for pts, _ in lines for p in pts]
    subtitle = Text(f"step {min(steps)}..{max(steps)}") if steps else None
    key = (view.run_id, tuple((n, len(series[n]), series[n][0], series[n][-1]) for n in chosen), width, height)
    body = _CHART_CACHE.get(key)
    if body is None:  # drawn again only when its data or size changed
        body = _CHART_CACHE[key] = line_chart(lines, width - 4, max(1, height - 2))
        while len(_CHART_CACHE) > 32:
            del _CHART_CACHE[next(iter(_CHART_CACHE))]
    return boxed(title, subtitle, body, width)


THROUGHPUT = ("tokens_per_second", "samples_per_second", "steps_per_second")
CHARTS = (("loss",), ("learning_rate",), ("grad_norm",), THROUGHPUT)


def charts(view: RunView, width: int, rows_h: int, n_rows: int) -> list[Text]:
    """The four charts, two side by side (one a row below 60 columns), `n_rows` rows of `rows_h` lines."""
    per_row = 2 if width >= 60 else 1
    wanted = CHARTS[:n_rows * per_row]
    out: list[Text] = []
    for i in range(0, len(wanted), per_row):
        group = wanted[i:i + per_row]
        w = width // per_row
        boxes = [chart_panel(view, names, w, rows_h) for names in group]
        for row in zip(*boxes):
            line = Text()
            for part in row:
                line.append_text(part)
            out.append(one_line(line, width))
    return out


# -- one run's sections ------------------------------------------------------------------------------------------

def metric_pairs(view: RunView) -> list[tuple[str, str]]:
    pairs = [(metric_label(n) or "", format_value(n, view.latest[n])) for n in ordered_metrics(view.latest)]
    pairs += [(n, format_value(n, view.eval_latest[n])) for n in ordered_metrics(view.eval_latest)]
    return pairs


_SYSTEM_ORDER = ("cpu_percent", "host_cpu_percent", "rss_mb", "host_memory_percent", "disk_free_gb")
_SYSTEM_LABELS = {"cpu_percent": "cpu", "host_cpu_percent": "host cpu", "rss_mb": "rss",
                  "host_memory_percent": "host mem", "disk_free_gb": "disk free"}
_GPU = re.compile(r"gpu(\d+)_(.+)")


def system_lines(view: RunView, width: int, max_lines: int | None) -> list[Text]:
    lines = []
    for rank in sorted(view.system):
        m = view.system[rank]
        pairs = [(_SYSTEM_LABELS[k], format_value(k, m[k])) for k in _SYSTEM_ORDER if k in m]
        gpus: dict[int, dict[str, float]] = {}
        for key, value in m.items():
            match = _GPU.fullmatch(key)
            if match:
                gpus.setdefault(int(match.group(1)), {})[match.group(2)] = value
        for i, g in sorted(gpus.items()):
            text = []
            if "utilization" in g:
                text.append(f"{g['utilization']:.0f}%")
            if "memory_used_mb" in g and "memory_total_mb" in g:
                text.append(f"{_gb(g['memory_used_mb'])}/{_gb(g['memory_total_mb'])}G")
            if "power_w" in g:
                text.append(f"{g['power_w']:.0f}W")
            if "temperature_c" in g:
                text.append(f"{g['temperature_c']:.0f}C")
            if "sm_clock_mhz" in g:
                text.append(f"{g['sm_clock_mhz']:.0f}MHz")
            if g.get("throttle"):
                names = [n for gpu in view.gpus.get(rank, []) if isinstance(gpu, dict) and gpu.get("index") == i
                         for n in gpu.get("throttle_reasons", []) if isinstance(n, str)]
                text.append("throttle " + (",".join(names) if names else f"{int(g['throttle']):#x}"))
            pairs.append((f"gpu{i}", " ".join(text)))
        rank_lines = flow(pairs, width - 4, None)  # (each cut to the width)
        for j, line in enumerate(rank_lines):
            lines.append(Text(f"r{rank}  " if j == 0 else "    ", style="bold") + line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
    return lines


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


EVENT_STYLE = {"stalled": "bold yellow", "stall-cleared": "green", "warning": "yellow", "straggler": "yellow",
               "control": "bright_magenta", "save": "cyan", "end": "bold", "log": "dim"}


def one_line(text: Text, width: int) -> Text:
    """`text` cut to `width` cells (an ellipsis where cut), never wrapped."""
    text.truncate(width, overflow="ellipsis")
    text.no_wrap = True
    return text


def event_lines(events, width: int, max_lines: int | None) -> list[Text]:
    shown = list(events)[-max_lines:] if max_lines else list(events)
    return [one_line(Text.assemble((_clock(ts) + " ", "dim"), (safe(kind, 20).ljust(9), EVENT_STYLE.get(kind, "")),
                                   " ", safe(text, width)), width) for ts, kind, text in shown]


def sample_lines(samples, width: int, max_lines: int | None) -> list[Text]:
    shown = list(samples)[-max_lines:] if max_lines else list(samples)
    out = []
    for step, prompt, text in shown:
        prompt, text = (t.replace("\r\n", "\n").replace("\n", "↵") for t in (prompt, text))  # one line each
        out.append(one_line(Text.assemble((f"step {step} ", "dim"), (safe(prompt, 80), "bold"), " → ",
                                          safe(text, width)), width))
    return out


def end_lines(row: RowData, width: int) -> list[Text]:
    """How a run that is over ended, and why ("stopped: `fg-bus ctl stop` from alice@gpu1 (pid 12) at step 40");
    for a failure, the line after names its innermost traceback frame. Nothing for a run that goes on."""
    if row.status in ("live", "stalled", "paused", "unknown"):
        return []
    lines = [one_line(Text.assemble(("ended ", "dim"), (safe(end_text(row.status, row.end_reason), width),
                                                       STATUS_STYLE.get(row.status, ""))), width)]
    frame = failure_frame(row.end_reason) if row.status == "failed" else None
    if frame:
        lines.append(one_line(Text.assemble(("   at ", "dim"), safe(frame, width)), width))
    return lines


def section(title: str) -> Text:
    return Text(title, style="bold underline")


def detail(view: RunView, row: RowData, width: int, height: int | None) -> list[RenderableType]:
    """One run: header, progress bar, charts, metrics, system per rank, samples, events. With `height`
    (the live screen), the text sections are cut and the charts get what is left; without (`--once`),
    every section is whole and each chart is 8 lines high."""
    head = Text(safe(row.run_id), style="bold")
    head.append("  ")
    head.append(safe(row.status, 12), style=STATUS_STYLE.get(row.status, ""))
    if view.epoch is not None:
        head.append(f"  epoch {view.epoch:.2f}")
    if view.world_size > 1:
        head.append(f"  {view.world_size} ranks")
    if view.stalled_for is not None:
        head.append(f"  no step for {format_duration(view.stalled_for)}", style="bold yellow")
    if view.stragglers:
        head.append(f"  stragglers: {', '.join(f'rank {r}' for r in view.stragglers)}", style="yellow")
    if view.name and view.name not in row.run_id:
        head.append(f"  {safe(view.name, 40)}", style="dim")
    head = one_line(head, width)
    live = row.status in ("live", "stalled", "paused")
    if live:
        info = f" {progress_text(row)}  ETA {format_duration(row.eta_s)}  {_num(row.rate, '{:.3g}')} steps/s"
    else:
        info = f" {progress_text(row)}  ran {format_duration(row.elapsed_s)}"
    bar = progress_bar(row.progress, width - len(info) - 1)
    bar.append(info)
    ended = end_lines(row, width)
    metrics = flow(metric_pairs(view), width, None if height is None else 3)
    if row.best:
        metrics.append(Text.assemble(("best ", "dim"), f"{safe(row.best[0], 40)} {_num(row.best[1])} "
                                     f"at step {row.best[2]}"))
    if height is None:
        system, samples, events = (system_lines(view, width, None), sample_lines(view.samples, width, 5),
                                   event_lines(view.events, width, 10))
        chart_h, chart_rows = 8, 2
    else:
        spare = height - 2 - len(ended)  # header, bar, how it ended
        system = system_lines(view, width, 2 if spare < 24 else 8)
        samples = sample_lines(view.samples, width, 1 if spare < 24 else 3)
        events = event_lines(view.events, width, 2 if spare < 24 else 6)
        text_h = len(metrics) + len(system) + len(samples) + len(events)
        if spare - text_h < 10:  # charts first: the text sections give way
            samples, events = samples[:1], events[:1]
            text_h = len(metrics) + len(system) + len(samples) + len(events)
        left = spare - text_h
        chart_rows = 2 if left >= 10 else (1 if left >= 4 else 0)
        chart_h = min(14, left // chart_rows) if chart_rows else 0
    parts: list[RenderableType] = [head, bar, *ended]
    parts += charts(view, width, chart_h, chart_rows) if chart_rows else []
    parts += metrics or [Text("no metrics yet", style="dim")]
    if height is None:
        parts += [section("system")] + (system or [Text("no system records yet", style="dim")])
        parts += [section("samples")] + (samples or [Text("none", style="dim")])
        parts += [section("events")] + (events or [Text("none", style="dim")])
    else:
        parts += system + samples + events
    return parts


def frame(parts: list[RenderableType], width: int) -> Group:
    """The parts, one under the other; every line of text cut to `width` (a frame never wraps)."""
    return Group(*[one_line(p, width) if isinstance(p, Text) else p for p in parts])
