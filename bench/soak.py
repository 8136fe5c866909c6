"""Soak: 8 simulated ranks publishing as fast as they can, one fast and one slow sink following all of them.

    python bench/soak.py [--records 1000000] [--ranks 8] [--quick] [--json FILE]

Each rank is its own process with its own Publisher (one run id, world size 8), publishing `on_step_end`
records with three metrics in a tight loop, far faster than any training step. The fast sink is
`fg-sink json --ranks all`; the slow one is the same sink sleeping 2 ms every 200 records. Both are started
as the ranks start and must end with every record of every rank (each rank's seqs 0..n, its end record
last). Printed: publishing rate, each rank's peak resident memory (VmHWM) and backpressure waits, how long
each sink took to catch up after the last rank ended, and records lost (must be 0). `--quick`: 80k records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit  # noqa: E402
from fg_bus import registry  # noqa: E402
from sinks.json_sink import JsonSink  # noqa: E402

BIN = Path(sys.executable).parent

_RANK = """
import json, sys, time
from pathlib import Path
from fg_bus import Publisher
bus_dir, run_id, rank, world, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pub = Publisher(bus_dir, run_id, rank=rank, world_size=world).start()
t0 = time.perf_counter()
for i in range(n):
    pub.publish("on_step_end", i, i / 1000, metrics={"loss": 2.0 - i / n, "grad_norm": 0.5, "learning_rate": 3e-4})
published = time.perf_counter() - t0
pub.close(timeout=600)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rank": rank, "publish_s": published, "total_s": time.perf_counter() - t0,
                  "peak_rss_mb": hwm / 1024, "stalls": pub.stalls, "stalled_s": pub.stalled_s}), flush=True)
"""


class SlowJsonSink(JsonSink):
    """A json sink that falls behind: 2 ms of sleep every 200 records (at most 100k records/s)."""

    kind = "slow-json"

    def __init__(self, out: str, ranks: str = "all"):
        super().__init__(out=out, ranks=ranks)
        self._n = 0

    def handle(self, record: dict) -> None:
        super().handle(record)
        self._n += 1
        if self._n % 200 == 0:
            time.sleep(0.002)


def _complete(path: Path, ranks: int, per_rank: int) -> dict:
    """Records missing from a sink's output (each rank must have seqs 0..per_rank, the last its end)."""
    seqs: dict[int, list[int]] = {r: [] for r in range(ranks)}
    ends = 0
    with open(path, "rb") as f:
        for line in f:
            record = json.loads(line)
            seqs[record["rank"]].append(record["seq"])
            ends += record["event"] == "end"
    lost = sum(len(set(range(per_rank + 1)) - set(s)) for s in seqs.values())
    duplicates = sum(len(s) - len(set(s)) for s in seqs.values())
    in_order = all(s == sorted(s) for s in seqs.values())
    return {"records": sum(map(len, seqs.values())), "lost": lost, "duplicates": duplicates,
            "in_order": in_order, "ends": ends}


def run(total: int, ranks: int) -> dict:
    per_rank = total // ranks
    work = Path(tempfile.mkdtemp(prefix="fg-soak-"))
    env = {**os.environ, "FG_HOME": str(work / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run_id = registry.new_run_id("soak")
    bus_dir = work / "out" / "fg-bus" / run_id
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(bus_dir), run_id, str(r), str(ranks), str(per_rank)],
                              stdout=subprocess.PIPE, text=True, env=env) for r in range(ranks)]
    while not (bus_dir / registry.RUN_FILE).exists():
        time.sleep(0.01)
    sinks = {
        "fast": subprocess.Popen([str(BIN / "fg-sink"), "json", "--ranks", "all", "--run", str(bus_dir),
                                  "--out", str(work / "fast.jsonl"), "--dead-after", "30"],
                                 stderr=subprocess.PIPE, text=True, env=env),
        "slow": subprocess.Popen([str(BIN / "fg-sink"), "soak:SlowJsonSink", "--ranks", "all", "--run", str(bus_dir),
                                  "--option", f"out={work / 'slow.jsonl'}", "--dead-after", "30"],
                                 stderr=subprocess.PIPE, text=True, env=env),
    }
    rank_figures = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
    ranks_done = time.monotonic()
    figures: dict = {"records": per_rank * ranks, "ranks": ranks, "ranks_s": ranks_done - t0,
                     "publish_records_per_s": per_rank * ranks / max(f["publish_s"] for f in rank_figures),
                     "rank_peak_rss_mb": max(f["peak_rss_mb"] for f in rank_figures),
                     "backpressure_stalls": sum(f["stalls"] for f in rank_figures),
                     "backpressure_s": sum(f["stalled_s"] for f in rank_figures)}
    for name, sink in sinks.items():
        _, stderr = sink.communicate(timeout=1800)
        figures[f"{name}_sink_exit"] = sink.returncode
        figures[f"{name}_sink_catch_up_s"] = time.monotonic() - ranks_done
        check = _complete(work / f"{name}.jsonl", ranks, per_rank)
        figures.update({f"{name}_sink_{k}": v for k, v in check.items()})
        if sink.returncode != 0:
            print(stderr[-2000:], file=sys.stderr)
    figures["lost"] = figures["fast_sink_lost"] + figures["slow_sink_lost"]
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000, help="records in all, over every rank (default 1M)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="80k records")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    opts = p.parse_args(argv)
    figures = run(80_000 if opts.quick else opts.records, opts.ranks)
    print(f"{figures['records']:,} records from {figures['ranks']} ranks in {figures['ranks_s']:.1f} s "
          f"({figures['publish_records_per_s']:,.0f} records/s published); peak rank RSS "
          f"{figures['rank_peak_rss_mb']:.0f} MB; backpressure waits {figures['backpressure_stalls']} "
          f"({figures['backpressure_s']:.2f} s)")
    for name in ("fast", "slow"):
        print(f"{name} sink: exit {figures[f'{name}_sink_exit']}, caught up {figures[f'{name}_sink_catch_up_s']:.1f} s "
              f"after the last rank ended; {figures[f'{name}_sink_records']:,} records, "
              f"{figures[f'{name}_sink_lost']} lost, {figures[f'{name}_sink_duplicates']} duplicates, "
              f"{figures[f'{name}_sink_ends']} end records")
    return emit(figures, opts.json)


if __name__ == "__main__":
    sys.exit(main())
