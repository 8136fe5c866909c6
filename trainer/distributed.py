"""Running as one of several ranks under torchrun: PyTorch's own process group, nothing home-made.

`setup(args)` joins the process group torchrun describes in the environment (gloo on the CPU, nccl on
CUDA) and makes a second, gloo group for the small host-side agreements below, so they never add a device
sync to a GPU step. With one process (no WORLD_SIZE, or 1) every function here is a no-op.

    agree_on_step(control, args, state)
                                at every step boundary: the flags every rank computes alike (the step
                                schedule's log / evaluate / save / stop) act at once, with no collective;
                                any other flag is a rank's vote, sent in an all-reduce that runs while the
                                next steps train; the OR of the votes acts on every rank at the same step,
                                K to 2K-1 steps later (K agreed: about 100 ms of steps)
    agree_on_control(control)   at an epoch's end and after an evaluation: the OR of every rank's flags,
                                at once (a synchronous all-reduce), the pending votes included
    mean_over_ranks(tensor)     in place, on the training device (logging steps only)
    all_reduce(tensor, op, host=...)   every other all-reduce of the trainer's (token counts, flos, throughput)
    broadcast(obj)              rank 0's value on every rank (the run id)

The tensors gloo all-reduces here are remembered until the process exits, where `settle` (an atexit
handler) waits for gloo's worker threads to let go of them: see `settle`.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import logging
import os
import time

import torch
import torch.distributed as dist

from ._launch import MAX_VOTE_EVERY, vote_every_from_env
from .callbacks import DefaultFlowCallback
from .state import TrainerControl

logger = logging.getLogger(__name__)

_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log",
                  "should_abort")
_host_group = None  # gloo group for host-side agreement (the default group itself when it is gloo)
_pending = None  # (work, due step) of the votes' all-reduce in flight
_vote_box = None  # its one-int tensor: bits 0-5 the flags voted, bits 8-14 the K each rank asks for
_vote_view = None  # a numpy view of it
_held = 0  # the flags this rank voted since the last issue (bits as in _CONTROL_FLAGS)
_every = 1  # K, agreed: steps between the issue of an all-reduce of the votes and its wait
_issued = None  # (perf_counter, step) of the last issue: this rank's step time
_forced_every = None  # FG_CONTROL_VOTE_EVERY (0: auto), read at setup or at the first issue
_AUTO_INTERVAL_S = 0.1  # auto: agree about this often
_EVERY_SHIFT = 8
_recent: collections.deque = collections.deque(maxlen=16)  # the tensors of the latest all-reduces (`settle`)
_SETTLE_TIMEOUT_S = 5.0
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
    global _host_group, _forced_every
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    _reset_votes()  # each Trainer agrees on K anew
    _forced_every = vote_every_from_env()
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
    atexit.unregister(settle)
    atexit.register(settle)  # once, whoever made the process group
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
      callback's rule on rank-local data). They are cleared here, on the rank that raised them too, held,
      and sent in the next all-reduce of the votes (a bitwise OR over ranks). That all-reduce runs in
      gloo's own threads while the next steps train; K steps after it was issued, every rank waits for it
      (done by then, unless a rank lags), ORs its result into its flags and issues the next one. So a vote
      acts K to 2K-1 steps after it was raised, at the same step on every rank whichever rank voted.

    K (`_every`) is agreed in the same all-reduce: each rank asks for the smallest power of two K (1 to
    64) whose K steps last `_AUTO_INTERVAL_S` (100 ms) at its measured step time, one bit per choice, and
    the smallest asked for wins, on every rank alike from the same reduced int. Steps of 100 ms or more
    agree at every step (a vote acts at the next one); 20 ms steps every 8; 2 ms steps every 64. So a vote
    acts within about 200 ms whatever the step, and issuing the collective (0.3-1 ms on the loaded 2-core
    VM, where 2 ranks share the 2 cores with gloo's threads) costs about 0.4% of a 20 ms step
    (bench/control_agreement.py). `FG_CONTROL_VOTE_EVERY=N` (a power of two up to 64) fixes K instead; 1
    agrees at every step.

    An epoch's last step, its end and an evaluation agree synchronously (`agree_on_control`; the Trainer
    calls it in place of this at the epoch's or the run's last step, before its save): they come once an
    epoch or an evaluation, and an evaluation's callbacks (early stopping) decide at its step, as in
    transformers. The held votes go with them.
    """
    global _held
    if _pending is None and not is_distributed():
        return
    # Each flag of _CONTROL_FLAGS by name: a generator over them (any(getattr ...)) costs 4x this on the
    # first call after a step, when the interpreter's caches are cold (28 against 7 us on the VM).
    if (control.should_training_stop or control.should_epoch_stop or control.should_save or control.should_evaluate
            or control.should_log or control.__dict__.get("should_abort")):  # a log / save / ... step, or a vote
        scheduled = _scheduled_flags(args, state)
        for bit, name in enumerate(_CONTROL_FLAGS):
            if getattr(control, name, False) and name not in scheduled:
                _held |= 1 << bit
                setattr(control, name, False)  # not yet: every rank acts on it at the same later boundary
    if _pending is not None:
        if state.global_step < _pending[1]:
            return  # the common step: no collective, no wait
        _apply_votes(control)
    _issue_votes(state.global_step)


def agree_on_control(control) -> None:
    """Every rank ends up with the OR of all ranks' control flags (one small gloo all-reduce on the host,
    waited for), the votes held and in flight since `agree_on_step` included: they act now."""
    global _held
    if not is_distributed():
        return
    if _pending is not None:
        _apply_votes(control)
    _raise_flags(control, _held)
    _held = 0
    flags = torch.tensor([int(bool(getattr(control, name, False))) for name in _CONTROL_FLAGS], dtype=torch.int32)
    all_reduce(flags, dist.ReduceOp.MAX, host=True)
    for name, value in zip(_CONTROL_FLAGS, flags.tolist()):
        setattr(control, name, bool(value))


def _issue_votes(step: int) -> None:
    """Start the all-reduce of the held votes and of this rank's choice of K; it is due K steps from now."""
    global _held, _pending, _issued, _forced_every
    now = time.perf_counter()
    if _forced_every is None:
        _forced_every = vote_every_from_env()
    if _forced_every:
        wanted = _forced_every
    elif _issued is None or step <= _issued[1]:
        wanted = 1
    else:
        step_s = (now - _issued[0]) / (step - _issued[1])
        wanted = 1
        while wanted < MAX_VOTE_EVERY and wanted * step_s < _AUTO_INTERVAL_S:
            wanted *= 2
    if _vote_box is None:
        _make_vote_box()
    _vote_view[0] = _held | 1 << (_EVERY_SHIFT + wanted.bit_length() - 1)
    _held = 0
    # The process group's own call: dist.all_reduce's wrapper (checks, logging) would double the issue's cost.
    work = (_host_group or dist.group.WORLD).allreduce([_vote_box], _BOR)
    _pending, _issued = (work, step + _every), (now, step)


def _apply_votes(control) -> None:
    """Wait for the votes in flight, raise the flags any rank voted, and take the K agreed."""
    global _pending, _every
    _pending[0].wait()
    _pending = None
    reduced = int(_vote_view[0])
    _raise_flags(control, reduced)
    asked = reduced >> _EVERY_SHIFT
    if asked:
        _every = asked & -asked  # the smallest K any rank asked for


def _raise_flags(control, bits: int) -> None:
    """Set the flags of `bits` (a bit per flag of _CONTROL_FLAGS, in order); others are left as they are."""
    for bit, name in enumerate(_CONTROL_FLAGS):
        if bits >> bit & 1:
            setattr(control, name, True)


def _reset_votes() -> None:
    """No votes held or in flight, K not agreed yet, FG_CONTROL_VOTE_EVERY to be read again."""
    global _pending, _held, _every, _issued, _forced_every
    _pending, _held, _every, _issued, _forced_every = None, 0, 1, None, None


def _make_vote_box() -> None:
    global _vote_box, _vote_view
    _vote_box = torch.zeros(1, dtype=torch.int64)
    _vote_view = _vote_box.numpy()  # filled and read through numpy: no tensor op on the training thread


def _scheduled_flags(args, state) -> set[str]:
    """The flags DefaultFlowCallback.on_step_end sets at this step: a function of the step count and the
    arguments alone, the same on every rank."""
    scheduled = DefaultFlowCallback().on_step_end(args, state, TrainerControl())
    return {name for name in _CONTROL_FLAGS if getattr(scheduled, name, False)}


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks, in place (a collective on the training device)."""
    if is_distributed():
        all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce(tensor: torch.Tensor, op=None, *, host: bool = False) -> torch.Tensor:
    """`dist.all_reduce` in place (SUM unless `op`), on the training device's group, or with `host` on the
    gloo group for host values; the tensor is remembered for `settle` when gloo ran it (nccl's watchdog
    lets go of its works when `destroy_process_group` shuts it down)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=_host_group if host else None)
    if host or _host_group is None:  # _host_group is None: the training device's group is gloo itself
        _recent.append(tensor)
    return tensor


def settle(timeout_s: float = _SETTLE_TIMEOUT_S) -> None:
    """Wait, at most `timeout_s`, until the process group's worker threads hold none of the tensors of the
    latest all-reduces. A gloo worker drops its reference to a collective's tensors a moment after the
    collective completes, and for a tensor made in Python it takes the GIL to do so; if the interpreter is
    finalizing by then, that thread cannot have it and the process dies of SIGABRT ("terminate called
    without an active exception"), after a run that ended well. Seen on a loaded 2-core host, where the
    worker is descheduled for the few milliseconds between the last all-reduce (the final flos and
    throughput sums) and exit. Registered with atexit at `setup`: it runs before finalization, and the
    sleep releases the GIL to a worker waiting for it."""
    tensors = [*_recent] if _vote_box is None else [*_recent, _vote_box]  # the votes' box: every K steps
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors):
        if time.monotonic() >= deadline:
            logger.warning("%d tensors of the last all-reduces are still held after %.0f s; exiting anyway",
                           sum(t._use_count() > 1 for t in tensors), timeout_s)
            break
        time.sleep(0.001)
    _recent.clear()


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
    _reset_votes()  # votes of a train() that ended by an exception: nobody acts on them
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None
