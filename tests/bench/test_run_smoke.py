"""`bench/run.py --smoke` runs every part and prints every figure (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"
KEYS = ("publish_us_median", "publish_us_p99", "floor_us_median", "step_ratio_sinks", "step_ratio_inline",
        "step_ratio_monitoring", "loop_ratio_raw", "tb_sink_records_per_s", "summarywriter_records_per_s",
        "replay_records_per_s", "parse_floor_records_per_s", "json_sink_raw_records_per_s",
        "journal_bytes_per_step", "journal_plain_bytes_per_step", "journal_sealed_bytes_per_step",
        "replay_compressed_records_per_s", "journal_bytes_per_record", "control_share_new", "control_share_old", "control_every",
        "bus_rss_mb")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_smoke_benchmark_prints_every_key(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=870)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert isinstance(figures[key], (int, float)), key
    for key in KEYS[:-1]:
        assert figures[key] > 0, key
    assert json.loads((tmp_path / "f.json").read_text()) == figures
    assert "step ratio, 4 sinks attached" in proc.stdout
