"""`BusCallback`: every one of the fifteen events, as a record on the run's bus.

Placed at the head of the callback list (`Trainer(..., event_bus=BusCallback())`, as `fg-train` does), it
sees each event before any other callback, so the records are in firing order. A `transformers.Trainer` is
followed with `attach_bus(trainer)`: the same placement, plus hooks for the per-step loss and grad norm that
transformers does not hand to callbacks. There the stream stays open after `on_train_end`, for `evaluate()`
and `predict()` calls after `train()`, and ends at `bus.close()` or at process exit.

Hot path (bench/hotpath.py): per event, one `Publisher.publish` (`publish_step_event` for the per-step
events) of what the event gave (name, step, epoch, the metrics dict, copied), which appends a tuple to the
bus's queue: the bus thread gives it its seq, formats the
timestamp and encodes it. Nothing here reads a value that does not change between events, builds a record,
or takes a lock; the per-step events call the publisher directly, without a helper in between (right
after a step's compute, on a cold cache: about 2 us each on these loaded 2-core VMs, on_step_end about 5,
half of what a record dict, a lock and per-step checks cost). The per-step loss and grad norm are never read with a device
sync: on the CPU the bus thread reads them (`.item()`) while encoding; on a GPU they are copied to pinned
memory with `non_blocking=True` and the bus thread publishes them once the copy's CUDA event is done.
Control commands (`fg-bus ctl`, SIGINT/SIGTERM in `fg-train`) are applied here at the next step boundary.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fg_bus
from fg_bus import records, registry
from fg_bus.publisher import Publisher, ready_now, seconds_option

from . import distributed
from .callbacks import TrainerCallback
from .training_args import SaveStrategy

logger = logging.getLogger(__name__)

_ACTIVE: list["BusCallback"] = []


def active_bus() -> "BusCallback | None":
    """The bus of the run training in this process (the most recent started and not closed), or None:
    in-process handles (TBLogger, TextgenCallback, ...) publish through it."""
    for bus in reversed(_ACTIVE):
        if bus.publisher is not None and not bus.publisher.closed:
            return bus
    return None


def _factory_of(obj: Any) -> str | None:
    if obj is None:
        return None
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _config_of(model: Any) -> dict | None:
    """The model's config as plain JSON (transformers configs hold int-keyed dicts such as id2label; JSON
    makes those keys strings, which `from_dict` accepts back)."""
    config = getattr(model, "config", None)
    for attr in ("to_dict", "to_diff_dict"):
        if hasattr(config, attr):
            try:
                return json.loads(json.dumps(getattr(config, attr)(), default=str))
            except (TypeError, ValueError):
                continue
    return None


def _describe_tokenizer(tok: Any) -> dict | None:
    if tok is None:
        return None
    description: dict[str, Any] = {"factory": _factory_of(tok)}
    for attr in ("vocab_size", "name_or_path"):
        value = getattr(tok, attr, None)
        if isinstance(value, (int, str)):
            description[attr] = value
    if hasattr(tok, "to_dict"):
        description["config"] = tok.to_dict()
    return description


def _tcp_for_local_rank(tcp: str | None) -> str | None:
    """HOST:PORT for this process: ranks on one host each take three ports, PORT + 3 * LOCAL_RANK (port 0,
    any free ports, is left as it is)."""
    if tcp is None:
        return None
    host, _, port = tcp.rpartition(":")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return tcp if int(port) == 0 or local_rank == 0 else f"{host}:{int(port) + 3 * local_rank}"


def _gpus_of(args) -> list[int | str]:
    """The GPU(s) this rank trains on, as the system sampler finds them in NVML: by UUID, which neither
    CUDA_VISIBLE_DEVICES nor CUDA's device order changes (NVML numbers every GPU of the host, in PCI order);
    else torch's own mapping to an NVML index. Empty for a run off CUDA. Called once, at the bus's start."""
    device = getattr(args, "device", None)
    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return []
    distributed_run = torch.distributed.is_available() and torch.distributed.is_initialized()
    if getattr(args, "n_gpu", 1) > 1 and not distributed_run:
        indices = list(range(torch.cuda.device_count()))  # transformers' DataParallel: all of them, one process
    else:
        indices = [device.index if device.index is not None else torch.cuda.current_device()]
    gpus: list[int | str] = []
    for index in indices:
        try:
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)  # torch >= 2.1
        except (RuntimeError, AssertionError) as e:
            logger.warning("system metrics: cannot tell which GPU cuda:%d is (%s); its GPU metrics are left out",
                           index, e)
            continue
        if uuid is not None:
            gpus.append(str(uuid))
            continue
        try:
            gpus.append(torch.cuda._get_nvml_device_index(index))  # parses CUDA_VISIBLE_DEVICES
        except (AttributeError, RuntimeError, ValueError):
            gpus.append(index)
    return gpus


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "fg_bus": fg_bus.__version__}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    return versions


class _PinnedSlot:
    """A few floats of pinned host memory and the CUDA event of the copy into them. The publisher calls it
    (is the copy done?) and then `release()` once the record is encoded, so the slot can be reused."""

    def __init__(self, size: int):
        self.buffer = torch.empty(size, dtype=torch.float32, pin_memory=True)
        self.event = torch.cuda.Event()
        self.in_use = False

    def record(self) -> None:
        self.in_use = True
        self.event.record()

    def __call__(self) -> bool:
        return self.event.query()

    def release(self) -> None:
        self.in_use = False


class _PinnedRing:
    """Reuses pinned slots (allocating pinned memory costs far more than a step's publishing budget)."""

    def __init__(self, size: int = 64):
        self.size = size
        self.slots: list[_PinnedSlot] = []
        self.next = 0

    def take(self, n: int) -> _PinnedSlot:
        for _ in range(len(self.slots)):
            slot = self.slots[self.next]
            self.next = (self.next + 1) % len(self.slots)
            if not slot.in_use and slot.buffer.numel() >= n:
                return slot
        slot = _PinnedSlot(max(n, 4))
        if len(self.slots) < self.size:
            self.slots.append(slot)
        return slot


def attach_bus(trainer, bus: "BusCallback | None" = None, **options: Any) -> "BusCallback":
    """Follow `trainer` (a `transformers.Trainer`, or this project's) with fg-bus: `bus = attach_bus(trainer)`,
    or with options, e.g. `attach_bus(trainer, system_interval=5, stall_after=300)` (see `BusCallback`).

    `bus` (default: a new `BusCallback(**options)`) goes first in `trainer.callback_handler.callbacks`, a plain
    list in both trainers, wherever it was before and whatever was added before it. Callbacks added later
    are appended after it. So it publishes each event before any other callback sees it, and the sink
    handles (`TextgenCallback`, `JsonLogger`, ...) find the bus started at their `on_train_begin`. It also
    hooks the step's loss and gradient norm (`_StepTaps`) so that `on_step_end` records carry them.
    """
    if bus is None:
        bus = BusCallback(**options)
    elif options:
        raise TypeError(f"attach_bus: pass a bus or its options, not both ({', '.join(options)})")
    callbacks = trainer.callback_handler.callbacks
    for i, cb in reversed(list(enumerate(callbacks))):
        if cb is bus:
            del callbacks[i]
    callbacks.insert(0, bus)
    bus.attach(trainer)
    return bus


class _StepTaps:
    """The step's loss and gradient norm inside `transformers.Trainer`, as tensors still on the device.

    transformers (5.x) hands callbacks neither: `on_step_end` gets the model, optimizer and dataloaders, and
    the norm `clip_grad_norm_` returns stays a local of its loop. So the taps wrap, on this trainer's objects
    only, the two calls that return them: `trainer.training_step` (its return value is the micro-batch's
    detached loss, already divided for gradient accumulation where transformers divides; summed over the
    step's micro-batches it is the step's loss, as our Trainer's `step_loss`) and
    `trainer.accelerator.clip_grad_norm_` (the pre-clip total norm, the value transformers logs as
    `grad_norm`; transformers calls it with max_norm=inf when clipping is off). The wrappers keep
    references and add tensors on the device: no read, no sync. A backend that bypasses accelerate's
    clipping (DeepSpeed returns a float, or nothing) leaves `grad_norm` out.
    """

    def __init__(self, trainer):
        self.loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        training_step = trainer.training_step

        def tapped_training_step(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            if isinstance(loss, torch.Tensor):
                self.loss = loss if self.loss is None else self.loss + loss
            return loss

        trainer.training_step = tapped_training_step
        accelerator = getattr(trainer, "accelerator", None)
        clip = getattr(accelerator, "clip_grad_norm_", None)
        if clip is not None:
            def tapped_clip_grad_norm_(*args, **kwargs):
                norm = clip(*args, **kwargs)
                self.grad_norm = norm if isinstance(norm, torch.Tensor) else None
                return norm

            accelerator.clip_grad_norm_ = tapped_clip_grad_norm_

    def reset(self) -> None:
        self.loss = self.grad_norm = None

    def take(self) -> dict[str, torch.Tensor]:
        values = {name: value for name, value in (("loss", self.loss), ("grad_norm", self.grad_norm))
                  if value is not None}
        self.reset()
        return values


class BusCallback(TrainerCallback):
    """Publishes every event; `run_name` names the run (default: args.run_name, else the output dir's name);
    `tcp="HOST:PORT"` binds tcp endpoints instead of private ipc sockets (beyond loopback it needs CURVE keys,
    or `insecure=True`: see `Publisher`); `meta` adds to on_train_begin's meta. `system_interval`: a `system`
    record (CPU, memory, disk, this rank's GPU through NVML) every that many seconds, sampled off the training
    thread (0: none). `stall_after`: while training, that many seconds without an event (and at least 10
    median step times) make the run `stalled`: a `warning` record, and `fg-bus ls` says so (0: never).

    The stream ends with `close()`: our Trainer calls it after train(); otherwise (transformers.Trainer) call
    it yourself, or it is called at process exit, so `evaluate()` and `predict()` after `train()` are in it."""

    def __init__(self, run_name: str | None = None, tcp: str | None = None, meta: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, insecure: bool = False,
                 system_interval: float = 10.0, stall_after: float = 120.0):
        # checked here, not when the publisher starts at on_init_end / on_train_begin
        self.system_interval = seconds_option("BusCallback", "system_interval", system_interval)
        self.stall_after = seconds_option("BusCallback", "stall_after", stall_after)
        self.run_name = run_name
        self.tcp = tcp
        self.insecure = insecure
        self.extra_meta = dict(meta or {})
        self.rank = rank
        self.world_size = world_size
        self.publisher: Publisher | None = None
        self.trainer = None  # set by our Trainer: the per-step loss lives there (and it closes the stream)
        self._taps: _StepTaps | None = None  # in a transformers.Trainer (attach_bus): the per-step loss
        self._training = False  # between on_train_begin and on_train_end: an exit now means train() failed
        self._pinned = _PinnedRing()
        self._step_on_gpu: bool | None = None  # whether the step's loss is on a CUDA device (on_step_end)
        self._step_on_host = False  # on_step_end's flat path: our Trainer's loss, grad norm and data time on the host
        # How the run ends, once a control request says: "stopped" (ctl) or "interrupted" (a signal), and why
        self._end_status: str | None = None
        self._end_reason: dict | None = None
        self._final: tuple[int, int, bool] | None = None  # on_train_end's (global_step, max_steps, stop flag)
        self._after_close: list = []
        #: seconds, after the end record, that the sink processes together get to finish ($FG_SINK_EXIT_TIMEOUT)
        self.after_close_timeout = float(os.environ.get("FG_SINK_EXIT_TIMEOUT", 120.0))

    # -- publisher lifecycle ---------------------------------------------------------------------------

    def _ensure_started(self, args) -> Publisher:
        if self.publisher is None:
            name = self.run_name or getattr(args, "run_name", None) or Path(args.output_dir).name or "run"
            # One run id for every rank of a torchrun job (rank 0's); each rank publishes its own stream.
            run_id = distributed.broadcast(registry.new_run_id(name))
            bus_dir = Path(args.output_dir) / registry.BUS_DIRNAME / run_id
            rank = self.rank if self.rank is not None else int(os.environ.get("RANK", 0))
            world = self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
            self.publisher = Publisher(bus_dir, run_id, rank=rank, world_size=world, name=name,
                                       tcp=_tcp_for_local_rank(self.tcp), insecure=self.insecure,
                                       system_interval=self.system_interval,
                                       gpus=_gpus_of(args) if self.system_interval > 0 else None,
                                       stall_after=self.stall_after).start()
            _ACTIVE.append(self)
            # Registered after the publisher's own exit hook, so it runs first (atexit is last in, first out):
            # the stream ends with the run's real status and the sink handles wait, for a bounded time.
            atexit.register(self._close_at_exit)
            logger.info("publishing run %s (%s)", run_id, bus_dir)
        return self.publisher

    def attach(self, trainer) -> "BusCallback":
        """Read the step's loss and grad norm from `trainer` (`attach_bus` also places the bus first): our
        Trainer exposes them (and closes the stream after train()); a transformers.Trainer gets taps."""
        if hasattr(trainer, "step_loss"):
            self.trainer = trainer
            if getattr(trainer, "event_bus", None) is None:
                trainer.event_bus = self
        elif self._taps is None:
            self._taps = _StepTaps(trainer)
        return self

    def _close_at_exit(self) -> None:
        if self._training:  # train() was left by an exception: on_train_end never came
            last = getattr(sys, "last_value", None)  # an uncaught exception, set before atexit runs
            if last is not None:
                return self.close_with_error(last)
            return self.close(registry.FAILED, records.end_reason("the process exited during training"))
        self.close()

    def close_with_error(self, error: BaseException) -> None:
        """End the stream of a train() left by `error`: interrupted (KeyboardInterrupt: a second Ctrl-C), or
        failed, with the exception's type, message and innermost frames."""
        if isinstance(error, KeyboardInterrupt):
            self.close(registry.INTERRUPTED, records.end_reason(
                "KeyboardInterrupt (a second Ctrl-C): stopped in the middle of a step, nothing saved",
                signal="SIGINT"))
        else:
            self.close(registry.FAILED, records.failure_reason(error))

    def close(self, status: str | None = None, reason: dict | None = None) -> None:
        """End the run's stream with `status` and `reason` (by default: why training ended, as this callback
        saw it: completed, stopped by `fg-bus ctl` or a callback, interrupted by a signal), then run the
        after-close hooks (sink handles waiting for their processes), all within `after_close_timeout`
        seconds. Idempotent."""
        if self.publisher is not None and not self.publisher.closed:
            if status is None:
                status, reason = self.ending()
            self.publisher.close(status, reason=reason or records.end_reason(status))
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        atexit.unregister(self._close_at_exit)
        hooks, self._after_close = self._after_close, []
        deadline = time.monotonic() + self.after_close_timeout
        for hook in hooks:
            hook(deadline)

    def add_after_close(self, hook) -> None:
        """Call `hook(deadline)` once the stream has ended (the end record is out); `deadline` is a
        time.monotonic() value shared by all hooks, past which a hook must give up waiting."""
        self._after_close.append(hook)

    def ending(self) -> tuple[str, dict]:
        """(status, reason) of a run whose train() returned: what a control request said (ctl, a signal),
        else the callback that set `should_training_stop` (our Trainer's CallbackHandler names it), else
        completed."""
        if self._end_status is not None:
            return self._end_status, self._end_reason
        if self._final is None:
            if self._training:  # closed from inside train(): it did not reach its end
                return registry.STOPPED, records.end_reason("the stream was closed during training", by="close")
            return registry.COMPLETED, records.end_reason("no training (evaluate / predict only)")
        step, max_steps, stop_flag = self._final
        handler = getattr(self.trainer, "callback_handler", None)
        stopped_by = getattr(handler, "stopped_by", None)
        if stopped_by is not None and type(stopped_by[0]).__name__ not in ("DefaultFlowCallback", "BusCallback"):
            callback, event = stopped_by
            name = type(callback).__name__
            why = getattr(callback, "stop_reason", None)
            return registry.STOPPED, records.end_reason(
                f"{name} stopped training at step {step}" + (f": {why}" if isinstance(why, str) and why else ""),
                by="callback", callback=name, event=event, step=step)
        if stop_flag and max_steps and step < max_steps:
            world = self.publisher.world_size if self.publisher is not None else 1
            who = "another rank asked to stop (agreed over the ranks)" if world > 1 and handler is not None \
                else "a callback set should_training_stop"
            return registry.STOPPED, records.end_reason(f"{who} at step {step} of {max_steps}", by="rank"
                                                        if world > 1 and handler is not None else "callback",
                                                        step=step)
        return registry.COMPLETED, records.end_reason(
            f"reached max_steps ({max_steps})" if max_steps and step >= max_steps else f"ran to the end (step {step})",
            step=step)

    @property
    def run_id(self) -> str | None:
        return self.publisher.run_id if self.publisher is not None else None

    # -- events ----------------------------------------------------------------------------------------

    def _publish(self, event: str, args, state, metrics: dict | None = None, **fields) -> None:
        """The events that come once a run or once an evaluation; the per-step ones inline this line."""
        (self.publisher or self._ensure_started(args)).publish(event, state.global_step, state.epoch, metrics, **fields)

    def on_init_end(self, args, state, control, **kwargs):
        self._publish("on_init_end", args, state)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        meta = {
            "name": self.run_name or getattr(args, "run_name", None) or Path(args.output_dir).name,
            "args": args.to_dict() if hasattr(args, "to_dict") else dict(vars(args)),
            "model": {"factory": _factory_of(model), "config": _config_of(model)},
            "tokenizer": _describe_tokenizer(processing_class),
            "num_parameters": sum(p.numel() for p in model.parameters()) if model is not None else None,
            "max_steps": state.max_steps,
            "world_size": self._ensure_started(args).world_size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "output_dir": str(args.output_dir),
            "versions": _versions(),
            **self.extra_meta,
        }
        self._publish("on_train_begin", args, state, meta=meta)
        self._training = True
        self._step_on_gpu, self._step_on_host = None, False  # asked again at this train()'s first step
        if self.trainer is None and self._taps is None:
            logger.warning("BusCallback was added without attach_bus(trainer): its on_step_end records carry no "
                           "loss or grad_norm (attach_bus also places it first among the callbacks)")

    def on_train_end(self, args, state, control, **kwargs):
        # The stream stays open: our Trainer closes it after every callback's on_train_end (so their last
        # records belong to the run); under transformers, evaluate() / predict() may follow, and close()
        # or the process's exit ends it.
        self._publish("on_train_end", args, state)
        self._training = False
        self._final = (state.global_step, state.max_steps, bool(control.should_training_stop))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._publish("on_epoch_begin", args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._publish("on_epoch_end", args, state)

    # The per-step events: one publish() each, called directly (see the module's docstring).

    def on_step_begin(self, args, state, control, **kwargs):
        if self._taps is not None:
            self._taps.reset()  # a step cut short (should_epoch_stop mid-accumulation) leaves nothing behind
        (self.publisher or self._ensure_started(args)).publish_step_event("on_step_begin", state.global_step,
                                                                          state.epoch)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        (self.publisher or self._ensure_started(args)).publish_step_event("on_pre_optimizer_step", state.global_step,
                                                                          state.epoch)

    def on_optimizer_step(self, args, state, control, **kwargs):
        (self.publisher or self._ensure_started(args)).publish_step_event("on_optimizer_step", state.global_step,
                                                                          state.epoch)

    def on_substep_end(self, args, state, control, **kwargs):
        (self.publisher or self._ensure_started(args)).publish_step_event("on_substep_end", state.global_step,
                                                                          state.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        """The step's loss and grad norm (as tensors: never read here) and, from our Trainer, this rank's wait
        for the step's batches (`data_time`, host seconds from get_batch_samples: the straggler figure under
        DDP, where step timestamps are the same on every rank, fg_bus/monitor.py), to the microsecond."""
        publisher = self.publisher or self._ensure_started(args)
        if self._step_on_host:
            # The usual case, flat: what it is was decided at the first step (_publish_step_values), and it
            # does not change from step to step. round(x * 1e6) / 1e6: the digits of round(x, 6), at a
            # fifth of its cost. (Each call and check here costs microseconds on the caches a step leaves.)
            trainer = self.trainer
            publisher.publish_when_ready(ready_now, "on_step_end", state.global_step, state.epoch, {
                "loss": trainer.step_loss, "grad_norm": trainer.step_grad_norm,
                "data_time": round(trainer.step_data_time * 1e6) / 1e6})
        else:
            self._publish_step_values(state)
        if publisher.control_queue:  # has_control_requests, without the property's call
            self._apply_control(args, state, control)

    def _publish_step_values(self, state) -> None:
        """on_step_end's values, whatever they are (a transformers.Trainer's taps, tensors on a GPU, some
        missing), asking what each is; at the first step with values, decide whether the next steps can
        take on_step_end's flat path: our Trainer's three values, on the host."""
        values, data_time = self._step_values()
        on_gpu = self._step_on_gpu
        if on_gpu is None and values:
            # `.is_cuda` once per train(): where the loss lives does not change, and on a cold cache (after
            # the step's kernels) each call costs the training thread microseconds.
            on_gpu = self._step_on_gpu = any(tensor.is_cuda for tensor in values.values())
            self._step_on_host = (not on_gpu and self._taps is None and len(values) == 2
                                  and isinstance(data_time, float))
        self.publish_tensors("on_step_end", state.global_step, state.epoch, values,
                             None if data_time is None else {"data_time": round(data_time * 1e6) / 1e6},
                             on_gpu=on_gpu)

    def publish_tensors(self, event: str, global_step: int, epoch: float, values: dict[str, torch.Tensor],
                        host: dict[str, float] | None = None, on_gpu: bool | None = None, **fields) -> None:
        """Publish scalar tensors as metrics without a device sync, from the training thread (`host`: plain
        numbers added to the metrics as they are; `on_gpu`: whether the tensors are on a CUDA device, when
        the caller knows, else each one is asked). Either way is correct for any tensor: a CUDA tensor taken
        for a CPU one is read by the bus thread (its sync, never this thread's), a CPU tensor taken for a
        CUDA one is copied into pinned memory at once."""
        if on_gpu is None:
            on_gpu = any(tensor.is_cuda for tensor in values.values())  # a seventh of the cost of .device.type
        if not on_gpu:
            # CPU tensors here are fresh objects, never written again, so the bus thread reads them (.item())
            # while encoding, and this thread pays for neither the reads nor the encoding. (On another
            # accelerator, mps or xpu, that read is the bus thread's sync, never this thread's.)
            self.publisher.publish_when_ready(ready_now, event, global_step, epoch,
                                              {**values, **host} if host else values, **fields)
            return
        # Copy off the device without waiting; the bus thread publishes once the copy is done.
        slot = self._pinned.take(len(values))
        metrics = {}
        for i, (key, tensor) in enumerate(values.items()):
            slot.buffer[i].copy_(tensor.detach().float(), non_blocking=True)
            metrics[key] = slot.buffer[i]
        if host:
            metrics.update(host)
        slot.record()
        self.publisher.publish_when_ready(slot, event, global_step, epoch, metrics, **fields)

    def step_grad_norm(self) -> torch.Tensor | None:
        """This step's total gradient norm before clipping, still on the device (None when not known yet:
        it is known from the clipping on, i.e. at on_pre_optimizer_step and after)."""
        if self._taps is not None:
            return self._taps.grad_norm
        norm = getattr(self.trainer, "step_grad_norm", None)
        return norm if isinstance(norm, torch.Tensor) else None

    def _step_values(self) -> tuple[dict[str, torch.Tensor], float | None]:
        """The step's loss and grad norm (tensors, as they are), and this rank's wait for its batches (host
        seconds; our Trainer only)."""
        if self._taps is not None:
            return self._taps.take(), None
        trainer = self.trainer
        if trainer is None:
            return {}, None
        values = {}
        loss, grad_norm = getattr(trainer, "step_loss", None), getattr(trainer, "step_grad_norm", None)
        if isinstance(loss, torch.Tensor):
            values["loss"] = loss
        if isinstance(grad_norm, torch.Tensor):
            values["grad_norm"] = grad_norm
        return values, getattr(trainer, "step_data_time", None)

    def _apply_control(self, args, state, control) -> None:
        for request in self.publisher.control_requests():
            cmd = request["cmd"]
            if cmd in ("stop", "save-and-stop", "abort") and self._end_status is None:
                self._end_status, self._end_reason = _control_reason(request, state.global_step)
            if cmd in ("stop", "save-and-stop"):
                control.should_training_stop = True
            if cmd in ("save", "save-and-stop") or (cmd == "stop" and args.save_strategy != SaveStrategy.NO):
                control.should_save = True
            if cmd == "evaluate":
                control.should_evaluate = True
            if cmd == "abort":  # stop at this step, saving nothing (our Trainer; a plain stop elsewhere)
                control.should_training_stop = control.should_abort = True
                control.should_save = control.should_evaluate = False
            self.publisher.publish("control", state.global_step, state.epoch, cmd=cmd, id=request["id"],
                                   source=request.get("source", ""), applied=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._publish("on_evaluate", args, state, metrics)  # publish() copies it

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._publish("on_predict", args, state, metrics)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        self._publish("on_save", args, state, checkpoint=checkpoint)
        self.publisher.sync()  # the journal is durable at every checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A copy of `logs`: callbacks after this one may change it (transformers' PrinterCallback pops
        # total_flos)
        (self.publisher or self._ensure_started(args)).publish_step_event("on_log", state.global_step, state.epoch,
                                                                          dict(logs) if logs else None)

    def on_prediction_step(self, args, state, control, **kwargs):
        self._publish("on_prediction_step", args, state)


def _control_reason(request: dict, step: int) -> tuple[str, dict]:
    """A stopping control request as the run's end: interrupted (a signal) or stopped (`fg-bus ctl`, top)."""
    source = request.get("source") or ""
    if source.startswith("signal "):
        name = source.split(" ", 1)[1]
        return registry.INTERRUPTED, records.end_reason(f"{name} at step {step}", signal=name, step=step)
    origin = request.get("origin") or {}
    who = ""
    if origin:
        who = f"{origin.get('user', '?')}@{origin.get('host', '?')}" + (f" (pid {origin['pid']})" if "pid" in origin
                                                                     else "")
    cmd = request["cmd"]
    if source == "fg-bus ctl":  # the command as typed: `fg-bus ctl stop` from alice@gpu1 (pid 12)
        text = f"`fg-bus ctl {cmd}`" + (f" from {who}" if who else "")
    else:  # fg-bus top's x-then-y, or a program's send_control: stop from fg-bus top, by alice@gpu1 (pid 12)
        text = f"{cmd} from {source or 'a control request'}" + (f", by {who}," if who else "")
    return registry.STOPPED, records.end_reason(f"{text} at step {step}", by="ctl", cmd=cmd, source=source or None,
                                                origin=origin or None, step=step)
