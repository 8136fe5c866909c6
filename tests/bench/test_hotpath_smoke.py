"""The hot-path benchmark runs and prints every figure (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hotpath.py"


def test_hotpath_benchmark_prints_its_figures(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--events", "2000", "--json", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("publish_us_median", "publish_us_p99", "floor_us_median", "floor_us_p99", "journal_bytes_per_record"):
        assert figures[key] > 0, key
    assert figures["journal_records"] == 2000 + 2  # every event, plus on_init_end and the end record
    assert json.loads((tmp_path / "f.json").read_text()) == figures
    assert "publish (BusCallback" in proc.stdout and "floor" in proc.stdout
