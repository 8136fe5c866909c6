"""`fg-train`: train the built-in character GPT, or what a YAML config describes."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from fg_bus import gc as bus_gc
from fg_bus.security import InsecureBus

from . import _checkpoint as ckpt
from . import _output_dir as output_dirs
from . import distributed
from ._run_lock import OutputDirInUse, lock_output_dir
from ._utils import set_seed
from .bus_callback import BusCallback
from .callbacks import TrainerCallback
from .config import ConfigError, load_config, parse_value, peek_arg, peek_seed
from .default_callbacks import PrinterCallback, ProgressCallback
from .run_config import build_trainer, default_config_path
from .sink_callbacks import (TRACKER_KINDS, AlertLogger, JsonLogger, SinkProcess, TailLogger, TBLogger, TextgenCallback,
                             TrackerLogger, sink_problems, tracker_missing)

logger = logging.getLogger("trainer")

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


def _device_overrides(device: str, config_args: Any) -> dict[str, Any]:
    import torch

    if device == "cpu":
        return {"use_cpu": True}
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fg-train: error: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    explicit_bf16 = isinstance(config_args, dict) and "bf16" in config_args
    if torch.cuda.is_available() and not explicit_bf16:
        return {"use_cpu": False, "bf16": torch.cuda.is_bf16_supported()}
    return {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        distributed.vote_every_from_env()  # before torchrun starts ranks that would each refuse it
    except ValueError as e:
        print(f"fg-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if opts.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(opts, argv)
    rank = int(os.environ.get("RANK", 0))
    config_path = opts.config or default_config_path()
    # Seed before the config builds the model, so its initial weights are the same on every run.
    seed = opts.seed if opts.seed is not None else peek_seed(config_path)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        print(f"fg-train: error: {config_path}: args: seed {seed} is out of range: a seed is 0 .. 2**63-1",
              file=sys.stderr)
        return EXIT_USAGE
    set_seed(seed if seed is not None else 42)
    try:
        config = load_config(config_path, dict(opts.var), allow_modules=opts.allow_module)
    except ConfigError as e:
        print(f"fg-train: error: {e}", file=sys.stderr)
        return 2
    raw_args = config.values.get("args", {})
    overrides: dict[str, Any] = _device_overrides(opts.device, raw_args)
    if opts.max_steps is not None:
        overrides["max_steps"] = opts.max_steps
    if opts.seed is not None:
        overrides["seed"] = opts.seed
    if opts.no_progress:
        overrides["disable_tqdm"] = True
    if opts.output_dir is not None:
        overrides["output_dir"] = str(opts.output_dir)
    elif not (isinstance(raw_args, dict) and raw_args.get("output_dir")):
        if world_size > 1:
            print("fg-train: error: under torchrun every rank must write to one output directory: pass "
                  "--output-dir (fg-train --nproc-per-node does this for you)", file=sys.stderr)
            return 2
        overrides["output_dir"] = _default_output_dir(opts)
    output_dir = overrides.get("output_dir") or _config_output_dir(raw_args)
    # --resume alone: the checkpoint saved last; refused when it has nothing left to train (_output_dir)
    plan = output_dirs.plan_resume(output_dir, opts.resume, argv, _known_max_steps(overrides, raw_args))
    if plan.error:
        print(f"fg-train: error: {plan.error}", file=sys.stderr)
        return 2
    if rank == 0:  # the ranks of one torchrun job share the directory; two jobs or two runs may not
        try:
            lock_output_dir(output_dir)
        except (ValueError, OutputDirInUse) as e:
            print(f"fg-train: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    if opts.no_bus and opts.sinks:
        print("fg-train: error: --sinks needs the event bus; drop --no-bus", file=sys.stderr)
        return 2
    if not opts.no_bus and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one rank per host: sockets are per host
        cleaned = bus_gc.collect_quietly()  # what dead runs left behind (`fg-bus gc`)
        if cleaned:
            print(f"fg-train: {cleaned}", file=sys.stderr, flush=True)
    bus = None if opts.no_bus else BusCallback(tcp=opts.bus_tcp, insecure=opts.insecure,
                                               system_interval=opts.system_interval, stall_after=opts.stall_after)
    try:
        trainer = build_trainer(config, overrides, event_bus=bus)
    except InsecureBus as e:  # tcp on a non-loopback address without keys, and no --insecure
        print(f"fg-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        print(f"fg-train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the bus could not start (a port in use, ...)
        print(f"fg-train: error: {e}", file=sys.stderr)
        return 1
    if bus is not None and rank == 0:
        print(f"fg-train: run {bus.run_id} publishing; follow it with `fg-bus ls`, control it with "
              f"`fg-bus ctl {bus.run_id} stop`", file=sys.stderr, flush=True)
    refused = _check_output_dir(trainer, plan, argv, rank)
    if refused:
        return refused
    for kind in opts.sinks:
        trainer.add_callback({"tb": TBLogger, "json": JsonLogger,
                              "tail": _TerminalTail if sys.stdout.isatty() else TailLogger,
                              "textgen": lambda: TextgenCallback(generation_steps=opts.textgen_every),
                              "alert": AlertLogger,
                              **{k: lambda k=k: TrackerLogger(k) for k in TRACKER_KINDS}}[kind]())
    if "tail" in opts.sinks:
        # The tail sink prints the run in this terminal; a progress bar beside it would garble both.
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    signals_received = _stop_on_signals(trainer, bus)

    resume = plan.checkpoint.path if plan.checkpoint is not None else None
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        if bus is not None:
            bus.close()  # the stream ends here: the sinks finish and exit (train() leaves it open for evaluate())
    except KeyboardInterrupt:
        _stop_sinks(trainer)  # a Ctrl-C that cut short the wait for them: none is left running behind us
        if bus is not None and bus.publisher is not None and bus.publisher.closed and not trainer.is_in_train:
            print(f"\nfg-train: the run had ended (step {trainer.state.global_step}); stopped waiting for its sinks",
                  file=sys.stderr)
        _print_ending(trainer, bus, argv, signals_received)
        return EXIT_SINK_FAILED if _report_sinks(trainer) else 130
    except ValueError as e:
        print(f"fg-train: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # the model, the data or a callback raised: its traceback, then how the run ended
        traceback.print_exc()
        if rank == 0:
            _print_ending(trainer, bus, argv, signals_received)
        _report_sinks(trainer)
        return 1
    if getattr(trainer.control, "should_abort", False):  # `fg-bus ctl RUN abort` or an abort action: no model saved
        distributed.teardown()
        if rank == 0:
            _print_ending(trainer, bus, argv, signals_received, abort=True)
        return EXIT_SINK_FAILED if _report_sinks(trainer) else 0
    out_dir = trainer.save_model()
    distributed.teardown()
    if rank == 0:
        trainer.state.save_to_json(str(out_dir / ckpt.TRAINER_STATE_NAME))
        _print_summary(trainer, result, out_dir)
        _print_ending(trainer, bus, argv, signals_received)
    code = 128 + getattr(signal, signals_received[0]) if signals_received else 0
    # What went wrong with the run's records outranks how it stopped: the exit status says the worst.
    if _report_sinks(trainer):
        code = EXIT_SINK_FAILED
    incomplete = bus.publisher.incomplete if bus is not None and bus.publisher is not None else None
    if incomplete:
        print(f"fg-train: error: the run's stream is incomplete: {incomplete}", file=sys.stderr)
        code = EXIT_INCOMPLETE
    return code


def _how_it_ended(trainer, bus, signals_received: list[str]) -> tuple[str, dict]:
    """(status, reason) as the run's end record says, or, without a bus, as fg-train saw it."""
    from fg_bus import records, registry

    publisher = bus.publisher if bus is not None else None
    if publisher is not None and publisher.closed:
        return publisher.status, publisher.end_reason or records.end_reason(publisher.status)
    step, max_steps = trainer.state.global_step, trainer.state.max_steps
    if trainer.is_in_train:  # left by an exception (a second Ctrl-C, a failure), without a bus to say which
        error = sys.exc_info()[1]
        if isinstance(error, KeyboardInterrupt):
            return registry.INTERRUPTED, records.end_reason("KeyboardInterrupt (a second Ctrl-C)", signal="SIGINT")
        return registry.FAILED, records.failure_reason(error) if error else records.end_reason("failed")
    if signals_received:
        return registry.INTERRUPTED, records.end_reason(f"{signals_received[0]} at step {step}",
                                                        signal=signals_received[0])
    if getattr(trainer.control, "should_abort", False) or (max_steps and step < max_steps):
        return registry.STOPPED, records.end_reason(f"stopped at step {step} of {max_steps}")
    return registry.COMPLETED, records.end_reason(f"reached max_steps ({max_steps})")


def _print_ending(trainer, bus, argv: list[str], signals_received: list[str], abort: bool = False) -> None:
    """fg-train's closing lines: why the run ended, where each sink wrote, and, for a run that can go on,
    the command that continues it (every option it was started with, and --resume), last. A completed
    run's end goes to stdout, after its summary; any other to stderr, under a line that says so."""
    from fg_bus import records, registry

    status, reason = _how_it_ended(trainer, bus, signals_received)
    step = trainer.state.global_step
    completed = status == registry.COMPLETED
    lines = [] if completed else [
        f"\nfg-train: aborted at step {step}, nothing saved" if abort else f"\nfg-train: {status} at step {step}"]
    lines.append(f"  ended:       {records.describe_end(status, reason)}")
    if status == registry.FAILED and isinstance(reason.get("exception"), dict):
        frames = reason["exception"].get("traceback") or []
        if frames:
            last = frames[-1]
            lines.append(f"  raised at:   {last.get('file')}:{last.get('line')} in {last.get('function')}")
    for sink in _sink_callbacks(trainer):
        if sink.output_label and sink.output:
            empty = sink.kind == "alert" and os.path.exists(sink.output) and os.path.getsize(sink.output) == 0
            lines.append(f"  {sink.output_label + ':':<12} {sink.output}" + ("  (none raised)" if empty else ""))
    publisher = bus.publisher if bus is not None else None
    if publisher is not None:
        lines.append(f"  journal:     {publisher.bus_dir}  (fg-bus cat {publisher.run_id})")
    if status != registry.COMPLETED:
        last = output_dirs.resume_target(trainer.args.output_dir)
        if last is not None:
            lines.append(f"  checkpoint:  {last}  (saved last: --resume continues from it)")
            lines.append(f"  resume:      {_resume_command(argv, trainer)}")
        else:
            lines.append("  checkpoint:  none was saved")
            lines.append(f"  start again: {_resume_command(argv, trainer, resume=False)}")
    print("\n".join(lines), file=sys.stdout if completed else sys.stderr, flush=True)


class _TerminalTail(TailLogger):
    """`--sinks tail` in a terminal: the tail keeps a one-line progress indication at the bottom (step/max,
    rate, ETA), since the progress bar is off beside it."""

    def sink_args(self, args) -> list[str]:
        return ["--progress"]


def _known_max_steps(overrides: dict, raw_args) -> int | None:
    """max_steps before the trainer is built (--max-steps, or the config's args), None for a run by epochs."""
    value = overrides.get("max_steps")
    if value is None:
        value = raw_args.get("max_steps") if isinstance(raw_args, dict) else getattr(raw_args, "max_steps", None)
    return value if type(value) is int and value > 0 else None


def _check_output_dir(trainer, plan, argv: list[str], rank: int) -> int:
    """Before training (the trainer built): a run by epochs resuming a checkpoint already at its end is
    refused (exit 2, its stream ended as failed); rank 0 says what it resumes and which other runs'
    checkpoints the output directory holds (_output_dir). 0: go on."""
    max_steps = output_dirs.planned_max_steps(trainer)
    if plan.checkpoint is not None and plan.error is None:
        plan.error = output_dirs.nothing_to_train(plan.checkpoint, max_steps, None, argv, trainer.args.output_dir)
    if plan.error:
        print(f"fg-train: error: {plan.error}", file=sys.stderr)
        if trainer.event_bus is not None:
            trainer.event_bus.close_with_error(ValueError(plan.error))
        return EXIT_USAGE
    if rank == 0:
        lines = plan.notes + output_dirs.start_notes(trainer.args.output_dir, plan, trainer.args, max_steps)
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


def _config_output_dir(raw_args) -> str:
    """The output_dir a config's args name (a mapping or a TrainingArguments), else TrainingArguments'."""
    value = raw_args.get("output_dir") if isinstance(raw_args, dict) else getattr(raw_args, "output_dir", None)
    return str(value or "trainer_output")


def _sink_callbacks(trainer) -> list[SinkProcess]:
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SinkProcess)]


def _stop_sinks(trainer) -> None:
    for sink in _sink_callbacks(trainer):
        sink.stop()


def _report_sinks(trainer) -> bool:
    """Name every sink that ended early, failed or had to be stopped, with how to resume it."""
    problems = sink_problems(_sink_callbacks(trainer))
    for line in problems:
        print(f"fg-train: error: {line}", file=sys.stderr)
    return bool(problems)


def _launch_torchrun(opts, argv: list[str]) -> int:
    """Run this same command as N processes under torchrun (standalone: one machine), with one output
    directory fixed here for all of them. Returns torchrun's exit status."""
    args = _without_option(argv, "--nproc-per-node")
    if opts.output_dir is None and peek_arg(opts.config or default_config_path(), "output_dir") is None:
        args += ["--output-dir", _default_output_dir(opts)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={opts.nproc_per_node}", "-m", "trainer", *args]
    print(f"fg-train: launching {opts.nproc_per_node} ranks: torchrun --standalone "
          f"--nproc-per-node={opts.nproc_per_node} -m trainer {' '.join(args)}", file=sys.stderr, flush=True)
    # torchrun forwards SIGINT/SIGTERM to the ranks, which stop at a step boundary; wait for it to finish.
    # the ranks' resume command is this one, --nproc-per-node included (their own argv lacks it)
    proc = subprocess.Popen(command, env={**os.environ, output_dirs.ARGV_ENV: shlex.join(argv)})
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the ranks got the signal too (same process group); keep waiting for their exit


def _default_output_dir(opts) -> str:
    """fg-runs/NAME-TIME, for a run whose config names no output_dir."""
    name = "chargpt" if opts.config is None else opts.config.stem
    return str(Path("fg-runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _resume_command(argv: list[str], trainer, resume: bool = True) -> str:
    """This run's own command line, every option kept, with `--resume` (or, resume=False, without)."""
    return output_dirs.resume_command(argv, trainer.args.output_dir, True if resume else None)


class _GracefulStop(TrainerCallback):
    """Without a bus: a stop requested by a signal, applied at the next step boundary."""

    def __init__(self):
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


def _stop_on_signals(trainer, bus) -> list[str]:
    """SIGINT / SIGTERM: finish the current step, save, end the stream as "interrupted", exit. A second
    SIGINT aborts at once (KeyboardInterrupt)."""
    fallback = None
    if bus is None:
        fallback = _GracefulStop()
        trainer.add_callback(fallback)
    received = []
    late = []  # signals that came after the stream had ended

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if received or late:
            raise KeyboardInterrupt
        if bus is not None and bus.publisher is not None and bus.publisher.closed:
            # Training is over and the stream ended: the run did not stop early, only the wait for the sinks is
            # left, and a second signal cuts that short.
            late.append(name)
            print(f"\nfg-train: {name}: the run has ended; waiting for its sinks to finish writing (again to stop "
                  "them)", file=sys.stderr, flush=True)
            return
        received.append(name)
        print(f"\nfg-train: {name}: stopping after this step (a checkpoint is saved); Ctrl-C again to abort",
              file=sys.stderr, flush=True)
        if bus is not None and bus.publisher is not None:
            bus.publisher.request_control("stop", source=f"signal {name}")
        else:
            fallback.requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return received


def _print_summary(trainer, result, out_dir: Path) -> None:
    history = trainer.state.log_history
    last_loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    last_eval = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    lines = [f"\nDone: {result.global_step} steps in {result.metrics.get('train_runtime', 0):.1f} s"
             + (f", last loss {last_loss:.4f}" if last_loss is not None else "")
             + (f", eval_loss {last_eval:.4f}" if last_eval is not None else "")]
    sample = _sample(trainer)
    if sample:
        lines.append(f"  sample:      {sample!r}")
    lines.append(f"  model:       {out_dir}/")
    checkpoints = ckpt.sorted_checkpoints(out_dir, lineage=trainer.checkpoint_lineage)  # this run's, not others'
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(c.name for c in checkpoints)} in {out_dir}/")
    lines.append(f"  log history: {out_dir / ckpt.TRAINER_STATE_NAME}")
    print("\n".join(lines), flush=True)


def _sample(trainer, prompt: str = "The ", max_new_tokens: int = 60) -> str | None:
    """A short greedy continuation, when the model can generate and the tokenizer can encode/decode."""
    model, tok = trainer.model, trainer.processing_class
    if not (hasattr(model, "generate") and hasattr(tok, "encode") and hasattr(tok, "decode")):
        return None
    import torch

    ids = torch.tensor([tok.encode(prompt)], device=trainer.args.device)
    model.eval()
    try:
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    except (TypeError, ValueError, RuntimeError) as e:
        logger.info("no sample: %s", e)
        return None
    return tok.decode(out[0].tolist())


if __name__ == "__main__":
    sys.exit(main())
