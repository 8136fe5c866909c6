"""The seed document's callbacks, on top of the bus: thin in-process handles for out-of-process sinks.

`TBLogger`, `JsonLogger` and `TextgenCallback` keep the seed's names and parameters, but the heavy work
happens in an `fg-sink` process each starts for the run at train begin and waits for after the end (it
exits by itself after the run's end record). Their metadata (name, description, ...) is published as an
`experiment` record, so every sink sees it. `GradLogger` computes gradient statistics in the training
process, where the gradients are, with one fused device operation and no sync, and publishes them.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .bus_callback import _factory_of, active_bus
from ._trackers import TRACKER_KINDS
from .callbacks import TrainerCallback

logger = logging.getLogger(__name__)

SAMPLES_TIMEOUT = 60.0


def _sink_command(kind: str, run_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sinks", kind, "--run", run_dir, *extra]


class SinkProcess(TrainerCallback):
    """Starts `fg-sink KIND` for this run at train begin; after the end, waits for it to finish writing.

    The sink runs in its own session, so a Ctrl-C in the terminal (SIGINT to the whole foreground process
    group) reaches only `fg-train`, which stops at a step boundary and ends the stream: the sink then
    finishes on the end record with nothing missing. After the run, `returncode` is its exit status and
    `ended_early` says whether it exited before the end record was out; `fg-train` reports both.
    """

    kind = "null"

    def __init__(self, **metadata: Any):
        self.metadata = {k: v for k, v in metadata.items() if v is not None}
        self.process: subprocess.Popen | None = None
        self.run_dir: str | None = None
        self.pid: int | None = None
        self.returncode: int | None = None  # the sink's exit status, once it has ended
        self.ended_early = False  # it exited before the run's end record was out
        self.stopped_by_us = False  # fg-train stopped it (past the end deadline, or on abort)
        self.options: list[str] = []  # what it was started with besides KIND --run: its output, prompts, ...
        self._waiting_for_bus = False  # no bus at on_train_begin: try again at the first step

    def sink_args(self, args) -> list[str]:
        return []

    @property
    def resume_command(self) -> str:
        """The command that finishes its output: the one it was started with, options included (a sink
        started again without its --out or --logdir would write somewhere else)."""
        return shlex.join(["fg-sink", self.kind, "--run", str(self.run_dir), *self.options])

    #: what this sink writes, for fg-train's closing lines ("tensorboard", "json log", ...); None: nothing
    output_label: str | None = None

    def output_template(self) -> str | None:
        """Where the sink writes, as its `{output_dir}` / `{run}` template (sinks.base.expand)."""
        return None

    @property
    def output(self) -> str | None:
        """Where the sink wrote this run's output (a directory or a file), once it was started."""
        template = self.output_template() if self.run_dir is not None else None
        return None if template is None else self._expand(template)

    def _expand(self, template: str) -> str | None:
        """`template` with this run's `{output_dir}` / `{run}` (None: the run's run.json is unreadable)."""
        from fg_bus import registry
        from sinks.base import expand

        try:
            return expand(template, registry.load_run(Path(self.run_dir)))
        except (OSError, ValueError, KeyError, registry.RunNotFound):
            return None

    @property
    def failed(self) -> bool:
        """It ended early, with a non-zero status, or had to be stopped: its output may be incomplete."""
        return self.run_dir is not None and (self.ended_early or self.stopped_by_us or bool(self.returncode))

    def on_train_begin(self, args, state, control, **kwargs):
        self._start(args, state, last_chance=False)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._waiting_for_bus:
            self._start(args, state, last_chance=True)

    def _start(self, args, state, last_chance: bool) -> None:
        """Start the sink for the run on this process's bus. A bus placed after this callback (a BusCallback
        added with `add_callback` after `__init__`) has not started at our on_train_begin; it has by the first
        step, so that is tried too before giving up."""
        self._waiting_for_bus = False
        if not state.is_world_process_zero:
            return
        bus = active_bus()
        if bus is None:
            if not last_chance:
                self._waiting_for_bus = True
                return
            logger.warning("%s: no event bus in this process (fg-train --no-bus?); the %s sink will not run",
                           type(self).__name__, self.kind)
            return
        if self.metadata:
            bus.publisher.publish("experiment", state.global_step, state.epoch,
                                  meta={"source": type(self).__name__, "date": dt.date.today().isoformat(),
                                        **self.metadata})
        self.options = self.sink_args(args)
        command = _sink_command(self.kind, str(bus.publisher.bus_dir), *self.options)
        # Its own session: the terminal's SIGINT / SIGHUP go to fg-train's process group, not to the sink,
        # which must outlive fg-train's stop to write the run's last records.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.process.pid
        self.run_dir = str(bus.publisher.bus_dir)
        bus.add_after_close(self.wait)  # it exits after the end record; wait for it to finish writing
        logger.info("started %s", " ".join(command))

    def on_log(self, args, state, control, **kwargs):
        self.check_alive(state.global_step)  # a poll() at log steps: a system call, off the step's path

    def on_train_end(self, args, state, control, **kwargs):
        self.check_alive(state.global_step)  # the end record is not out yet: an exit now is early

    def check_alive(self, step: int | None = None) -> bool:
        """False (and a warning, once) if the sink has exited although the run has not ended."""
        if self.process is None or self.ended_early:
            return not self.ended_early
        code = self.process.poll()
        if code is None:
            return True
        self.returncode, self.ended_early = code, True
        logger.warning("the %s sink (pid %d) exited with %s%s while the run goes on; its output stops there. "
                       "Start it again, it resumes where its output ends: %s", self.kind, self.pid,
                       describe_status(code), "" if step is None else f" at step {step}", self.resume_command)
        return False

    def wait(self, deadline: float | None = None) -> int | None:
        """Wait for the sink to finish the run (it exits after the end record); past `deadline` (a
        time.monotonic() value; the bus's after-close deadline, shared by all sinks) stop it. Returns its
        exit status (also kept in `returncode`), or None if no sink was started."""
        if self.process is None:
            return self.returncode
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("the %s sink had not finished when the run's end deadline passed; stopping it (started "
                         "again, it resumes where its output ends: %s)", self.kind, self.resume_command)
            self.stop()
        except KeyboardInterrupt:  # Ctrl-C while waiting for it: stop it cleanly rather than leave it behind
            self.stop()
            raise
        finally:
            self.process = None
        return self.returncode

    def stop(self) -> int | None:
        """Stop the sink (SIGTERM: it finishes the record in hand, then SIGKILL); returns its exit status."""
        process = self.process
        if process is None or process.poll() is not None:
            if process is not None:
                self.returncode = process.returncode
            return self.returncode
        self.stopped_by_us = True
        process.terminate()
        try:
            self.returncode = process.wait(5)
        except subprocess.TimeoutExpired:  # stopped (SIGSTOP) or ignoring SIGTERM
            process.kill()
            self.returncode = process.wait(10)
        return self.returncode


def describe_status(code: int | None) -> str:
    """An exit status as a person reads it: "status 3", "signal SIGKILL"."""
    if code is None:
        return "no status (still running)"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def sink_problems(callbacks) -> list[str]:
    """One line per sink process that ended early, failed or had to be stopped, with how to resume it."""
    lines = []
    for cb in callbacks:
        if not isinstance(cb, SinkProcess) or not cb.failed:
            continue
        how = ("exited before the end record" if cb.ended_early else
               "was stopped by fg-train" if cb.stopped_by_us else "failed")
        lines.append(f"the {cb.kind} sink (pid {cb.pid}) {how}, {describe_status(cb.returncode)}; its output may "
                     f"be incomplete: finish it with `{cb.resume_command}`")
    return lines


def _logdir_of(summary_writer) -> str | None:
    if summary_writer is None:
        return None
    if isinstance(summary_writer, (str, os.PathLike)):
        return str(summary_writer)
    log_dir = getattr(summary_writer, "log_dir", None) or getattr(summary_writer, "get_logdir", lambda: None)()
    return str(log_dir) if log_dir else None


class TBLogger(SinkProcess):
    """The seed's TBLogger: `TBLogger(summary_writer_or_logdir=None, name=..., description=..., **metadata)`.

    TensorBoard files are written by an `fg-sink tb` process into the writer's log_dir (or `OUTPUT_DIR/tb`).
    """

    kind = "tb"

    def __init__(self, summary_writer=None, **metadata: Any):
        super().__init__(**metadata)
        self.logdir = _logdir_of(summary_writer)

    output_label = "tensorboard"

    def sink_args(self, args) -> list[str]:
        return ["--logdir", self.logdir] if self.logdir else []

    def output_template(self) -> str:
        from sinks.tb_sink import DEFAULT_LOGDIR

        return str(Path(self.logdir or DEFAULT_LOGDIR) / "{run}")  # the sink writes LOGDIR/RUN_ID


class JsonLogger(SinkProcess):
    """The seed's JsonLogger: `JsonLogger(name=..., description=..., config=..., out=None)`; every record of
    the run goes to `out` (default `OUTPUT_DIR/logs/RUN.jsonl`) through an `fg-sink json` process."""

    kind = "json"

    def __init__(self, out: str | None = None, **metadata: Any):
        super().__init__(**metadata)
        self.out = out

    output_label = "json log"

    def sink_args(self, args) -> list[str]:
        return ["--out", self.out] if self.out else []

    def output_template(self) -> str:
        from sinks.json_sink import DEFAULT_OUT

        return self.out or DEFAULT_OUT


class AlertLogger(SinkProcess):
    """Alerts on the run's stream (`fg-sink alert`, its rules on by default: a non-finite loss, divergence
    alerts, stalls, a failed or dead run, eval not improving, throughput dropping), printed on stderr and
    kept in `OUTPUT_DIR/alerts/RUN.jsonl`; `webhook` (with `webhook_format` json / slack / discord) and
    `exec_cmd` deliver them further, as the sink's --webhook, --webhook-format and --exec do."""

    kind = "alert"
    output_label = "alerts"

    def __init__(self, webhook: str | None = None, webhook_format: str | None = None,
                 exec_cmd: str | None = None, **metadata: Any):
        super().__init__(**metadata)
        self.webhook, self.webhook_format, self.exec_cmd = webhook, webhook_format, exec_cmd

    def sink_args(self, args) -> list[str]:
        out = []
        for flag, value in (("--webhook", self.webhook), ("--webhook-format", self.webhook_format),
                            ("--exec", self.exec_cmd)):
            if value:
                out += [flag, value]
        return out

    def output_template(self) -> str:
        from sinks.alert_sink import DEFAULT_LOG

        return DEFAULT_LOG


#: the trackers `TrackerLogger` (and `fg-train --sinks`) can replay into; each needs its extra (its client)
class TrackerLogger(SinkProcess):
    """A run replayed into a tracker, `fg-sink KIND` for KIND mlflow, wandb or trackio, in its own process
    (the tracker's client never runs in the training process): configured the tracker's usual way, by its
    environment variables (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, TRACKIO_PROJECT, ...), which the
    sink process inherits. Needs the tracker's extra (`pip install 'fg-bus[KIND]'`)."""

    def __init__(self, kind: str, **metadata: Any):
        if kind not in TRACKER_KINDS:
            raise ValueError(f"unknown tracker {kind!r}: choose {', '.join(TRACKER_KINDS)}")
        super().__init__(**metadata)
        self.kind = kind
        self.output_label = {"mlflow": "MLflow", "wandb": "W&B"}.get(kind, kind)

    @property
    def output(self) -> str | None:
        """Where the tracker holds the run, as the sink process finds it (the same environment), for the
        closing lines; no credential: an MLflow URI is shown without user, password or query."""
        if self.run_dir is None:
            return None
        env = os.environ
        if self.kind == "mlflow":
            from sinks.mlflow_sink import public_uri

            uri = env.get("MLFLOW_TRACKING_URI")
            where = public_uri(uri) if uri else "MLflow's default tracking URI (MLFLOW_TRACKING_URI unset)"
            return f"{where}, experiment {env.get('MLFLOW_EXPERIMENT_NAME') or 'Default'}"
        if self.kind == "wandb":
            from sinks.wandb_sink import DEFAULT_PROJECT

            files = Path(env.get("WANDB_DIR") or self._expand("{output_dir}") or "OUTPUT_DIR") / "wandb"
            return (f"project {env.get('WANDB_PROJECT') or DEFAULT_PROJECT} ({env.get('WANDB_MODE') or 'online'}), "
                    f"files in {files}")
        store = env.get("TRACKIO_DIR") or str(Path(env.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "trackio")
        return f"store {store}" + (f", project {env['TRACKIO_PROJECT']}" if env.get("TRACKIO_PROJECT") else "")


class TailLogger(SinkProcess):
    """A live view of the run in this terminal (`fg-sink tail`), from a separate process."""

    kind = "tail"


class TextgenCallback(SinkProcess):
    """The seed's TextgenCallback: every `generation_steps` steps the weights are snapshotted (the copy and
    the write happen off the training thread's critical path) and a `snapshot` record is published; an
    `fg-sink textgen` process generates from each prompt and sends the samples back as `textgen` records."""

    kind = "textgen"

    def __init__(self, prompts: list[str] | None = None, generation_config: dict | None = None,
                 generation_steps: int = 1000, summary_writer=None, keep_snapshots: int = 2, device: str = "cpu",
                 **metadata: Any):
        super().__init__(**metadata)
        if generation_steps < 1:
            raise ValueError(f"generation_steps={generation_steps}: must be >= 1")
        self.prompts = list(prompts or ["The "])
        self.generation_config = dict(generation_config or {})
        self.generation_steps = generation_steps
        self.keep_snapshots = keep_snapshots
        self.device = device
        self._writer: threading.Thread | None = None
        self.snapshots = 0
        self._tokenizer: dict | None = None  # how the sink rebuilds the tokenizer, once saved with the snapshots

    def sink_args(self, args) -> list[str]:
        out = ["--device", self.device]
        for prompt in self.prompts:
            out += ["--prompt", prompt]
        for key, value in self.generation_config.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else f"--no-{key.replace('_', '-')}")
            else:
                out += [flag, str(value)]
        return out

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokenizer = None  # saved again into this run's snapshots
        super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.generation_steps or model is None or not state.is_world_process_zero:
            return
        bus = active_bus()
        if bus is None:
            return
        if self._writer is not None and self._writer.is_alive():
            logger.warning("textgen: the previous snapshot is still being written; skipping step %d", state.global_step)
            return
        # The copy starts now (asynchronously on a GPU) so the weights are those of this step; the writer
        # thread waits for it and saves, so the training thread never waits for the disk.
        on_device = next(model.parameters()).device.type != "cpu"
        weights = {k: v.detach().to("cpu", non_blocking=on_device, copy=True) for k, v in model.state_dict().items()}
        done = torch.cuda.Event() if on_device else None
        if done is not None:
            done.record()
        directory = Path(bus.publisher.bus_dir) / "snapshots"
        step, epoch = state.global_step, state.epoch

        def write():
            if done is not None:
                done.synchronize()
            directory.mkdir(exist_ok=True)
            path = directory / f"step-{step}.pt"
            torch.save(weights, path)
            tokenizer = self._save_tokenizer(processing_class, directory)
            bus.publisher.publish("snapshot", step, epoch, path=str(path),
                                  **({"tokenizer": tokenizer} if tokenizer else {}))
            self.snapshots += 1
            for old in sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-self.keep_snapshots]:
                old.unlink(missing_ok=True)

        self._writer = threading.Thread(target=write, name="fg-textgen-snapshot", daemon=True)
        self._writer.start()

    def _save_tokenizer(self, tokenizer, directory: Path) -> dict | None:
        """The tokenizer travels with the snapshots: saved once (`save_pretrained`) into SNAPSHOTS/tokenizer,
        and each snapshot record says how to load it (`factory` and `path`). A tokenizer made in memory (a
        `PreTrainedTokenizerFast` over a `tokenizers` object, a `CharTokenizer`) has no name the sink could
        load it from. Runs on the writer thread. None if there is nothing to save (the sink falls back on the
        run meta's description)."""
        if self._tokenizer is None and tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            target = directory / "tokenizer"
            try:
                target.mkdir(exist_ok=True)
                tokenizer.save_pretrained(str(target))
            except (OSError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
                logger.warning("textgen: could not save the tokenizer with the snapshots (%s: %s); the sink will "
                               "rebuild it from the run's meta if it can", type(e).__name__, e)
                self._tokenizer = {}
            else:
                self._tokenizer = {"factory": _factory_of(tokenizer), "path": str(target)}
        return self._tokenizer or None

    def on_train_end(self, args, state, control, **kwargs):
        """Before the stream ends, let the sink send back the samples of every snapshot (bounded wait)."""
        super().on_train_end(args, state, control, **kwargs)
        if self._writer is not None:
            self._writer.join(60)
        bus = active_bus()
        if bus is None or self.process is None:
            return
        expected = self.snapshots * len(self.prompts)
        deadline = time.monotonic() + SAMPLES_TIMEOUT
        while bus.publisher.received["textgen"] < expected and self.process.poll() is None:
            if time.monotonic() > deadline:
                logger.warning("textgen: %d of %d samples arrived within %g s; ending the run without the rest",
                               bus.publisher.received["textgen"], expected, SAMPLES_TIMEOUT)
                break
            time.sleep(0.05)


def _clip_factor(args, bus, norms: torch.Tensor) -> torch.Tensor | float:
    """The factor gradient clipping multiplied every gradient by this step (1 without clipping), as a device
    value: from the pre-clip total norm the bus holds (our Trainer's, or tapped from transformers')."""
    max_norm = getattr(args, "max_grad_norm", 0) or 0
    total = bus.step_grad_norm() if hasattr(bus, "step_grad_norm") else None
    if max_norm <= 0 or total is None or not math.isfinite(max_norm):
        return 1.0
    return (max_norm / (total.to(norms.device, torch.float32) + 1e-6)).clamp(max=1.0)


class GradLogger(TrainerCallback):
    """Gradient statistics every `log_frequency` steps, while the gradients exist (on_pre_optimizer_step,
    before zero_grad): one fused `torch._foreach_norm` over all gradients, no sync. The norms are those
    BEFORE clipping, as the trainer's `grad_norm` is: clipping scaled every gradient by one factor,
    min(1, max_grad_norm / (total + 1e-6)) (torch's clip_grad_norm_), computed again here on the device from
    the pre-clip total the bus holds, and divided out. (After clipping, the total could never exceed
    max_grad_norm, and `exploding` could never fire.)

    Publishes a `grad_stats` record with grad_norm_total/max/min/mean and the norms of parameters whose
    name matches a `track_layers` regex; a total norm below `vanishing` or above `exploding` is published
    as a `warning` record (checked when the values reach the host, never by waiting for them).
    """

    def __init__(self, log_frequency: int = 100, track_layers: list[str] | None = None, summary_writer=None,
                 vanishing: float = 1e-7, exploding: float = 1e3):
        if log_frequency < 1:
            raise ValueError(f"log_frequency={log_frequency}: must be >= 1")
        self.log_frequency = log_frequency
        self.patterns = [re.compile(p) for p in (track_layers or [])]
        self.vanishing = vanishing
        self.exploding = exploding
        self._pending: tuple | None = None  # (pinned value, CUDA event, step, epoch) not yet checked

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step this optimizer update completes
        if model is None or step % self.log_frequency:
            return
        bus = active_bus()
        if bus is None:
            return
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch.stack(torch._foreach_norm([g for _, g in named]))  # one fused kernel launch
        norms = norms / _clip_factor(args, bus, norms)
        values = {
            "grad_norm_total": torch.linalg.vector_norm(norms),
            "grad_norm_max": norms.max(),
            "grad_norm_min": norms.min(),
            "grad_norm_mean": norms.mean(),
        }
        for index, (name, _) in enumerate(named):
            if any(p.search(name) for p in self.patterns):
                values[f"layer/{name}"] = norms[index]
        bus.publish_tensors("grad_stats", step, state.epoch, values)
        self._watch(values["grad_norm_total"], step, state.epoch, bus)

    def _watch(self, total: torch.Tensor, step: int, epoch: float, bus) -> None:
        """Warn about a vanishing or exploding norm once its value is on the host, without waiting for it."""
        if total.device.type == "cpu":
            self._check(float(total), step, epoch, bus)  # a host tensor: reading it waits for nothing
            return
        if self._pending is not None and self._pending[1].query():
            buffer, _, pending_step, pending_epoch = self._pending
            self._check(float(buffer), pending_step, pending_epoch, bus)
            self._pending = None
        if self._pending is None:
            buffer = torch.empty((), dtype=torch.float32, pin_memory=True)
            buffer.copy_(total.float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (buffer, event, step, epoch)

    def _check(self, total: float, step: int, epoch: float, bus) -> None:
        if total != total or total > self.exploding:
            kind = "exploding"
        elif total < self.vanishing:
            kind = "vanishing"
        else:
            return
        bus.publisher.publish("warning", step, epoch, metrics={"grad_norm_total": total},
                              message=f"{kind} gradient: total norm {total:.3g} at step {step}")
