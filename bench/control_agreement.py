"""What agreeing on control flags costs the training thread per step under torchrun, old path against new,
between N local processes on a gloo group of the host.

    python bench/control_agreement.py [--ranks 2] [--calls 300] [--steps-ms 0,2,20] [--step-kind busy|sleep]
                                      [--vote-every auto|1|2|4|...|64]

old: `agree_on_control`, a synchronous all-reduce of the six flags after every step (the path before
     issue 16; still the one at an epoch's end and after an evaluation).
new: `agree_on_step`, the per-step path: the step schedule's flags act at once; the votes go in an
     all-reduce issued every K steps and waited for K steps later (K: FG_CONTROL_VOTE_EVERY, auto by
     default: about 100 ms of steps; the K agreed is printed). `--vote-every 1` is the path that agrees
     at every step.
Between two calls each rank "trains" for the step time given, 0 ms included (the worst case for the new
path: its all-reduce has no step to hide in): busy, computing on the host (default), or asleep, as a host
waiting for its GPU (on these VMs the first instructions after a sleep run many times slower, whatever
they are: a few getattr then cost 100 us, which the sleep figures include). Each
figure is the time the training thread spends in the call (median and mean over the calls on rank 0, in
blocks old, new, old, new, ...), and the new path's share of the step. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_BLOCK = 50  # calls per side in a row


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _worker(rank: int, world: int, port: int, calls: int, steps_ms: list[float], kind: str, out: str,
            every: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), FG_CONTROL_VOTE_EVERY=every)
    from trainer import TrainingArguments, distributed
    from trainer.state import TrainerControl, TrainerState

    dist.init_process_group("gloo", rank=rank, world_size=world)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="fg-agree-"), use_cpu=True, logging_steps=10,
                             save_strategy="no", report_to="none")
    state, control = TrainerState(max_steps=1 << 40, logging_steps=10), TrainerControl()
    sides = {"old": lambda: distributed.agree_on_control(control),
             "new": lambda: distributed.agree_on_step(control, args, state)}
    for call in sides.values():  # warm-up: connections, first allocations
        for _ in range(20):
            call()
    step = time.sleep if kind == "sleep" else _spin
    figures = []
    for step_ms in steps_ms:
        waits = {side: [] for side in sides}
        for _ in range(0, calls, _BLOCK):
            for side, call in sides.items():
                for _ in range(_BLOCK):
                    if step_ms:
                        step(step_ms / 1e3)
                    state.global_step += 1
                    t0 = time.perf_counter()
                    call()
                    waits[side].append(time.perf_counter() - t0)
        row = {"step_ms": step_ms, "every": distributed._every}
        for side, values in waits.items():
            row[f"{side}_us_median"] = statistics.median(values) * 1e6
            row[f"{side}_us_mean"] = statistics.fmean(values) * 1e6
        if step_ms:
            row["new_share_of_step"] = row["new_us_mean"] / (step_ms * 1e3)
            row["old_share_of_step"] = row["old_us_mean"] / (step_ms * 1e3)
        figures.append(row)
    distributed.agree_on_control(control)  # the last votes, waited for
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": world, "calls": calls, "step_kind": kind, "vote_every": every,
                                         "steps": figures}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--calls", type=int, default=300, help="calls per side and step time (a multiple of 50)")
    p.add_argument("--steps-ms", default="0,2,20", help="simulated step times, ms, comma-separated")
    p.add_argument("--step-kind", choices=("busy", "sleep"), default="busy",
                   help="the simulated step: host compute (default) or a sleep")
    p.add_argument("--vote-every", default="auto", choices=["auto"] + [str(1 << k) for k in range(7)],
                   help="FG_CONTROL_VOTE_EVERY for the new path: auto (default) or a power of two up to 64")
    opts = p.parse_args(argv)
    if opts.calls < _BLOCK or opts.calls % _BLOCK:
        p.error(f"--calls: a multiple of {_BLOCK}")
    steps_ms = [float(x) for x in opts.steps_ms.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fg-agree-{os.getpid()}.json"
    mp.spawn(_worker, args=(opts.ranks, port, opts.calls, steps_ms, opts.step_kind, str(out), opts.vote_every),
             nprocs=opts.ranks)
    figures = json.loads(out.read_text())
    out.unlink()
    print(f"control agreement between {figures['ranks']} gloo ranks, time the training thread spends per step "
          f"(rank 0, {figures['calls']} calls per side, {figures['step_kind']} steps, "
          f"FG_CONTROL_VOTE_EVERY={figures['vote_every']})")
    print(f"{'step':>8} {'old median':>11} {'old mean':>10} {'new median':>11} {'new mean':>10} "
          f"{'old % step':>10} {'new % step':>10} {'K':>3}")
    for row in figures["steps"]:
        shares = (f"{100 * row['old_share_of_step']:9.2f}% {100 * row['new_share_of_step']:9.3f}%"
                  if row["step_ms"] else f"{'-':>10} {'-':>10}")
        print(f"{row['step_ms']:6g}ms {row['old_us_median']:9.0f}us {row['old_us_mean']:8.0f}us "
              f"{row['new_us_median']:9.0f}us {row['new_us_mean']:8.0f}us {shares} {row['every']:3d}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
