"""The journal's size per training step and replay from compressed segments, and how both grow.

    python bench/journal_size.py [--records 100000,1000000] [--ranks 1,8]     the growth table

`bench/run.py` calls `figures()`:
  journal_bytes_per_step         the whole journal (sealed segments + the live one) of a run of the default
                                 model, per training step: the records of every step are a real run's (the
                                 bench's char GPT, logging every step), repeated with fresh values (seq, step,
                                 timestamps, metrics) for `steps` steps, written by the real JournalWriter at
                                 the default segment size; journal_plain_bytes_per_step: the same records plain
                                 (before segments); journal_sealed_bytes_per_step: the compressed segments'
                                 rate, what each further step costs
  replay_compressed_records_per_s   a Subscriber replaying a live run of N such records (1M; 100k with
                                 --quick) with all but the last segment sealed and compressed;
                                 replay_compressed_over_plain: over the same replay with one plain segment,
                                 interleaved (plain, compressed, ...)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fg_bus import Subscriber, records, registry  # noqa: E402
from fg_bus.journal import JournalWriter, journal_files  # noqa: E402

#: Steps per epoch of the synthetic run (the char GPT's corpus has about this many batches): epochs are
#: long decimals, as in a real run.
EPOCH_STEPS = 205.0
#: A segment size no bench journal reaches: the plain side of the A/B replay.
NEVER_SEALED = 1 << 40


def step_template(journal: Path) -> list[tuple[str, dict]]:
    """(event, metrics) of one training step's records in a real run's journal: from its last complete
    on_step_begin to the next one (the step's begin, optimizer, end and log records, as the run wrote them)."""
    recs = [json.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]
    begins = [i for i, r in enumerate(recs) if r["event"] == "on_step_begin"]
    if len(begins) < 2:
        raise RuntimeError(f"{journal} has fewer than two steps")
    return [(r["event"], r.get("metrics") or {}) for r in recs[begins[-2]:begins[-1]]]


def _fresh(metrics: dict, rng: random.Random) -> dict:
    """The step's metrics with new values of the same kind and size (a real run's change from step to step:
    repeating one step's floats would compress better than any run does)."""
    return {k: v * (0.5 + rng.random()) if type(v) is float else v for k, v in metrics.items()}


def synthetic_journal(path: Path, template: list[tuple[str, dict]], steps: int,
                      segment_bytes: int | None = None) -> dict:
    """`steps` steps of `template` through a JournalWriter (the default segment size unless given): the
    bytes of the whole journal, of its compressed segments, and of the same records plain."""
    rng = random.Random(0)
    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    run = registry.new_run_id("bench-journal")
    writer = JournalWriter(path, segment_bytes=segment_bytes)
    plain = 0
    try:
        for step in range(steps):
            for event, metrics in template:
                seq = writer.next_seq
                data = records.encode({"v": records.SCHEMA_VERSION, "run": run, "rank": 0, "seq": seq,
                                       "timestamp": t0 + datetime.timedelta(seconds=step * 0.02 + rng.random() * 0.01),
                                       "event": event, "global_step": step, "epoch": step / EPOCH_STEPS,
                                       "metrics": _fresh(metrics, rng)})
                plain += len(data) + 1
                writer.append(data)
    finally:
        writer.close()
    files = journal_files(path)
    sealed = [p for p in files if p.name.endswith(".zst")]
    sealed_plain = plain - path.stat().st_size
    return {"bytes": sum(p.stat().st_size for p in files), "plain_bytes": plain,
            "sealed_bytes": sum(p.stat().st_size for p in sealed), "sealed_plain_bytes": sealed_plain,
            "segments": len(sealed) + 1}


def bytes_per_step(real_journal: Path, steps: int) -> dict:
    """journal_bytes_per_step and its plain and sealed rates, for `steps` steps of the real journal's step."""
    template = step_template(real_journal)
    work = Path(tempfile.mkdtemp(prefix="fg-bench-journal-"))
    size = synthetic_journal(work / "journal.rank0.jsonl", template, steps)
    sealed_steps = size["sealed_plain_bytes"] / (size["plain_bytes"] / steps)
    return {"journal_steps": steps, "journal_records_per_step": len(template),
            "journal_bytes_per_step": size["bytes"] / steps,
            "journal_plain_bytes_per_step": size["plain_bytes"] / steps,
            "journal_sealed_bytes_per_step": size["sealed_bytes"] / sealed_steps if sealed_steps else None,
            "journal_segments": size["segments"]}


_PUBLISHER = """
import json, random, sys, time
from fg_bus import Publisher, registry
from fg_bus._segments import sealed_segments
n, work, template = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
pub = Publisher(work, registry.new_run_id("bench-replay-z")).start()
rng = random.Random(0)
for i in range(n):
    event, metrics = template[i % len(template)]
    pub.publish(event, i // len(template), i / len(template) / 205.0,
                metrics={k: v * (0.5 + rng.random()) if type(v) is float else v for k, v in metrics.items()})
path = registry.resolve(pub.run_id).journal_path()
while pub.info.data["last_seq"] < n - 1 or any(s.plain for s in sealed_segments(path)):
    time.sleep(0.05)  # journaled (the heartbeat says so) and every sealed segment compressed
print(pub.run_id, flush=True)
sys.stdin.read()  # stay live until the benchmark is done
pub.close()
"""


def _start(n: int, template, segment_bytes: int) -> tuple[subprocess.Popen, str]:
    work = tempfile.mkdtemp(prefix="fg-bench-replay-z-")
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(n), work, json.dumps(template)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "FG_JOURNAL_SEGMENT_BYTES": str(segment_bytes)})
    run_id = proc.stdout.readline().strip()
    if not run_id:
        raise RuntimeError("the replay benchmark's publisher did not start")
    return proc, run_id


def replay(n: int, template, ranks: int = 1, segment_bytes: int | None = None) -> dict:
    """`ranks` live publishers of n records each (all but the last segment sealed and compressed, unless
    `segment_bytes` says otherwise); one Subscriber per rank from seq 0, polled in turn as a sink of a
    multi-rank run does: seconds to replay all of them, and the journals' bytes."""
    from fg_bus import _segments

    size = _segments.segment_bytes() if segment_bytes is None else segment_bytes
    started = [_start(n, template, size) for _ in range(ranks)]
    try:
        t0 = time.perf_counter()
        subs = [Subscriber(run_id, from_seq=0, dead_after=120) for _, run_id in started]
        got = [0] * ranks
        while min(got) < n:
            for i, sub in enumerate(subs):
                if got[i] < n:
                    got[i] += len(sub.poll(0.05))
        elapsed = time.perf_counter() - t0
        for sub in subs:
            sub.close()
        disk = sum(p.stat().st_size for _, run_id in started
                   for p in journal_files(registry.resolve(run_id).journal_path()))
    finally:
        for proc, _ in started:
            proc.stdin.close()
            proc.wait(120)
    return {"seconds": elapsed, "records_per_s": n * ranks / elapsed, "journal_bytes": disk}


def figures(real_journal: Path, steps: int, replay_records: int, rounds: int) -> dict:
    """What bench/run.py prints: bytes per step, and replay compressed against plain, interleaved."""
    out = bytes_per_step(real_journal, steps)
    template = step_template(real_journal)
    plain, compressed = [], []
    for _ in range(rounds):
        plain.append(replay(replay_records, template, segment_bytes=NEVER_SEALED)["seconds"])
        compressed.append(replay(replay_records, template)["seconds"])
    out.update({"replay_compressed_records": replay_records,
                "replay_compressed_records_per_s": replay_records / statistics.median(compressed),
                "replay_compressed_over_plain": statistics.median(c / p for c, p in zip(compressed, plain))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--journal", type=Path, required=True, help="a real run's journal (its steps are the template)")
    p.add_argument("--records", default="100000,1000000")
    p.add_argument("--ranks", default="1,8")
    opts = p.parse_args(argv)
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-bench-home-"))
    template = step_template(opts.journal)
    rows = []
    for n in (int(x) for x in opts.records.split(",")):
        for ranks in (int(x) for x in opts.ranks.split(",")):
            got = replay(n, template, ranks)
            rows.append({"records_per_rank": n, "ranks": ranks, **got})
            print(f"{n:>9,} records x {ranks} rank(s): journal {got['journal_bytes'] / 2**20:8.1f} MiB, "
                  f"replay {got['seconds']:6.1f} s ({got['records_per_s']:,.0f} records/s)", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
