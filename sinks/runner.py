"""The loop every sink process runs: attach to a run, feed the sink its records, finish cleanly.

A sink resumes where its output ends (its `open_run` says so) unless `--from` asks otherwise; a record
the sink cannot handle is skipped with a warning and counted; SIGINT/SIGTERM stop it cleanly after the
record in hand. One summary line per run: records handled, gaps repaired, malformed skipped, status.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass

from fg_bus import registry
from fg_bus.subscriber import Subscriber

from .base import Sink

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    status: str
    handled: int
    gaps_repaired: int
    malformed: int
    skipped: int

    def line(self, kind: str) -> str:
        return (f"fg-sink {kind}: run {self.run_id} {self.status}: {self.handled} records handled, "
                f"{self.gaps_repaired} gaps repaired, {self.malformed + self.skipped} malformed skipped")


class _Stop:
    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name


def follow_run(sink: Sink, info: registry.RunInfo, start: int | str, stop: _Stop, dead_after: float) -> RunSummary:
    """Feed one run to the sink. `start`: "start", "now" or a seq; the sink's own position wins for "start"."""
    position = sink.open_run(info)
    if start == "start":
        from_seq = position if position is not None else 0
    elif start == "now":
        from_seq = None
    else:
        from_seq = int(start)
    sub = Subscriber(str(info.bus_dir), from_seq=from_seq, dead_after=dead_after)
    handled = skipped = 0
    try:
        while not sub.finished and stop.signal is None:
            for record in sub.poll(0.5):
                try:
                    sink.handle(record)
                    handled += 1
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    skipped += 1
                    logger.warning("skipping record seq %s (%s): %s: %s", record.get("seq"), record.get("event"),
                                   type(e).__name__, e)
                if stop.signal is not None:
                    break
    finally:
        sub.close()
    status = sub.status or f"stopped by {stop.signal}"
    sink.end_run(status)
    return RunSummary(sub.run_id, status, handled, sub.stats.gaps_repaired, sub.stats.malformed_total, skipped)


def run_sink(sink: Sink, run: str = "latest", start: int | str = "start", follow: bool = False,
             wait: float | None = None, dead_after: float = 5.0) -> int:
    """The whole life of a sink process. Exit status: 0 when every run ended (completed, interrupted or
    failed: the output is complete), 3 when a trainer died, 130/143 when stopped by a signal."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    last_started: float | None = None  # None: the newest live run, else the first to start from now on
    try:
        while stop.signal is None:
            try:
                info = _attach(run, wait, started_after=last_started, stop=stop)
            except TimeoutError as e:
                print(f"fg-sink {sink.kind}: {e}", file=sys.stderr)
                return 4
            if info is None:
                break
            summary = follow_run(sink, info, start, stop, dead_after)
            print(summary.line(sink.kind), file=sys.stderr, flush=True)
            if summary.status == registry.DEAD:
                print(f"fg-sink {sink.kind}: the trainer of run {summary.run_id} stopped sending heartbeats and "
                      "its journal ends without an end record: the run died", file=sys.stderr)
                code = 3
            last_started = info.data.get("started", 0) + 1e-6
            if not follow:
                break
            run, start = "latest", "start"
    finally:
        sink.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.signal is not None:
        return 128 + getattr(signal, stop.signal)
    return code


def _attach(run: str, wait: float | None, started_after: float | None, stop: _Stop) -> registry.RunInfo | None:
    """Resolve the run; for `latest`, wait (checking for signals) until a run newer than the last starts."""
    if run != "latest":
        info = registry.resolve(run)
        if info is None:
            raise registry.RunNotFound(f"no run {run!r}")
        return info
    info = registry.resolve("latest")
    if info is None or (started_after is not None and info.data.get("started", 0) < started_after):
        print("fg-sink: waiting for a run to start (fg-train publishes one)", file=sys.stderr, flush=True)
    return registry.wait_for_run("latest", wait, started_after=started_after,
                                 should_stop=lambda: stop.signal is not None)
