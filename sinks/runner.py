"""The loop every sink process runs: attach to a run, feed the sink its records, finish cleanly.

A sink resumes where its output ends (its `open_run` says so) unless `--from` asks otherwise; a record
the sink cannot handle is skipped with a warning and counted; SIGINT/SIGTERM stop it cleanly after the
record in hand. One summary line per run: records handled, gaps repaired, malformed skipped, status.

A torchrun job has one stream per rank. A sink follows the ranks its `ranks` attribute names ("0", "all",
or a list such as "0,2"), each stream in its own seq order, interleaved as records arrive; the run is over
when every followed rank has ended or died.
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
    rank_status: dict[int, str] | None = None  # with several ranks followed: each one's status
    lost: int = 0  # records neither journaled by the trainer (its disk failed) nor received live

    def line(self, kind: str) -> str:
        ranks = ""
        if self.rank_status and len(self.rank_status) > 1:
            ranks = " (" + ", ".join(f"rank {r} {s}" for r, s in sorted(self.rank_status.items())) + ")"
        lost = f", {self.lost} LOST (the trainer's journal failed)" if self.lost else ""
        return (f"fg-sink {kind}: run {self.run_id} {self.status}{ranks}: {self.handled} records handled, "
                f"{self.gaps_repaired} gaps repaired, {self.malformed + self.skipped} malformed skipped{lost}")

    @property
    def dead_ranks(self) -> list[int]:
        return sorted(r for r, s in (self.rank_status or {}).items() if s in (registry.DEAD, MISSING))


MISSING = "missing"  # a rank the run's world size promises that never registered


class _Stop:
    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name


def ranks_to_follow(spec: str, info: registry.RunInfo) -> list[int]:
    """"0", "all" (every rank of the run's world size) or a comma list, checked against the world size."""
    if spec == "all":
        return list(range(info.world_size))
    try:
        ranks = sorted({int(r) for r in str(spec).split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"ranks {spec!r}: expected 0, all, or a comma list such as 0,2") from None
    bad = [r for r in ranks if not 0 <= r < info.world_size]
    if bad or not ranks:
        raise ValueError(f"ranks {spec!r}: run {info.run_id} has ranks 0..{info.world_size - 1}")
    return ranks


def follow_run(sink: Sink, info: registry.RunInfo, start: int | str, stop: _Stop, dead_after: float,
               rank_wait: float = 30.0) -> RunSummary:
    """Feed one run to the sink. `start`: "start", "now" or a seq (for every rank); the sink's own
    position wins for "start" (an int for rank 0, or a dict by rank)."""
    ranks = ranks_to_follow(getattr(sink, "ranks", "0"), info)
    position = sink.open_run(info)
    positions = position if isinstance(position, dict) else {0: position}
    subs: dict[int, Subscriber] = {}
    rank_status: dict[int, str] = {}
    for rank in ranks:
        if start == "start":
            from_seq = positions.get(rank) or 0
        else:
            from_seq = None if start == "now" else int(start)
        try:
            subs[rank] = Subscriber(str(info.bus_dir), from_seq=from_seq, dead_after=dead_after, rank=rank,
                                    rank_wait=rank_wait)
        except registry.RunNotFound as e:
            logger.error("%s", e)
            rank_status[rank] = MISSING
    handled = skipped = 0
    try:
        while stop.signal is None:
            following = [sub for sub in subs.values() if not sub.finished]
            if not following:
                break
            for sub in following:
                for record in sub.poll(0.5 / len(following)):
                    try:
                        sink.handle(record)
                        handled += 1
                    except (KeyError, TypeError, ValueError, AttributeError) as e:
                        skipped += 1
                        logger.warning("skipping record rank %s seq %s (%s): %s: %s", record.get("rank"),
                                       record.get("seq"), record.get("event"), type(e).__name__, e)
                    if stop.signal is not None:
                        break
                if stop.signal is not None:
                    break
    finally:
        for sub in subs.values():
            sub.close()
    for rank, sub in subs.items():
        rank_status[rank] = sub.status or f"stopped by {stop.signal}"
    status = _overall(rank_status, ranks)
    sink.end_run(status)
    return RunSummary(info.run_id, status, handled, sum(s.stats.gaps_repaired for s in subs.values()),
                      sum(s.stats.malformed_total for s in subs.values()), skipped, rank_status,
                      sum(s.stats.lost for s in subs.values()))


def _overall(rank_status: dict[int, str], ranks: list[int]) -> str:
    """The run's status as a sink saw it: dead if any followed rank died (or never came), else the first
    followed rank's (rank 0's: completed, interrupted, failed, or stopped by a signal)."""
    if any(s in (registry.DEAD, MISSING) for s in rank_status.values()):
        return registry.DEAD
    return rank_status[ranks[0]]


def run_sink(sink: Sink, run: str = "latest", start: int | str = "start", follow: bool = False,
             wait: float | None = None, dead_after: float = 5.0) -> int:
    """The whole life of a sink process. Exit status: 0 when every run ended (completed, interrupted or
    failed: the output is complete), 3 when a trainer died, 5 when records were lost (the trainer could not
    journal them and this sink missed them live), 130/143 when stopped by a signal."""
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
                which = "the trainer" if len(summary.rank_status or {}) <= 1 else \
                    "rank " + ", ".join(map(str, summary.dead_ranks))
                print(f"fg-sink {sink.kind}: {which} of run {summary.run_id} stopped sending heartbeats (or never "
                      "started) and its journal ends without an end record: the run died", file=sys.stderr)
                code = 3
            elif summary.lost:
                code = 5  # the output is missing records: say so in the exit status too
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
