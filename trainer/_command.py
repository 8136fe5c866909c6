"""What `fg-train` does once its command line is checked (cli.py): build the trainer its config describes,
start the sinks it asked for, train, save the model, and say how the run ended and how to go on."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from fg_bus import gc as bus_gc
from fg_bus.security import InsecureBus

from . import _checkpoint as ckpt
from . import _output_dir as output_dirs
from . import distributed
from ._launch import default_output_dir
from ._run_lock import OutputDirInUse, lock_output_dir
from ._trackers import TRACKER_KINDS
from ._utils import set_seed
from .bus_callback import BusCallback
from .callbacks import TrainerCallback
from .cli import EXIT_INCOMPLETE, EXIT_SINK_FAILED, EXIT_USAGE
from .config import ConfigError, load_config
from .default_callbacks import PrinterCallback, ProgressCallback
from .run_config import build_trainer
from .sink_callbacks import (AlertLogger, JsonLogger, SinkProcess, TailLogger, TBLogger, TextgenCallback, TrackerLogger,
                             sink_problems)

logger = logging.getLogger("trainer")


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


def run(opts, argv: list[str], config_path: Path, seed: int | None) -> int:
    """Build the trainer the config describes, train, save, and say how it ended; the exit status."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
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
        overrides["output_dir"] = default_output_dir(opts.config)
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
