"""`fg-bus ls`: progress, step rate, ETA, last loss, best eval and the stalled status, from run.json's
`progress` key (written by the bus at each heartbeat); runs without it show "-"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import dead_pid, explain, make_run
from fg_bus import registry

FG_BUS = os.path.join(os.path.dirname(sys.executable), "fg-bus")
FG_TRAIN = os.path.join(os.path.dirname(sys.executable), "fg-train")
TINY = Path(__file__).parents[1] / "e2e" / "tiny.yaml"
PROGRESS = {"global_step": 250, "max_steps": 1000, "steps_per_second": 12.5, "eta_s": 60.0, "last_loss": 2.345678,
            "best_eval": {"name": "eval_loss", "value": 2.5, "step": 200}}


def fg_bus(fg_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FG_HOME=str(fg_home))
    return subprocess.run([FG_BUS, *args], env=env, capture_output=True, text=True, timeout=60)


def with_data(info: registry.RunInfo, **data) -> registry.RunInfo:
    info.data.update(data)
    registry.write_json_atomic(info.bus_dir / registry.RUN_FILE, info.data)
    return info


def table(fg_home: Path) -> dict[str, dict[str, str]]:
    """`fg-bus ls` as {run id: {column: cell}}, cut at the header's column starts."""
    proc = fg_bus(fg_home, "ls")
    assert proc.returncode == 0 and not proc.stderr, explain(proc)
    header, *body = proc.stdout.splitlines()
    names = ["RUN", "STATUS", "PID", "STARTED", "STEP", "DONE", "STEP/S", "ETA", "LOSS", "BEST EVAL", "END",
             "RUN DIR"]
    starts = [header.index(name) for name in names]
    assert starts == sorted(starts), header
    rows = {}
    for line in body:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def test_ls_shows_progress_rate_eta_loss_and_best_eval(fg_home, tmp_path):
    out = tmp_path / "out"
    live = with_data(make_run(out, "live-20260101-000000-aaaa", last_step=250), progress=PROGRESS)
    stalled = with_data(make_run(out, "hung-20260101-000000-bbbb", last_step=250), progress=PROGRESS,
                        stalled_since=time.time() - 300)
    ended = with_data(make_run(out, "done-20260101-000000-cccc", pid=dead_pid(), status=registry.COMPLETED,
                               last_step=1000), progress={**PROGRESS, "global_step": 1000, "eta_s": 0.0})
    old = make_run(out, "old-20260101-000000-dddd", pid=dead_pid(), status=registry.COMPLETED, last_step=40)
    odd = with_data(make_run(out, "odd-20260101-000000-eeee", last_step=5),
                    progress={"global_step": "x", "max_steps": None, "best_eval": {"name": 3}, "last_loss": "NaN"})
    rows = table(fg_home)
    assert rows[live.run_id] | {"PID": "", "STARTED": "", "RUN DIR": ""} == {
        "RUN": live.run_id, "STATUS": "live", "PID": "", "STARTED": "", "STEP": "250/1000", "DONE": "25%",
        "STEP/S": "12.5", "ETA": "1m00s", "LOSS": "2.346", "BEST EVAL": "eval_loss=2.5@200", "END": "-",
        "RUN DIR": ""}
    assert rows[stalled.run_id]["STATUS"] == "stalled" and rows[stalled.run_id]["DONE"] == "25%"
    # an ended run: its progress, but no time left; a run.json from before reasons has no END to show
    assert (rows[ended.run_id]["STATUS"], rows[ended.run_id]["STEP"], rows[ended.run_id]["DONE"],
            rows[ended.run_id]["ETA"], rows[ended.run_id]["END"]) == ("completed", "1000/1000", "100%", "-", "-")
    # a run from before the progress key, and one whose progress is of the wrong shape: "-"
    for info, step in ((old, "40"), (odd, "5")):
        row = rows[info.run_id]
        assert row["STEP"] == step and all(row[c] == "-" for c in ("DONE", "STEP/S", "ETA", "LOSS", "BEST EVAL")), row

    proc = fg_bus(fg_home, "ls", "--json")
    assert proc.returncode == 0, explain(proc)
    by_id = {row["run_id"]: row for row in json.loads(proc.stdout)}
    assert {k: by_id[live.run_id][k] for k in ("last_step", "max_steps", "progress", "steps_per_second", "eta_s",
                                                "last_loss", "best_eval", "stalled_since")} == {
        "last_step": 250, "max_steps": 1000, "progress": 0.25, "steps_per_second": 12.5, "eta_s": 60.0,
        "last_loss": 2.345678, "best_eval": {"name": "eval_loss", "value": 2.5, "step": 200}, "stalled_since": None}
    assert by_id[stalled.run_id]["status"] == "stalled" and by_id[stalled.run_id]["stalled_since"] > 0
    assert by_id[ended.run_id]["eta_s"] is None
    assert all(by_id[old.run_id][k] is None for k in ("max_steps", "progress", "steps_per_second", "eta_s",
                                                      "last_loss", "best_eval"))


def test_ls_of_a_real_run_live_then_ended(fg_home, tmp_path):
    env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "train.log", "wb")
    proc = subprocess.Popen([FG_TRAIN, str(TINY), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                             "--max-steps", "100000", "--system-interval", "0"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.monotonic() + 180
        row = None
        while time.monotonic() < deadline:  # until a heartbeat has written progress with a step rate and an eval
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            rows = json.loads(fg_bus(fg_home, "ls", "--json").stdout or "[]")
            if rows and rows[0]["steps_per_second"] and rows[0]["best_eval"]:
                row = rows[0]
                break
            time.sleep(0.2)
        assert row is not None, f"no progress in run.json after 180 s: {rows}"
        assert row["status"] == "live" and row["max_steps"] == 100000 and 0 < row["progress"] < 1
        assert row["eta_s"] > 0 and isinstance(row["last_loss"], float)
        assert row["best_eval"]["name"] == "eval_loss" and row["best_eval"]["step"] % 50 == 0
        cells = table(fg_home)[row["run_id"]]
        assert cells["STEP"].endswith("/100000") and cells["DONE"].endswith("%") and cells["ETA"] != "-"
        proc.send_signal(signal.SIGTERM)  # stops at a step boundary: the run ends "interrupted", naming it
        assert proc.wait(180) == 0 or proc.returncode in (130, 143), (tmp_path / "train.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    cells = table(fg_home)[row["run_id"]]
    assert cells["STATUS"] == "interrupted" and cells["ETA"] == "-" and cells["LOSS"] != "-", cells
    assert cells["END"].startswith("SIGTERM at step "), cells
