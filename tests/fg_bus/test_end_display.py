"""How a run ended, as every follower shows it: `RunView`, `fg-bus top`'s table and detail, `fg-bus ls` (table
and --json) and `fg-bus cat`'s closing line, for runs stopped by `fg-bus ctl`, failed with a traceback,
interrupted by a signal, completed and dead. (tests/e2e/test_abort.py does it with a real trainer.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console

from conftest import CTL_STOPPED, T0, dead_pid, explain, failed_reason, make_run
from fg_bus import _top_render as render
from fg_bus import registry, top
from fg_bus.monitor import RunView, end_text, failure_frame
from fg_bus.records import encode, end_reason

FG_BUS = os.path.join(os.path.dirname(sys.executable), "fg-bus")
START = datetime(2026, 1, 1, tzinfo=timezone.utc)

STOPPED = CTL_STOPPED
FAILED = failed_reason("ValueError", "loss went wrong\nsecond line of the message", "raise ValueError('loss went wrong')")
INTERRUPTED = end_reason("SIGTERM at step 12", signal="SIGTERM", step=12)
COMPLETED = end_reason("reached max_steps (100)", step=100)
REASONS = {"stopped": STOPPED, "failed": FAILED, "interrupted": INTERRUPTED, "completed": COMPLETED}


def run_records(run_id: str, status: str | None, steps: int = 40, max_steps: int = 100) -> list[dict]:
    out = []

    def rec(event: str, step: int, **fields) -> None:
        out.append({"v": 1, "run": run_id, "rank": 0, "seq": len(out), "event": event, "global_step": step,
                    "timestamp": (START + timedelta(seconds=step * 0.1)).isoformat(), **fields})

    rec("on_train_begin", 0, meta={"name": "demo", "max_steps": max_steps})
    for step in range(1, steps + 1):
        rec("on_step_end", step, metrics={"loss": 3.0 - step / 100})
        if step % 10 == 0:
            rec("on_log", step, metrics={"loss": 3.0 - step / 100})
    if status is not None:
        rec("end", steps, status=status, reason=REASONS[status])
    return out


def feed(view: RunView, recs: list[dict]) -> RunView:
    for record in recs:
        view.feed(record)
    return view


# -- RunView -------------------------------------------------------------------------------------------------

def test_the_view_takes_the_status_and_reason_from_the_end_record():
    live = feed(RunView(), run_records("r", None))
    assert live.status == "live" and not live.ended and live.end_reason is None and live.eta_s is not None
    for status, reason in REASONS.items():
        view = feed(RunView(), run_records("r", status))
        assert view.status == status and view.end_status == status and view.ended, status
        assert view.end_reason == reason and view.summary()["end_reason"] == reason
        assert view.eta_s is None  # over: no time left
        assert view.events[-1][1] == "end" and view.events[-1][2] == view.describe_end()
    assert feed(RunView(), run_records("r", "stopped")).describe_end() == \
        "stopped: `fg-bus ctl stop` from alice@gpu1 (pid 4242) at step 40"
    # a many-line exception message: its first line
    assert feed(RunView(), run_records("r", "failed")).describe_end() == "failed: ValueError: loss went wrong …"
    assert failure_frame(FAILED) == "/src/model.py:77 in forward: raise ValueError('loss went wrong')"
    assert failure_frame(STOPPED) is None and failure_frame(None) is None


def test_a_dead_run_takes_the_reason_its_follower_saw_and_an_end_record_wins():
    view = feed(RunView(), run_records("r", None))
    view.set_status("dead", {"text": "no heartbeat for 40 s"})
    assert view.status == "dead" and view.ended and view.describe_end() == "dead: no heartbeat for 40 s"
    view.set_status("dead", {"text": "no heartbeat for 41 s"})  # seen again later: the newer
    assert view.end_reason == {"text": "no heartbeat for 41 s"}
    ended = feed(RunView(), run_records("r", "stopped"))
    ended.set_status("stopped", {"text": "what run.json says"})
    assert ended.end_reason == STOPPED
    assert end_text("completed", None) == "completed" and end_text("failed", {"text": "x" * 500}, 50) == \
        "failed: " + "x" * 41 + "…"


# -- fg-bus top ----------------------------------------------------------------------------------------------

def tracked(run_id: str, status: str | None, **data) -> top.Tracked:
    raw = status or "running"
    info = registry.RunInfo(Path("/nowhere") / "fg-bus" / run_id,
                            {"run_id": run_id, "status": raw, "world_size": 1, "started": 1.0,
                             "reason": REASONS.get(status), "ended": 100.0 if status else None, "pid": dead_pid(),
                             "host": "elsewhere", **data})
    return top.Tracked(info, feed(RunView(run_id), run_records(run_id, status)))


def draw(renderable, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False, color_system=None, highlight=False).print(renderable)
    return out.getvalue()


def test_top_shows_each_status_and_the_detail_says_why():
    runs = {s: tracked(f"{s}-20260101-000000-{i:04d}", s) for i, s in enumerate(REASONS)}
    follower = top.Follower(None, follow=False)
    follower.runs = {t.info.run_id: t for t in runs.values()}
    board = top.Top(follower, None)
    table = draw(board.frame(120, None, keys=False), 120)
    for status, t in runs.items():
        line = next(line for line in table.splitlines() if line.startswith(t.info.run_id[:10]))
        assert f" {status} " in line, table
    for status, t in runs.items():
        lines = draw(render.frame(render.detail(t.view, t.row(), 120, None), 120), 120).splitlines()
        assert lines[0].startswith(t.info.run_id) and f" {status}" in lines[0]
        assert lines[2].startswith("ended " + end_text(status, REASONS[status])[:60]), "\n".join(lines[:4])
        if status == "failed":
            assert lines[3] == "   at /src/model.py:77 in forward: raise ValueError('loss went wrong')"
        # the live screen too, where the sections give way
        screen = draw(render.frame(render.detail(t.view, t.row(), 80, 22), 80), 80)
        assert "ended " + status in screen
    assert render.STATUS_STYLE["failed"] == "bold red" and render.STATUS_STYLE["stopped"]
    # the table's summary of the selected run says it too
    board.selected = runs["stopped"].info.run_id
    assert "ended stopped: `fg-bus ctl stop` from alice@gpu1" in draw(board.frame(120, None, keys=False), 120)


def test_top_gives_a_run_summarised_from_run_json_its_reason():
    """An ended run top does not replay (its run.json has progress): the reason comes from run.json."""
    info = registry.RunInfo(Path("/nowhere") / "fg-bus" / "x-20260101-000000-aaaa",
                            {"run_id": "x-20260101-000000-aaaa", "status": "interrupted", "reason": INTERRUPTED,
                             "world_size": 1, "started": 1.0, "ended": 9.0, "progress": {"global_step": 12}})
    t = top.Tracked(info, RunView(info.run_id))
    row = t.row()
    assert row.status == "interrupted" and row.end_reason == INTERRUPTED
    assert render.end_lines(row, 100)[0].plain == "ended interrupted: SIGTERM at step 12"


# -- fg-bus ls and cat --------------------------------------------------------------------------------------

def fg_bus(fg_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FG_HOME=str(fg_home))
    return subprocess.run([FG_BUS, *args], env=env, capture_output=True, text=True, timeout=60)


def ended_run(out: Path, run_id: str, status: str, started: float) -> registry.RunInfo:
    info = make_run(out, run_id, pid=dead_pid(), status=status, started=started, last_step=40)
    info.data["reason"] = REASONS[status]
    registry.write_json_atomic(info.bus_dir / registry.RUN_FILE, info.data)
    info.journal_path(0).write_bytes(b"".join(encode(r) + b"\n" for r in run_records(run_id, status)))
    return info


def test_ls_shows_the_status_and_why_and_json_has_the_reason(fg_home, tmp_path):
    out = tmp_path / "out"
    runs = {s: ended_run(out, f"{s}-20260101-000000-{i:04d}", s, T0 + i) for i, s in enumerate(REASONS)}
    dead = make_run(out, "dead-20260101-000000-9999", pid=dead_pid(), started=T0 + 9, last_step=3)
    proc = fg_bus(fg_home, "ls")
    assert proc.returncode == 0 and not proc.stderr, explain(proc)
    header, *body = proc.stdout.splitlines()
    end_col, dir_col = header.index("END"), header.index("RUN DIR")
    cells = {line.split()[0]: (line.split()[1], line[end_col:dir_col].strip()) for line in body}
    assert cells[runs["stopped"].run_id] == ("stopped", "`fg-bus ctl stop` from alice@gpu1 (pid 4242) at step 40")
    assert cells[runs["failed"].run_id] == ("failed", "ValueError: loss went wrong …")
    assert cells[runs["interrupted"].run_id] == ("interrupted", "SIGTERM at step 12")
    assert cells[runs["completed"].run_id] == ("completed", "reached max_steps (100)")
    assert cells[dead.run_id] == ("dead", f"its process (pid {dead.data['pid']}) is gone without ending the run")

    proc = fg_bus(fg_home, "ls", "--json")
    assert proc.returncode == 0, explain(proc)
    by_id = {row["run_id"]: row for row in json.loads(proc.stdout)}
    for status, info in runs.items():
        assert by_id[info.run_id]["status"] == status and by_id[info.run_id]["end_reason"] == REASONS[status]
    assert by_id[runs["stopped"].run_id]["end_reason"]["origin"]["user"] == "alice"
    assert by_id[runs["failed"].run_id]["end_reason"]["exception"]["traceback"][-1]["line"] == 77
    assert by_id[dead.run_id]["status"] == "dead" and "gone" in by_id[dead.run_id]["end_reason"]["text"]


def test_cat_closes_with_how_the_run_ended(fg_home, tmp_path):
    out = tmp_path / "out"
    stopped = ended_run(out, "stopped-20260101-000000-aaaa", "stopped", T0)
    failed = ended_run(out, "failed-20260101-000000-bbbb", "failed", T0 + 1)
    proc = fg_bus(fg_home, "cat", stopped.run_id)
    assert proc.returncode == 0, explain(proc)
    assert proc.stderr.splitlines()[-1] == (f"fg-bus: run {stopped.run_id} stopped: `fg-bus ctl stop` from "
                                            "alice@gpu1 (pid 4242) at step 40"), proc.stderr
    proc = fg_bus(fg_home, "cat", failed.run_id)
    assert proc.returncode == 0, explain(proc)
    assert proc.stderr.splitlines()[-2:] == [
        f"fg-bus: run {failed.run_id} failed: ValueError: loss went wrong …",
        "fg-bus:   at /src/model.py:77 in forward: raise ValueError('loss went wrong')"], proc.stderr
