"""What agreeing on control flags costs each step under torchrun: `trainer.distributed.agree_on_control`
(one all-reduce of five ints on a gloo group of the host) between N local processes.

    python bench/control_agreement.py [--ranks 2] [--calls 2000]

Prints the mean time per call on rank 0 and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(rank: int, world: int, port: int, calls: int, out: str) -> None:
    from trainer import distributed
    from trainer.state import TrainerControl

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    control = TrainerControl()
    for _ in range(100):
        distributed.agree_on_control(control)
    t0 = time.perf_counter()
    for _ in range(calls):
        distributed.agree_on_control(control)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": world, "calls": calls,
                                         "agree_us": (time.perf_counter() - t0) / calls * 1e6}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    opts = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fg-agree-{os.getpid()}.json"
    mp.spawn(_worker, args=(opts.ranks, port, opts.calls, str(out)), nprocs=opts.ranks)
    figures = json.loads(out.read_text())
    out.unlink()
    print(f"agree_on_control between {figures['ranks']} gloo ranks: {figures['agree_us']:.0f} us per step")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
