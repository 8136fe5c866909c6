"""Step time with the four sinks attached at normal priority against lowered priority (fg-sink --nice).

    python bench/sink_priority.py [--steps 200] [--rounds 3]

Three sides per round, the order rotated each round: publishing off; tb, json, textgen (every 50 steps)
and tail attached with FG_SINK_NICE=0; the same with FG_SINK_NICE=10 (the default). Prints each side's
step time per round, the median ratios to publishing off, and a JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from _report import emit  # noqa: E402
from trainer.data import CharCorpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args(argv)
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-bench-home-"))
    corpus = CharCorpus(block_size=64)
    work = Path(tempfile.mkdtemp(prefix="fg-bench-nice-"))

    def off(r: int) -> float:
        clock = run.StepClock()
        run._trainer(corpus, work / f"off{r}", opts.steps, "cpu", [clock]).train()
        return clock.per_step

    def sinks_at(nice: int):
        def side(r: int) -> float:
            os.environ["FG_SINK_NICE"] = str(nice)  # the sink processes started below inherit it
            try:
                return run.sinks_attached(corpus, work / f"nice{nice}-{r}", opts.steps, "cpu", f"nice{nice}-{r}")
            finally:
                del os.environ["FG_SINK_NICE"]
        return side

    times = run._interleaved({"off": off, "nice0": sinks_at(0), "nice10": sinks_at(10)}, opts.rounds)
    for name, values in times.items():
        print(f"{name:7} " + "  ".join(f"{v * 1e3:7.1f} ms" for v in values))
    figures = {f"step_ratio_{name}": statistics.median([a / b for a, b in zip(times[name], times["off"])])
               for name in ("nice0", "nice10")}
    print(f"step ratio, sinks at nice 0: {figures['step_ratio_nice0']:.3f}x; at nice 10: {figures['step_ratio_nice10']:.3f}x")
    return emit(figures, None)


if __name__ == "__main__":
    sys.exit(main())
