"""The installed `fg-bus` console script, run as a subprocess against a private FG_HOME."""

from __future__ import annotations

import datetime
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fg_bus import registry
from fg_bus.records import decode, encode
from fg_bus.registry import RunInfo
from conftest import T0, make_run, same, dead_pid, explain

FG_BUS = os.path.join(os.path.dirname(sys.executable), "fg-bus")
TIMEOUT = 30  # seconds per command (each takes well under one)


def fg_bus(fg_home: Path, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, FG_HOME=str(fg_home), PYTHONUNBUFFERED="1")
    return subprocess.run([FG_BUS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)







def run_records(run_id: str, *, end_status: str | None) -> list[dict]:
    """A short run's records; with `end_status`, closed by on_train_end and the bus's `end` record."""
    events = [("on_train_begin", 0, {}), ("on_step_end", 1, {"loss": 2.0}), ("on_log", 1, {"loss": 2.0, "lr": 0.1}),
              ("on_step_end", 2, {"loss": math.nan}), ("on_log", 2, {"loss": math.nan, "grad_norm": math.inf}),
              ("on_evaluate", 2, {"eval_loss": 1.5})]
    if end_status is not None:
        events += [("on_train_end", 2, {}), ("end", 2, {})]
    out = []
    for seq, (event, step, metrics) in enumerate(events):
        record = {"v": 1, "run": run_id, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
                  "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics}
        if event == "end":
            record["status"] = end_status
        out.append(record)
    return out


def write_journal(info: RunInfo, recs: list[dict]) -> None:
    info.journal_path(0).write_bytes(b"".join(encode(r) + b"\n" for r in recs))



def printed_records(stdout: str) -> list[dict]:
    return [decode(line) for line in stdout.splitlines() if line.strip()]


# -- ls ---------------------------------------------------------------------------------------------------

def test_ls_without_runs(fg_home):
    proc = fg_bus(fg_home, "ls")
    assert proc.returncode == 0, explain(proc)
    assert "no runs registered" in proc.stdout
    assert str(fg_home / "runs") in proc.stdout
    proc = fg_bus(fg_home, "ls", "--json")
    assert proc.returncode == 0, explain(proc)
    assert json.loads(proc.stdout) == []


@pytest.fixture
def four_runs(fg_home, tmp_path):
    out = tmp_path / "out"
    return {
        "live": make_run(out, "alive-20260101-000000-aaaa", started=T0 + 1, last_step=12),
        "dead": make_run(out, "crashed-20260101-000000-bbbb", pid=dead_pid(), started=T0 + 2, last_step=7),
        "ended": make_run(out, "done-20260101-000000-cccc", pid=dead_pid(), status=registry.COMPLETED,
                          started=T0 + 3, last_step=100),
        "failed": make_run(out, "broke-20260101-000000-dddd", pid=dead_pid(), status=registry.FAILED,
                           started=T0 + 4),
    }


def test_ls_table(fg_home, four_runs):
    proc = fg_bus(fg_home, "ls")
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["RUN", "STATUS", "PID", "STARTED", "STEP"]
    assert "RUN DIR" in lines[0]
    body = lines[1:]
    assert len(body) == 4
    expected = [("live", "live"), ("dead", "dead"), ("ended", "completed"), ("failed", "failed")]  # oldest first
    for line, (key, status) in zip(body, expected):
        info = four_runs[key]
        cells = line.split()
        assert cells[0] == info.run_id, line
        assert cells[1] == status, line
        assert cells[2] == str(info.data["pid"]), line
        assert str(info.bus_dir.resolve()) in line
    assert body[0].split()[4] == "12"
    # the table's columns line up
    status_col, pid_col = lines[0].index("STATUS"), lines[0].index("PID")
    for line, (_, status) in zip(body, expected):
        assert line[status_col:].split()[0] == status, line
        assert line[status_col - 2:status_col] == "  "
        assert line[pid_col:].split()[0].isdigit(), line


def test_ls_json(fg_home, four_runs):
    proc = fg_bus(fg_home, "ls", "--json")
    assert proc.returncode == 0, explain(proc)
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        assert set(row) == {"run_id", "status", "end_reason", "pid", "started", "last_step", "run_dir", "max_steps",
                            "progress", "steps_per_second", "eta_s", "last_loss", "best_eval", "stalled_since"}
    by_id = {row["run_id"]: row for row in rows}
    for key, status in [("live", "live"), ("dead", "dead"), ("ended", "completed"), ("failed", "failed")]:
        info = four_runs[key]
        row = by_id[info.run_id]
        assert row["status"] == status
        assert row["pid"] == info.data["pid"]
        assert row["last_step"] == info.data["last_step"]
        assert Path(row["run_dir"]).resolve() == info.bus_dir.resolve()
        started = datetime.datetime.fromtimestamp(info.data["started"]).isoformat(timespec="seconds")
        assert row["started"] == started
    assert [row["run_id"] for row in rows] == [four_runs[k].run_id for k in ("live", "dead", "ended", "failed")]


# -- cat --------------------------------------------------------------------------------------------------

def test_cat_an_ended_run(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "done-20260101-000000-eeee", pid=dead_pid(), status=registry.COMPLETED)
    recs = run_records(info.run_id, end_status=registry.COMPLETED)
    write_journal(info, recs)
    proc = fg_bus(fg_home, "cat", info.run_id)
    assert proc.returncode == 0, explain(proc)
    got = printed_records(proc.stdout)
    assert [r["seq"] for r in got] == list(range(len(recs)))
    assert same(got, recs)
    assert math.isnan(got[3]["metrics"]["loss"]) and got[4]["metrics"]["grad_norm"] == math.inf
    assert got[-1]["event"] == "end" and got[-1]["status"] == "completed"
    assert "completed" in proc.stderr
    # the same run by unique prefix and by directory
    for spec in ("done-2026", str(info.bus_dir), str(tmp_path / "out")):
        proc = fg_bus(fg_home, "cat", spec)
        assert proc.returncode == 0, explain(proc)
        assert same(printed_records(proc.stdout), recs)


def test_cat_filters_events_but_keeps_the_end(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "done-20260101-000000-ffff", pid=dead_pid(), status=registry.COMPLETED)
    recs = run_records(info.run_id, end_status=registry.COMPLETED)
    write_journal(info, recs)
    proc = fg_bus(fg_home, "cat", info.run_id, "--events", "on_log")
    assert proc.returncode == 0, explain(proc)
    got = printed_records(proc.stdout)
    assert [r["event"] for r in got] == ["on_log", "on_log", "end"]
    assert [r["seq"] for r in got] == [2, 4, 7]
    proc = fg_bus(fg_home, "cat", info.run_id, "--events", "on_evaluate,on_train_begin")
    assert proc.returncode == 0, explain(proc)
    assert [r["event"] for r in printed_records(proc.stdout)] == ["on_train_begin", "on_evaluate", "end"]


def test_cat_from_seq(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "done-20260101-000000-abab", pid=dead_pid(), status=registry.COMPLETED)
    recs = run_records(info.run_id, end_status=registry.COMPLETED)
    write_journal(info, recs)
    proc = fg_bus(fg_home, "cat", info.run_id, "--from", "5")
    assert proc.returncode == 0, explain(proc)
    assert [r["seq"] for r in printed_records(proc.stdout)] == [5, 6, 7]


def test_cat_a_run_that_died(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "crashed-20260101-000000-1234", pid=dead_pid())
    assert info.status == registry.DEAD
    recs = run_records(info.run_id, end_status=None)
    write_journal(info, recs)
    with open(info.journal_path(0), "ab") as f:
        f.write(b'{"v":1,"run":"crashed')  # killed mid-write
    proc = fg_bus(fg_home, "cat", info.run_id)
    assert proc.returncode == 3, explain(proc)
    got = printed_records(proc.stdout)
    assert same(got, recs)
    assert "dead" in proc.stderr


def test_cat_unknown_run(fg_home):
    proc = fg_bus(fg_home, "cat", "nosuchrun")
    assert proc.returncode == 1, explain(proc)
    assert "nosuchrun" in proc.stderr and proc.stdout == ""


def test_cat_from_must_be_a_seq(fg_home):
    proc = fg_bus(fg_home, "cat", "whatever", "--from", "abc")
    assert proc.returncode == 2, explain(proc)
    assert "abc" in proc.stderr and "--from" in proc.stderr


# -- ctl --------------------------------------------------------------------------------------------------

def test_ctl_on_an_ended_run_fails(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "done-20260101-000000-9999", pid=dead_pid(), status=registry.COMPLETED)
    proc = fg_bus(fg_home, "ctl", info.run_id, "stop", "--timeout", "1")
    assert proc.returncode != 0, explain(proc)
    assert "not running" in proc.stderr
    assert info.run_id in proc.stderr


def test_ctl_on_a_dead_run_fails(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "crashed-20260101-000000-8888", pid=dead_pid())
    proc = fg_bus(fg_home, "ctl", info.run_id, "save", "--timeout", "1")
    assert proc.returncode != 0, explain(proc)
    assert "dead" in proc.stderr and "not running" in proc.stderr


def test_ctl_without_a_live_run(fg_home):
    proc = fg_bus(fg_home, "ctl", "latest", "stop", "--timeout", "1")
    assert proc.returncode != 0, explain(proc)
    assert "no live run" in proc.stderr


def test_ctl_refuses_an_unknown_command(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "alive-20260101-000000-7777")
    proc = fg_bus(fg_home, "ctl", info.run_id, "bogus")
    assert proc.returncode == 2, explain(proc)
    assert "bogus" in proc.stderr and "invalid choice" in proc.stderr


# -- keys -------------------------------------------------------------------------------------------------

def test_keys(fg_home):
    proc = fg_bus(fg_home, "keys")
    assert proc.returncode == 0, explain(proc)
    keys = fg_home / "keys"
    assert str(keys) in proc.stdout
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        path = keys / name
        assert path.is_file(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert stat.S_IMODE((keys / "authorized").stat().st_mode) == 0o700
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    assert b"secret-key" in (keys / "server.key_secret").read_bytes()
    assert b"secret-key" not in (keys / "server.key").read_bytes()
    server_secret = (keys / "server.key_secret").read_bytes()

    proc = fg_bus(fg_home, "keys")
    assert proc.returncode != 0, explain(proc)
    assert "--force" in proc.stderr
    assert (keys / "server.key_secret").read_bytes() == server_secret  # untouched

    proc = fg_bus(fg_home, "keys", "--force")
    assert proc.returncode == 0, explain(proc)
    assert (keys / "server.key_secret").read_bytes() != server_secret
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name


def test_help_and_missing_command(fg_home):
    proc = fg_bus(fg_home, "--help")
    assert proc.returncode == 0 and "fg-bus ls" in proc.stdout
    proc = fg_bus(fg_home)
    assert proc.returncode == 2
