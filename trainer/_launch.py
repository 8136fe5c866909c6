"""`fg-train --nproc-per-node N`: the same command relaunched as N ranks under torchrun, and what is checked
before it. Nothing here imports torch: the launching process only waits for torchrun, and a mistake in its
environment is said before any rank starts."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .config import default_config_path, peek_arg

#: the command line fg-train was started with, for the resume command its ranks print under --nproc-per-node
ARGV_ENV = "FG_TRAIN_ARGV"
MAX_VOTE_EVERY = 64


def vote_every_from_env() -> int:
    """FG_CONTROL_VOTE_EVERY: "auto" (or unset) for 0, else a power of two from 1 to 64."""
    value = os.environ.get("FG_CONTROL_VOTE_EVERY", "auto").strip()
    if value in ("", "auto"):
        return 0
    if value.isdigit() and 1 <= int(value) <= MAX_VOTE_EVERY and int(value) & (int(value) - 1) == 0:
        return int(value)
    raise ValueError(f"FG_CONTROL_VOTE_EVERY={value!r}: use auto, or a power of two from 1 to {MAX_VOTE_EVERY} "
                     "(the number of steps between two agreements of the ranks' control votes; 1 is every step)")


def default_output_dir(config: Path | None) -> str:
    """fg-runs/NAME-TIME, for a run whose config names no output_dir."""
    name = "chargpt" if config is None else config.stem
    return str(Path("fg-runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))


def without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_torchrun(opts, argv: list[str]) -> int:
    """Run this same command as N processes under torchrun (standalone: one machine), with one output
    directory fixed here for all of them. Returns torchrun's exit status."""
    args = without_option(argv, "--nproc-per-node")
    if opts.output_dir is None and peek_arg(opts.config or default_config_path(), "output_dir") is None:
        args += ["--output-dir", default_output_dir(opts.config)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={opts.nproc_per_node}", "-m", "trainer", *args]
    print(f"fg-train: launching {opts.nproc_per_node} ranks: torchrun --standalone "
          f"--nproc-per-node={opts.nproc_per_node} -m trainer {' '.join(args)}", file=sys.stderr, flush=True)
    # torchrun forwards SIGINT/SIGTERM to the ranks, which stop at a step boundary; wait for it to finish.
    # the ranks' resume command is this one, --nproc-per-node included (their own argv lacks it)
    proc = subprocess.Popen(command, env={**os.environ, ARGV_ENV: shlex.join(argv)})
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the ranks got the signal too (same process group); keep waiting for their exit
