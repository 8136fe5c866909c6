"""Scalar records per second into TensorBoard event files: the `tb` sink against SummaryWriter.

    python bench/tb_throughput.py [--records 20000] [--rounds 3] [--json FILE]

Both write the same `on_log` records (loss, learning_rate, grad_norm, epoch as four scalars per record,
plus the per-step `on_step_end` loss and grad norm): the sink through `handle(record)`, SummaryWriter
through one `add_scalar` per value, HF-style, each to its own fresh directory, flushed and closed inside
the timing. The two alternate (A B A B ...) and each figure is the median over the rounds.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit  # noqa: E402
from fg_bus.registry import RunInfo  # noqa: E402
from sinks.tb_sink import TensorBoardSink, scalar_tag  # noqa: E402


def make_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        step = i // 2 + 1
        if i % 2 == 0:
            out.append({"v": 1, "run": "bench", "rank": 0, "seq": i, "timestamp": "2026-11-28T00:00:00+00:00",
                        "event": "on_step_end", "global_step": step, "epoch": step / 1000,
                        "metrics": {"loss": 2.0 + math.sin(i), "grad_norm": 1.0 + math.cos(i)}})
        else:
            out.append({"v": 1, "run": "bench", "rank": 0, "seq": i, "timestamp": "2026-11-28T00:00:00+00:00",
                        "event": "on_log", "global_step": step, "epoch": step / 1000,
                        "metrics": {"loss": 2.0 + math.sin(i), "learning_rate": 3e-4, "grad_norm": 0.9,
                                    "epoch": step / 1000}})
    return out


def run_sink(records: list[dict]) -> float:
    root = Path(tempfile.mkdtemp(prefix="fg-bench-tb-"))
    info = RunInfo(root / "out" / "fg-bus" / "bench", {"run_id": "bench"})
    t0 = time.perf_counter()
    sink = TensorBoardSink(logdir=str(root / "tb"))
    sink.open_run(info)
    for record in records:
        sink.handle(record)
    sink.end_run("completed")
    sink.close()
    return time.perf_counter() - t0


def run_summarywriter(records: list[dict]) -> float:
    from torch.utils.tensorboard import SummaryWriter

    root = Path(tempfile.mkdtemp(prefix="fg-bench-sw-"))
    t0 = time.perf_counter()
    writer = SummaryWriter(str(root))
    for record in records:
        step = record["global_step"]
        if record["event"] == "on_step_end":
            for key, value in record["metrics"].items():
                writer.add_scalar(f"train/step_{key}", value, step)
        else:
            for key, value in record["metrics"].items():
                if key != "epoch":
                    writer.add_scalar(scalar_tag(key), value, step)
    writer.flush()
    writer.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    records = make_records(opts.records)
    sink_s, writer_s = [], []
    for _ in range(opts.rounds):
        sink_s.append(run_sink(records))
        writer_s.append(run_summarywriter(records))
    figures = {
        "records": opts.records,
        "tb_sink_records_per_s": opts.records / statistics.median(sink_s),
        "summarywriter_records_per_s": opts.records / statistics.median(writer_s),
    }
    figures["ratio"] = figures["tb_sink_records_per_s"] / figures["summarywriter_records_per_s"]
    print(f"tb sink:       {figures['tb_sink_records_per_s']:12,.0f} records/s")
    print(f"SummaryWriter: {figures['summarywriter_records_per_s']:12,.0f} records/s")
    print(f"ratio: {figures['ratio']:.2f} (median of {opts.rounds} interleaved rounds, {opts.records:,} records each)")
    return emit(figures, opts.json)


if __name__ == "__main__":
    sys.exit(main())
