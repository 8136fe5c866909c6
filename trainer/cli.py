"""`fg-train`: train the built-in character GPT, or what a YAML config describes.

This module is the command line: it parses and checks the arguments, and relaunches under torchrun for
--nproc-per-node, without importing torch (`--help` and a mistake are answered at once); _command runs
the training itself."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from ._launch import launch_torchrun, vote_every_from_env
from ._trackers import TRACKER_KINDS, tracker_missing
from .config import default_config_path, parse_value, peek_seed

SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; the sampler seeds seed + epoch
EXIT_USAGE, EXIT_SINK_FAILED, EXIT_INCOMPLETE = 2, 3, 4
SINK_KINDS = ("tb", "json", "textgen", "tail", "alert", *TRACKER_KINDS)

EPILOG = """\
examples:
  fg-train                                  train the built-in char GPT on the CPU (about a minute)
  fg-train --max-steps 100 --device cpu     a shorter run
  fg-train examples/custom_callbacks.yaml --var run_name=trial-1
  fg-train --output-dir runs/a --resume     continue from the newest checkpoint in runs/a
  fg-train --nproc-per-node 2 --device cpu  two ranks with DistributedDataParallel (torchrun, gloo)
  torchrun --nproc-per-node 4 -m trainer --output-dir runs/b     the same, launched by torchrun yourself
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0 turns it off), got {text}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a seed is 0 .. 2**63-1 ({SEED_MAX})")
    return value


def _variable(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, parse_value(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a YAML value ({problem}); quote it, e.g. "
                                         f"--var '{name}=\"...\"'") from None


def _directory(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    return Path(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fg-train", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", type=Path,
                   help="a YAML config (default: the built-in char GPT, trainer/default.yaml)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps to train (overrides args)")
    p.add_argument("--output-dir", type=_directory, metavar="DIR",
                   help="where checkpoints and the final model go (default: the config's, else fg-runs/NAME-TIME)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA with bf16 when a GPU is present, else the CPU (default: auto)")
    p.add_argument("--seed", type=_seed, metavar="N", help="random seed, 0 .. 2**63-1 (overrides args)")
    p.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or with no value from the newest checkpoint in the output dir")
    p.add_argument("--var", type=_variable, action="append", default=[], metavar="NAME=VALUE",
                   help="a value for `!var NAME` in the config (repeatable; VALUE is read as YAML)")
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    p.add_argument("--allow-module", action="append", metavar="PREFIX",
                   help="configs are code (their tags import and call what they name): allow only modules "
                        "named PREFIX or PREFIX.* (repeatable; the built-in config's trainer.data and "
                        "trainer.chargpt always are); for configs you did not write")
    p.add_argument("--nproc-per-node", type=_positive_int, metavar="N",
                   help="train on N processes of this machine with DistributedDataParallel: relaunches this command "
                        "under torchrun --standalone (gloo on the CPU, nccl on GPUs); for several machines run "
                        "torchrun -m trainer yourself (see the README)")
    bus = p.add_argument_group("event bus")
    bus.add_argument("--no-bus", action="store_true", help="do not publish events (no journal, nothing to follow)")
    bus.add_argument("--sinks", type=_sink_list, default=[], metavar="LIST",
                     help="start these sinks for the run, as separate processes: tb,json,textgen,tail,alert,"
                          "mlflow,wandb,trackio (alert: fg-sink alert's default rules, on this terminal's stderr and "
                          "in OUTPUT_DIR/alerts/RUN.jsonl; the trackers are configured by their usual environment "
                          "variables and need their extra, e.g. pip install 'fg-bus[mlflow]')")
    bus.add_argument("--textgen-every", type=_positive_int, default=100, metavar="N",
                     help="with --sinks textgen: snapshot and generate every N steps (default 100)")
    bus.add_argument("--bus-tcp", metavar="HOST:PORT", type=_host_port,
                     help="publish on tcp (PORT, PORT+1, PORT+2; PORT 0 picks free ports) instead of private ipc "
                          "sockets; with `fg-bus keys` made, only authorized CURVE keys may connect")
    bus.add_argument("--system-interval", type=_seconds, default=10.0, metavar="SECONDS",
                     help="publish CPU, memory, disk and GPU (NVML) metrics every SECONDS, sampled off the "
                          "training thread (default 10; 0: off)")
    bus.add_argument("--stall-after", type=_seconds, default=120.0, metavar="SECONDS",
                     help="while training, SECONDS without progress (no step, no eval batch; and at least 10 "
                          "median step times) make the run `stalled`: a warning record, shown by fg-bus ls "
                          "(default 120; 0: never)")
    bus.add_argument("--insecure", action="store_true",
                     help="allow tcp on a non-loopback address without CURVE keys; anyone who can reach the port "
                          "can read the run")
    return p


def _sink_list(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    unknown = [k for k in kinds if k not in SINK_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sink(s) {', '.join(unknown)}; choose from {', '.join(SINK_KINDS)}")
    for kind in kinds:  # said now, not by a sink process that exits at once
        missing = tracker_missing(kind) if kind in TRACKER_KINDS else None
        if missing:
            raise argparse.ArgumentTypeError(missing)
    return kinds


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65533:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:5555), got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        vote_every_from_env()  # before torchrun starts ranks that would each refuse it
    except ValueError as e:
        print(f"fg-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if opts.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(opts, argv)
    config_path = opts.config or default_config_path()
    # Seed before the config builds the model, so its initial weights are the same on every run.
    seed = opts.seed if opts.seed is not None else peek_seed(config_path)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        print(f"fg-train: error: {config_path}: args: seed {seed} is out of range: a seed is 0 .. 2**63-1",
              file=sys.stderr)
        return EXIT_USAGE
    from ._command import run  # torch, the model and the bus: only now that the command line is known good

    return run(opts, argv, config_path, seed)


if __name__ == "__main__":
    sys.exit(main())
