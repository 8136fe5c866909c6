"""The side benchmarks run and print their figures (smoke tests: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_control_agreement_prints_its_cost():
    figures = run("control_agreement.py", "--calls", "50", "--steps-ms", "0,2", timeout=120)
    assert figures["ranks"] == 2 and figures["calls"] == 50 and [r["step_ms"] for r in figures["steps"]] == [0, 2]
    assert all(r[f"{side}_us_median"] > 0 for r in figures["steps"] for side in ("old", "new"))
    assert figures["steps"][1]["new_share_of_step"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sink_priority_prints_both_ratios():
    figures = run("sink_priority.py", "--steps", "8", "--rounds", "1", timeout=280)
    assert figures["step_ratio_nice0"] > 0 and figures["step_ratio_nice10"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hardening_prints_its_bounds():
    figures = run("hardening.py", "--quick", timeout=280)
    assert figures["flood_refused"] > 0 and figures["flood_fds_after"] - figures["flood_fds_before"] < 10
    assert figures["huge_line_seqs_read"] == [0, 2] and figures["huge_line_malformed"] == {"too-large": 1}
    assert figures["checksum_ms"] > 0 and figures["lock_us"] > 0 and figures["incomplete"] is None
