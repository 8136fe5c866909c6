"""`fg-bus top`'s drawing and keys, without processes: frames fit the terminal, hostile record text is
neutralised, keys parse, the layout degrades at 80 columns. (tests/e2e/test_top.py runs it for real.)"""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console

from fg_bus import _top_render as render
from fg_bus import registry, top
from fg_bus.monitor import RunView

HOSTILE = "evil\x1b[2J\x1b]0;title\x07\x9b31m\u202eabc\r\nend"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def records(run_id: str, steps: int = 120, world_size: int = 1) -> list[dict]:
    out, seq = [], {r: 0 for r in range(world_size)}

    def rec(rank: int, event: str, step: int, **fields) -> None:
        ts = (T0 + timedelta(seconds=step * 0.1 + rank * 0.01)).isoformat()
        out.append({"v": 1, "run": run_id, "rank": rank, "seq": seq[rank], "timestamp": ts, "event": event,
                    "global_step": step, "epoch": step / 1000, **fields})
        seq[rank] += 1

    for rank in range(world_size):
        rec(rank, "on_train_begin", 0, meta={"name": HOSTILE, "world_size": world_size,
                                             "args": {"max_steps": 1000}})
    for step in range(1, steps + 1):
        for rank in range(world_size):
            rec(rank, "on_step_end", step)
            if step % 5 == 0:
                rec(rank, "on_log", step, metrics={"loss": 4.0 / (1 + step / 50), "learning_rate": 1e-3 * (1 - step / 1000),
                                                   "grad_norm": 1.0 + (step % 7) / 10, "tokens_per_second": 1000.0 + step,
                                                   "my_custom_metric": step * 2.0, HOSTILE: 1.0})
            if step % 50 == 0:
                rec(rank, "on_evaluate", step, metrics={"eval_loss": 3.0 / (1 + step / 60)})
                rec(rank, "system", step, metrics={"cpu_percent": 99.0, "rss_mb": 312.0, "gpu0_utilization": 87.0,
                                                   "gpu0_memory_used_mb": 30000.0, "gpu0_memory_total_mb": 81920.0,
                                                   "gpu0_power_w": 250.0, "gpu0_temperature_c": 65.0})
    rec(0, "textgen", steps, prompt=HOSTILE, text=HOSTILE)
    rec(0, "warning", steps, kind="stalled", stalled_for=130.0, message=HOSTILE)
    rec(0, "control", steps, cmd="save", id="x", source="fg-bus top", applied=True)
    return out


def tracked(run_id: str, world_size: int = 1, **data) -> top.Tracked:
    info = registry.RunInfo(Path("/nowhere") / "fg-bus" / run_id,
                            {"run_id": run_id, "status": "completed", "world_size": world_size, "started": 1.0,
                             "ended": 100.0, **data})
    view = RunView(run_id)
    for record in records(run_id, world_size=world_size):
        view.feed(record)
    return top.Tracked(info, view)


def dashboard(*runs: top.Tracked, detail: str | None = None) -> top.Top:
    follower = top.Follower(None, follow=False)
    for t in runs:
        follower.runs[t.info.run_id] = t
    return top.Top(follower, detail)


def draw(renderable, width: int, height: int | None = None, terminal: bool = False) -> str:
    out = io.StringIO()
    Console(file=out, width=width, height=height, force_terminal=terminal, color_system="truecolor" if terminal
            else None, highlight=False).print(renderable)
    return out.getvalue()


def test_the_live_screen_fills_80x24_exactly_with_the_keys_at_the_bottom():
    board = dashboard(tracked("run-a-20260101-000000-aaaa"), tracked("run-b-20260101-000000-bbbb"))
    for detail in (False, True):
        board.detail = detail
        lines = draw(board.frame(80, 24), 80, 24).splitlines()
        assert len(lines) == 24 and all(cell_len(line) <= 80 for line in lines), "\n".join(lines)
        assert ("esc back" if detail else "enter detail") in lines[-1]
    assert any("loss" in line and "╭" in line for line in lines)  # the detail has its charts at 80x24


def test_record_text_never_reaches_the_terminal_raw():
    t = tracked("run\x1b[31m-20260101-000000-cccc", status="bogus\x1b[5m")
    board = dashboard(t)
    for detail in (False, True):
        board.detail = detail
        for width, height in ((80, 24), (160, 50), (100, None)):
            plain = draw(board.frame(width, height, keys=height is not None), width, height)
            assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", plain), repr(plain)
            styled = draw(board.frame(width, height, keys=height is not None), width, height, terminal=True)
            # rich's own SGR codes only (ESC [ ... m), no other sequence, no bare controls
            leftover = re.sub(r"\x1b\[[0-9;]*m", "", styled)
            assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", leftover), repr(leftover)
    assert "\\x1b[2J" in draw(board.frame(100, None, keys=False), 100)  # shown escaped, readable


def test_the_table_drops_columns_before_the_run_id_at_80_columns():
    rows = [render.RowData(run_id="a-long-run-name-20260101-000000-abcd", status="live", step=500, max_steps=1000,
                           eta_s=65, rate=12.5, loss=1.234, best=("eval_loss", 1.1, 400), gpu_util=87.0,
                           gpu_used_mb=30000.0, gpu_total_mb=81920.0)]
    wide = [line.plain for line in render.runs_table(rows, 0, 160, None)]
    assert "GPU MEM" in wide[0] and "BEST EVAL" in wide[0] and wide[1].startswith(rows[0].run_id)
    narrow = [line.plain for line in render.runs_table(rows, 0, 80, None)]
    assert all(cell_len(line) <= 80 for line in narrow)
    assert "GPU MEM" not in narrow[0] and "STATUS" in narrow[0] and "LOSS" in narrow[0] and "GPU" in narrow[0]
    assert "50% 500/1000" in narrow[1] and "1m05s" in narrow[1] and "87%" in narrow[1]


def test_system_lines_per_rank_and_gpu_figures():
    t = tracked("ranks-20260101-000000-dddd", world_size=2)
    lines = [line.plain for line in render.system_lines(t.view, 100, None)]
    assert [line[:2] for line in lines if line.startswith("r")] == ["r0", "r1"]
    assert "gpu0 87% 29/80G 250W 65C" in lines[0]
    assert render.gpu_figures(t.view.system) == (87.0, 60000.0, 163840.0)


def test_charts_are_braille_of_the_size_asked():
    chart = render.line_chart([([(0, 1.0), (10, 3.0), (20, float("nan")), (30, 2.0)], "cyan")], 30, 5)
    lines = [line.plain for line in chart]
    assert len(lines) == 5 and all(cell_len(line) == 30 for line in lines)
    assert lines[0].startswith("3 ") and lines[-1].startswith("1 ")
    assert all(re.search("[\u2801-\u28ff]", line) for line in lines)  # a line through every row
    assert render.line_chart([([], "cyan")], 30, 3)[0].plain == "no data yet"
    view = RunView("r")
    for record in records("r"):
        view.feed(record)
    box = [line.plain for line in render.chart_panel(view, ("loss",), 40, 7)]
    assert len(box) == 7 and all(cell_len(line) == 40 for line in box), box
    assert box[0].startswith("╭─ loss 1.176  eval 1.125 ") and box[-1].endswith(" step 5..120 ─╯")


def test_keys_parse():
    assert top.parse_keys(b"\x1b[A\x1b[Bjk\r\x1b\x7fq") == ["up", "down", "j", "k", "enter", "esc", "backspace", "q"]
    assert top.parse_keys(b"\x1b[5~x\x1bOA") == ["x", "up"]  # unknown sequences skipped whole


def test_stop_asks_for_confirmation_and_anything_but_y_cancels():
    board = dashboard(tracked("run-e-20260101-000000-eeee"))
    sent = []
    board._send = lambda run_id, cmd: sent.append((run_id, cmd))
    assert board.key("x") and board.confirm == "run-e-20260101-000000-eeee" and not sent
    assert board.key("n") and board.confirm is None and not sent and "cancelled" in board.message.plain
    board.key("x")
    board.key("y")
    assert sent == [("run-e-20260101-000000-eeee", "stop")]
    board.key("s")
    board.key("e")
    assert sent[1:] == [("run-e-20260101-000000-eeee", "save"), ("run-e-20260101-000000-eeee", "evaluate")]
    assert board.key("enter") and board.detail
    assert board.key("esc") and not board.detail
    assert not board.key("q")


def test_a_live_run_whose_run_file_says_stalled_shows_stalled_first_in_the_table():
    import os
    import socket
    import time

    ended = tracked("old-20260101-000000-ffff")
    stalled = tracked("hung-20260101-000000-9999", status="running", pid=os.getpid(), host=socket.gethostname(),
                      heartbeat=time.time(), stalled_since=time.time() - 300, ended=None, started=2.0)
    board = dashboard(ended, stalled)
    lines = draw(board.frame(100, None, keys=False), 100).splitlines()
    assert lines[2].startswith("hung-") and " stalled " in lines[2] and " completed " in lines[3], "\n".join(lines)


def test_chart_range_ignores_a_far_first_value_and_marks_it():
    def dotted_rows(chart):  # rows with dots right of the first chart cells (the drop from the first point)
        return sum(bool(re.search("[\u2801-\u28ff]", line.plain[-30:])) for line in chart)

    rest = [(10 * i, 2.0 + (i % 10) / 10) for i in range(1, 101)]  # 2.0..2.9, noisy
    chart = render.line_chart([([(0, 40.0)] + rest, "cyan")], 40, 8)
    lines = [line.plain for line in chart]
    assert lines[0].startswith("▲2.9") and lines[-1].lstrip().startswith("2 "), lines  # clipped max marked
    # the first point drawn on the top row; the rest spans most rows (min..max it would fill under one)
    assert re.search("[\u2801-\u28ff]", lines[0][:12]) and dotted_rows(chart) >= 6, "\n".join(lines)
    low = render.line_chart([([(0, -40.0)] + rest, "cyan")], 40, 8)  # a slow first step: cut below, marked
    assert low[-1].plain.lstrip().startswith("▼") and low[0].plain.lstrip().startswith("2.9 ")
    assert dotted_rows(low) >= 6


def test_chart_range_of_a_plain_schedule_is_its_min_to_max():
    import math

    n = 300
    schedules = [[1e-3 * (1 - i / (n - 1)) for i in range(n)],  # linear decay
                 [5e-4 * (1 + math.cos(math.pi * i / n)) for i in range(n)],  # cosine
                 [1e-3 * min(i / 15, (n - i) / (n - 15)) for i in range(n)],  # warmup then linear
                 [math.exp(-4.6 * i / n) for i in range(n)],  # exponential, 100x
                 [3.0] * n]  # constant
    for ys in schedules:
        assert render.robust_range(ys) == (min(ys), max(ys))
    lines = [line.plain for line in render.line_chart([(list(enumerate(schedules[0])), "cyan")], 40, 6)]
    assert lines[0].startswith("0.001 ") and lines[-1].startswith("    0 ") and "▲" not in "".join(lines), lines
