"""The soak benchmark in small (`bench/soak.py --quick`: 8 rank processes, 80k records, a fast and a slow
sink), as a test of its promise only: zero records lost or duplicated in either sink. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.timeout(600)
def test_eight_ranks_at_full_speed_lose_nothing_in_a_fast_or_a_slow_sink(tmp_path):
    proc = subprocess.run([sys.executable, str(SOAK), "--quick", "--json", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=570)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "soak.json").read_text())
    for sink in ("fast", "slow"):
        assert figures[f"{sink}_sink_exit"] == 0, proc.stderr[-3000:]
        assert (figures[f"{sink}_sink_records"], figures[f"{sink}_sink_lost"], figures[f"{sink}_sink_duplicates"],
                figures[f"{sink}_sink_ends"], figures[f"{sink}_sink_in_order"]) == (80_008, 0, 0, 8, True)
    assert figures["lost"] == 0
