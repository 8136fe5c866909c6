"""What publishing costs the training thread, per event, against the floor.

    python bench/hotpath.py [--events 100000] [--json FILE]

publish: `BusCallback` handling the events of a training step (on_step_begin, on_pre_optimizer_step,
         on_optimizer_step, on_step_end with the step's loss and grad norm as CPU tensors, on_log with
         five floats), timed call by call with perf_counter_ns on the calling thread, with the bus thread
         running (journal, PUB) as in a real run. Between steps the thread does the step's "compute": a
         torch matmul that releases the GIL as real kernels do (about 0.2 ms), so the bus thread drains
         the queue then, as it does in training.
floor:   the same records as bare `orjson.dumps(record)` plus a non-blocking send on a ZeroMQ PUB socket
         (no subscriber), timed the same way: what any JSON-over-ZeroMQ publisher pays at least.
handoff: the least a callback can do to hand an event over: `_BareHandoff`, the same five callback methods,
         each one `deque.append` of the event's tuple (clock, name, step, epoch, metrics: the logs copied,
         the step's three values read), nothing else, timed the same way. Right after the compute every
         call pays for cold caches (an empty call then costs microseconds on these machines, where a tight
         loop's append costs a few hundred ns), so this is the floor `publish` is held against.
The three sides run interleaved in blocks (A B C A B C ...), and each figure is the median (and p99) over
all calls; `publish_us_by_event` is the median of each event's calls.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit  # noqa: E402
from fg_bus import read_journal, records  # noqa: E402
from fg_bus.journal import journal_files  # noqa: E402
from trainer import TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from trainer.bus_callback import BusCallback  # noqa: E402


class _FakeTrainer:
    """What BusCallback reads at on_step_end from our Trainer: the step's loss and grad norm, still tensors,
    and this rank's wait for the step's batches (seconds)."""

    def __init__(self):
        self.step_loss = torch.tensor(2.345)
        self.step_grad_norm = torch.tensor(0.812)
        self.step_data_time = 0.00123456789


class _BareHandoff:
    """The callback that does nothing but hand each event over: no publisher, no checks, no bus thread."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.queue = collections.deque()

    def on_step_begin(self, args, state, control, **kwargs):
        self.queue.append((time.time(), "on_step_begin", state.global_step, state.epoch, None))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.queue.append((time.time(), "on_pre_optimizer_step", state.global_step, state.epoch, None))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.queue.append((time.time(), "on_optimizer_step", state.global_step, state.epoch, None))

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.queue.append((time.time(), "on_step_end", state.global_step, state.epoch, {
            "loss": trainer.step_loss, "grad_norm": trainer.step_grad_norm, "data_time": trainer.step_data_time}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.queue.append((time.time(), "on_log", state.global_step, state.epoch, dict(logs)))


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(n_events: int, block: int = 5000) -> dict:
    block = min(block, n_events)
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-bench-home-"))
    out_dir = tempfile.mkdtemp(prefix="fg-bench-")
    args = TrainingArguments(output_dir=out_dir, use_cpu=True)
    state, control = TrainerState(max_steps=n_events), TrainerControl()
    bus = BusCallback(run_name="bench-hotpath")
    bus.trainer = _FakeTrainer()
    bus.on_init_end(args, state, control)
    logs = {"loss": 2.3456, "grad_norm": 0.812, "learning_rate": 3e-4, "epoch": 0.25, "step_time": 0.0123}
    fresh_logs = [logs]  # the trainer builds a new logs dict for each on_log: made before the clock starts
    names = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log")
    # Each call as the CallbackHandler makes it (every event gets the same keyword arguments; logs here).
    mix = [getattr(bus, name) for name in names]

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind("inproc://floor")
    floor_records = [
        {"v": 1, "run": "bench", "rank": 0, "seq": 0, "timestamp": records.now(), "event": e, "global_step": 1,
         "epoch": 0.25, "metrics": m}
        for e, m in (("on_step_begin", {}), ("on_pre_optimizer_step", {}), ("on_optimizer_step", {}),
                     ("on_step_end", {"loss": 2.345, "grad_norm": 0.812}), ("on_log", logs))
    ]

    bare = _BareHandoff(bus.trainer)
    bare_mix = [getattr(bare, name) for name in names]

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    torch.set_num_threads(1)

    def compute():
        torch.mm(a, b)

    publish_ns: list[int] = []
    floor_ns: list[int] = []
    handoff_ns: list[int] = []
    clock = time.perf_counter_ns
    done = 0
    if n_events % block:
        raise ValueError(f"events ({n_events}) must be a multiple of the block ({block})")
    def callbacks(calls: list, out: list[int]) -> None:
        """One block of a step's events through `calls` (a matmul before each step), as the handler calls them."""
        for i in range(block):
            if i % len(calls) == 0:
                compute()
            state.global_step = done + i
            fresh_logs[0] = dict(logs)  # the trainer's fresh logs dict: its cost, not the callback's
            t0 = clock()
            calls[i % len(calls)](args, state, control, logs=fresh_logs[0])
            out.append(clock() - t0)

    while done < n_events:
        callbacks(mix, publish_ns)  # A: the publishing callback
        for i in range(block):  # B: the floor
            if i % len(floor_records) == 0:
                compute()
            record = floor_records[i % len(floor_records)]
            record["seq"] = done + i
            t0 = clock()
            pub.send_multipart([record["event"].encode(), orjson.dumps(record)], flags=zmq.NOBLOCK)
            floor_ns.append(clock() - t0)
        callbacks(bare_mix, handoff_ns)  # C: the bare hand-off
        bare.queue.clear()
        done += block

    t0 = time.perf_counter()
    bus.close()
    close_s = time.perf_counter() - t0
    pub.close()
    ctx.term()
    journal = next(Path(out_dir, "fg-bus").glob("*/journal.rank0.jsonl"))
    journal_records = sum(1 for _ in read_journal(journal))  # every segment: a long run's journal is sealed
    journal_bytes = sum(p.stat().st_size for p in journal_files(journal))
    overhead = min(-(clock() - clock()) for _ in range(1000))
    return {
        "events": n_events,
        "publish_us_median": statistics.median(publish_ns) / 1e3,
        "publish_us_p99": percentile(publish_ns, 0.99) / 1e3,
        "floor_us_median": statistics.median(floor_ns) / 1e3,
        "floor_us_p99": percentile(floor_ns, 0.99) / 1e3,
        "handoff_us_median": statistics.median(handoff_ns) / 1e3,
        "handoff_us_p99": percentile(handoff_ns, 0.99) / 1e3,
        "publish_us_by_event": {name: statistics.median(publish_ns[i::len(names)]) / 1e3
                                for i, name in enumerate(names)},
        "handoff_us_by_event": {name: statistics.median(handoff_ns[i::len(names)]) / 1e3
                                for i, name in enumerate(names)},
        "timer_overhead_us": overhead / 1e3,
        "journal_records": journal_records,
        "journal_bytes_per_record": journal_bytes / journal_records,
        "close_s": close_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events per side (default 100000)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    opts = p.parse_args(argv)
    if opts.events < 1000 or opts.events % 5:
        p.error("--events: a multiple of 5 (events per simulated step), at least 1000")
    figures = run(opts.events)
    rows = [
        ("publish (BusCallback, training thread)", figures["publish_us_median"], figures["publish_us_p99"]),
        ("floor (orjson.dumps + PUB send NOBLOCK)", figures["floor_us_median"], figures["floor_us_p99"]),
        ("handoff (a callback's bare deque.append)", figures["handoff_us_median"], figures["handoff_us_p99"]),
    ]
    print(f"{'per event, over ' + format(figures['events'], ',') + ' events':44} {'median us':>10} {'p99 us':>10}")
    for name, median, p99 in rows:
        print(f"{name:44} {median:10.2f} {p99:10.2f}")
    for side in ("publish", "handoff"):
        print(f"{side} median by event (us): " + ", ".join(f"{name} {us:.2f}"
                                                         for name, us in figures[f"{side}_us_by_event"].items()))
    print(f"ratio publish/floor (median): {figures['publish_us_median'] / figures['floor_us_median']:.2f}; "
          f"timer overhead {figures['timer_overhead_us']:.3f} us; journal {figures['journal_records']:,} records, "
          f"{figures['journal_bytes_per_record']:.0f} bytes each; close (end record, fsync) {figures['close_s']:.3f} s")
    return emit(figures, opts.json)


if __name__ == "__main__":
    sys.exit(main())
