"""Monitoring from the bus thread, with real processes: `fg-train --system-interval 0.2 --stall-after 1` on a
config whose step 15 hangs until the test releases it. The run is `stalled` (a warning record, `fg-bus ls`)
while it hangs, healthy again after, and its system records reach the journal, the json sink and the tb
sink (read back with TensorBoard's own reader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import read_journal, registry

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).with_name("monitoring.yaml")
HOLD_STEP = 15
pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"fg-train exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def journal(bus_dir: Path) -> list[dict]:
    path = bus_dir / "journal.rank0.jsonl"
    return list(read_journal(path)) if path.exists() else []


def warnings(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["event"] == "warning" and r.get("kind") == kind]


def ls_status(env: dict, run_id: str) -> str:
    proc = subprocess.run([str(BIN / "fg-bus"), "ls", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return next(r["status"] for r in json.loads(proc.stdout) if r["run_id"] == run_id)


def test_a_hung_step_makes_the_run_stalled_then_healthy_and_system_records_reach_the_sinks(fg_home, tmp_path):
    out, release, log = tmp_path / "out", tmp_path / "release", tmp_path / "train.log"
    env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [str(BIN / "fg-train"), str(CONFIG), "--device", "cpu", "--output-dir", str(out), "--sinks", "tb,json",
             "--system-interval", "0.2", "--stall-after", "1", "--var", f"hold_step={HOLD_STEP}",
             "--var", f"release={release}"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        bus_dir = wait_for(lambda: next((p.parent for p in (out / "fg-bus").glob("*/run.json")), None),
                           "run.json", proc, log)
        run_id = bus_dir.name
        # The step hangs: after a second without an event the bus says so, once, and ls shows it.
        stalled = wait_for(lambda: [w for w in warnings(journal(bus_dir), "stalled") if w["global_step"] == HOLD_STEP],
                           "stalled warning", proc, log)[0]
        assert stalled["stalled_for"] >= 1 and f"step {HOLD_STEP}" in stalled["message"]
        assert ls_status(env, run_id) == "stalled"
        info = registry.load_run(bus_dir)
        assert info.data["stalled_since"] is not None and info.data["progress"]["global_step"] == HOLD_STEP
        assert info.data["progress"]["max_steps"] == 40
        release.touch()
        assert proc.wait(240) == 0, log.read_text()[-3000:]
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    records = journal(bus_dir)
    cleared = [w for w in warnings(records, "stall-cleared") if w["seq"] > stalled["seq"]]
    assert cleared and cleared[0]["global_step"] == HOLD_STEP and cleared[0]["stalled_for"] >= stalled["stalled_for"]
    kinds = [w["kind"] for w in records if w["event"] == "warning" and w.get("kind", "").startswith("stall")]
    assert kinds == ["stalled", "stall-cleared"] * (len(kinds) // 2)  # each stall cleared, before the next
    assert ls_status(env, run_id) == "completed"
    final = registry.load_run(bus_dir).data
    assert final["stalled_since"] is None and final["progress"]["global_step"] == 40
    assert final["progress"]["best_eval"]["name"] == "eval_loss" and final["progress"]["last_loss"] > 0

    system = [r for r in records if r["event"] == "system"]
    assert len(system) >= 3  # the run lasts more than a second: five or more samples
    for r in system:
        m = r["metrics"]
        assert 0 <= m["host_cpu_percent"] <= 100 and m["cpu_percent"] >= 0 and m["disk_free_gb"] > 0
        assert 10 < m["rss_mb"] < m["host_memory_total_mb"] and 0 < m["host_memory_percent"] <= 100
        assert not any(k.startswith("gpu") for k in m) and "gpus" not in r  # a CPU run: host metrics only
    assert [r["seq"] for r in records] == list(range(len(records)))

    # The json sink keeps them; the tb sink writes them under system/ at their step and time.
    logged = [json.loads(line) for line in (out / "logs" / f"{run_id}.jsonl").read_text().splitlines()]
    assert [r for r in logged if r["event"] == "system"] == [json.loads(json.dumps(r)) for r in system]
    ea = EventAccumulator(str(out / "tb" / run_id), size_guidance={"scalars": 0})
    ea.Reload()
    assert {f"system/{k}" for k in system[0]["metrics"]} <= set(ea.Tags()["scalars"])
    rss = ea.Scalars("system/rss_mb")
    assert [(e.step, e.value) for e in rss] == [(r["global_step"], pytest.approx(r["metrics"]["rss_mb"]))
                                                for r in system]
    assert rss[0].wall_time == pytest.approx(datetime.fromisoformat(system[0]["timestamp"]).timestamp())
