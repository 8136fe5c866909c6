"""Running as one of several ranks under torchrun: PyTorch's own process group, nothing home-made.

`setup(args)` joins the process group torchrun describes in the environment (gloo on the CPU, nccl on
CUDA) and makes a second, gloo group for the small host-side agreements below, so they never add a device
sync to a GPU step. With one process (no WORLD_SIZE, or 1) every function here is a no-op.

    agree_on_control(control)   the OR of every rank's stop / save / evaluate / log / epoch-stop flags,
                                applied on every rank, so a request raised on any one rank (a callback,
                                `fg-bus ctl`, a signal) takes effect everywhere at the same step
    mean_over_ranks(tensor)     in place, on the training device (logging steps only)
    broadcast(obj)              rank 0's value on every rank (the run id)
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log",
                  "should_abort")
_host_group = None  # gloo group for host-side agreement (the default group itself when it is gloo)


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


def agree_on_control(control) -> None:
    """Every rank ends up with the OR of all ranks' control flags (one small gloo all-reduce on the host)."""
    if not is_distributed():
        return
    flags = torch.tensor([int(bool(getattr(control, name, False))) for name in _CONTROL_FLAGS], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_host_group)
    for name, value in zip(_CONTROL_FLAGS, flags.tolist()):
        setattr(control, name, bool(value))


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
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None
