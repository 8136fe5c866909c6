"""The TensorBoard throughput benchmark runs and prints its figures (a smoke test: no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tb_throughput.py"


def test_tb_throughput_benchmark_prints_its_figures():
    proc = subprocess.run([sys.executable, str(BENCH), "--records", "400", "--rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["records"] == 400
    assert figures["tb_sink_records_per_s"] > 0 and figures["summarywriter_records_per_s"] > 0
    assert figures["ratio"] == figures["tb_sink_records_per_s"] / figures["summarywriter_records_per_s"]
