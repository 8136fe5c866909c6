"""A straggler under real torchrun (2 CPU ranks, gloo, DDP): rank 1's data collator sleeps 30 ms per batch.
DDP's all-reduces make both ranks' steps equally long, so only the per-rank `data_time` of the on_step_end
records can name it: RunView, fed both ranks' journals, names rank 1 and never rank 0."""

from __future__ import annotations

import heapq
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fg_bus import read_journal, registry
from fg_bus.monitor import RunView

BIN = Path(sys.executable).parent
STRAGGLERS = Path(__file__).parent / "stragglers.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # torchrun: minutes on a loaded machine


def test_a_rank_slow_to_load_its_data_is_named_the_straggler_under_ddp(fg_home, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "fg-train"), str(STRAGGLERS), "--nproc-per-node", "2", "--device", "cpu", "--output-dir",
         str(out), "--max-steps", "60", "--system-interval", "0", "--var", "slow_rank=1", "--var", "sleep=0.03"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((out / "fg-bus").glob("*/run.json"))
    assert len(runs) == 1, runs
    info = registry.load_run(runs[0].parent)
    journals = {rank: list(read_journal(info.journal_path(rank))) for rank in (0, 1)}
    for rank, journal in journals.items():
        ends = [r for r in journal if r["event"] == "on_step_end"]
        assert [r["global_step"] for r in ends] == list(range(1, 61)), rank
        assert all(isinstance(r["metrics"].get("data_time"), float) for r in ends), rank
        assert rank == 0 or all(r["metrics"]["data_time"] >= 0.03 for r in ends)  # the sleep: a lower bound
        logs = [r["metrics"] for r in journal if r["event"] == "on_log" and "loss" in r["metrics"]]
        assert logs and all("data_time" in m for m in logs), rank

    # As a live follower sees them (both streams, in time order), and as a late join replays them (rank 0's
    # journal, then rank 1's): rank 1 is the straggler, and rank 0, which waits for it, never is.
    merged = list(heapq.merge(journals[0], journals[1], key=lambda r: r["timestamp"]))  # each in seq order
    for records in (merged, journals[0] + journals[1]):
        view = RunView()
        named = []
        for record in records:
            view.feed(record)
            named += view.new_stragglers
        assert view.stragglers == [1], (view.data_time_medians(), view.step_time_medians())
        assert named == [1], named
        texts = [t for _, kind, t in view.events if kind == "straggler"]
        assert len(texts) == 1 and texts[0].startswith("rank 1 is a straggler: it waits"), texts
