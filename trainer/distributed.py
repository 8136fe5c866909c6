"""Running as one of several ranks under torchrun: PyTorch's own process group, nothing home-made.

`setup(args)` joins the process group torchrun describes in the environment (gloo on the CPU, nccl on
CUDA) and makes a second, gloo group for the small host-side agreements below, so they never add a device
sync to a GPU step. With one process (no WORLD_SIZE, or 1) every function here is a no-op.

    agree_on_step(control, args, state)
                                at every step boundary: the flags every rank computes alike (the step
                                schedule's log / evaluate / save / stop) act at once, with no collective;
                                any other flag is a rank's vote, sent in an all-reduce that runs while the
                                next step trains, and the OR of the votes acts on every rank at that step
    agree_on_control(control)   at an epoch's end and after an evaluation: the OR of every rank's flags,
                                at once (a synchronous all-reduce), the pending votes included
    mean_over_ranks(tensor)     in place, on the training device (logging steps only)
    broadcast(obj)              rank 0's value on every rank (the run id)
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from .callbacks import DefaultFlowCallback
from .state import TrainerControl

logger = logging.getLogger(__name__)

_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log",
                  "should_abort")
_host_group = None  # gloo group for host-side agreement (the default group itself when it is gloo)
_pending = None  # (work, its buffer) of the votes all-reduced since the last step boundary
_vote_buffers: list = []  # two one-int tensors, taking turns: one in flight, one being filled
_BOR = dist.AllreduceOptions() if dist.is_available() else None
if _BOR is not None:
    _BOR.reduceOp = dist.ReduceOp.BOR


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def setup(args, timeout_s: float = 600.0) -> bool:
    """Join torchrun's process group if the environment describes more than one process. True if
    distributed. Raises a clear error if the environment is half set up."""
    global _host_group
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
                           "torchrun (or `fg-train --nproc-per-node N`)")
    if not dist.is_initialized():
        device = args.device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    _host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return True


def agree_on_step(control, args, state) -> None:
    """The control flags of a step boundary (after on_step_end), agreed without waiting for the other ranks.

    A synchronous all-reduce here would cost every step 1.6-11 ms on a loaded CPU host (bench/
    control_agreement.py), far more than 1% of a 20 ms GPU step. So the flags are split in two:

    - rank-alike: what DefaultFlowCallback's step schedule sets at this step (log, evaluate and save steps,
      max_steps), which every rank computes from the same step count and arguments. They act now, on
      each rank, as in transformers, where no rank asks another: no collective at all.
    - votes: every other flag set now (`fg-bus ctl` and signals through BusCallback, JIT checkpointing, a
      callback's rule on rank-local data). They are cleared here, on the rank that raised them too, and
      sent in an all-reduce (a bitwise OR over ranks) started now, which gloo runs in its own threads
      while the next step trains; at the next step boundary, every rank waits for it (done by then,
      unless a rank lags) and ORs its result into its flags. So a vote acts one step later than it was raised,
      at the same step on every rank, and that step is the same whichever rank voted.

    An epoch's end and an evaluation agree synchronously (`agree_on_control`): they come once an epoch or
    an evaluation, and an evaluation's callbacks (early stopping) decide at its step, as in transformers.

    The votes travel as one int, a bit per flag, reduced with a bitwise OR, in one of two preallocated
    tensors (filled through a numpy view), issued on the process group directly: on most steps no flag
    is set, and a step costs the issue of one all-reduce and the wait for the last (bench/
    control_agreement.py: a tenth to a third of the synchronous path's time on the loaded 2-core VM).
    """
    global _pending
    if not is_distributed():
        return
    votes = 0
    if any(getattr(control, name, False) for name in _CONTROL_FLAGS):  # a log / save / ... step, or a vote
        scheduled = _scheduled_flags(args, state)
        for bit, name in enumerate(_CONTROL_FLAGS):
            if getattr(control, name, False) and name not in scheduled:
                votes |= 1 << bit
                setattr(control, name, False)  # not yet: every rank acts on it at the next boundary
    if not _vote_buffers:
        _vote_buffers.extend(torch.zeros(1, dtype=torch.int64) for _ in range(2))
    box = _vote_buffers[0] if _pending is None or _pending[1] is not _vote_buffers[0] else _vote_buffers[1]
    box.numpy()[0] = votes
    # The process group's own call: dist.all_reduce's wrapper (checks, logging) would double the cost.
    work = (_host_group or dist.group.WORLD).allreduce([box], _BOR)
    previous, _pending = _pending, (work, box)
    if previous is not None:
        _apply_votes(previous, control)


def agree_on_control(control) -> None:
    """Every rank ends up with the OR of all ranks' control flags (one small gloo all-reduce on the host,
    waited for), and with the votes of the last step boundary (`agree_on_step`), which act now."""
    global _pending
    if not is_distributed():
        return
    if _pending is not None:
        previous, _pending = _pending, None
        _apply_votes(previous, control)
    flags = torch.tensor([int(bool(getattr(control, name, False))) for name in _CONTROL_FLAGS], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_host_group)
    for name, value in zip(_CONTROL_FLAGS, flags.tolist()):
        setattr(control, name, bool(value))


def _apply_votes(pending, control) -> None:
    work, box = pending
    work.wait()
    votes = int(box.numpy()[0])
    if votes:
        for bit, name in enumerate(_CONTROL_FLAGS):
            if votes >> bit & 1:
                setattr(control, name, True)


def _scheduled_flags(args, state) -> set[str]:
    """The flags DefaultFlowCallback.on_step_end sets at this step: a function of the step count and the
    arguments alone, the same on every rank."""
    scheduled = DefaultFlowCallback().on_step_end(args, state, TrainerControl())
    return {name for name in _CONTROL_FLAGS if getattr(scheduled, name, False)}


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks, in place (a collective on the training device)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast(obj):
    """Rank 0's `obj`, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_host_group)


def teardown() -> None:
    """Leave the process group (at the end of training)."""
    global _host_group, _pending
    _pending = None  # votes of a train() that ended by an exception: nobody acts on them
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None
