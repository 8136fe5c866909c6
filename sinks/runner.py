"""The loop every sink process runs: attach to a run, feed the sink its records, finish cleanly.

A sink resumes where its output ends (its `open_run` says so) unless `--from` asks otherwise; a record
the sink cannot handle is skipped with a warning and counted; SIGINT/SIGTERM stop it cleanly after the
record in hand. One summary line per run: how the run ended and why (`fg_bus.records.describe_end`: "stopped:
`fg-bus ctl stop` from alice@gpu1 ..."), records handled, gaps repaired, malformed skipped.

A full disk (ENOSPC, a quota, a file-size limit) is said once, naming the file; the sink keeps the record in
hand and tries again every second until there is room, then carries on (a signal still stops it). Any
other write error ends the sink with status 8 and the command that resumes it. An output another sink
holds, or one that cannot be used, ends it at once with the output named (7, 2): see `_output`.

A sink with `raw = True` (`fg-sink json`) gets `handle_raw(lines, rank, first_seq, last_seq)` from a raw
Subscriber instead of `handle(record)`: a replayed chunk of journal lines at a time, counted as its records;
a full disk, a signal and a write error go as for one record.

A torchrun job has one stream per rank. A sink follows the ranks its `ranks` attribute names ("0", "all",
or a list such as "0,2"), each stream in its own seq order, interleaved as records arrive; the run is over
when every followed rank has ended or died.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

from fg_bus import registry
from fg_bus.monitor import end_text
from fg_bus.subscriber import Subscriber

from ._output import EXIT_WRITE_FAILED, OutputError, is_disk_full, printable
from .base import Sink

logger = logging.getLogger(__name__)

#: seconds between tries to write a record held after a full disk
RETRY_SECONDS = 1.0
_SHOWN_HOLES = 5


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
    holes: int = 0  # records missing from the stream for good (a garbled or emptied journal, a seq jump)
    hole_ranges: list[tuple[int, int]] = field(default_factory=list)
    reason: dict | None = None  # why the run ended (the end record's `reason`, or what the follower saw)

    def ended(self, ranks: str = "") -> str:
        """"stopped: `fg-bus ctl stop` from alice@gpu1 (pid 12) at step 40" (`ranks`, each rank's status, after
        the status); for a sink stopped before the run's end, "not followed to its end (the sink was stopped by
        SIGTERM)"."""
        if self.status in registry.END_STATUSES:
            return end_text(self.status + ranks, self.reason)
        return f"not followed to its end (the sink was {self.status}){ranks}"

    def line(self, kind: str) -> str:
        ranks = ""
        if self.rank_status and len(self.rank_status) > 1:
            ranks = " (" + ", ".join(f"rank {r} {s}" for r, s in sorted(self.rank_status.items())) + ")"
        lost = f", {self.lost} LOST (the trainer's journal failed)" if self.lost else ""
        holes = ""
        if self.holes:
            shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.hole_ranges[:_SHOWN_HOLES])
            more = ", ..." if len(self.hole_ranges) > _SHOWN_HOLES else ""
            holes = f", {self.holes} MISSING for good (seq {shown}{more}: the journal lacks them)"
        return printable(f"fg-sink {kind}: run {self.run_id} {self.ended(ranks)}; {self.handled} records handled, "
                         f"{self.gaps_repaired} gaps repaired, {self.malformed + self.skipped} malformed skipped"
                         f"{lost}{holes}")

    @property
    def incomplete(self) -> bool:
        return bool(self.lost or self.holes)

    @property
    def dead_ranks(self) -> list[int]:
        return sorted(r for r, s in (self.rank_status or {}).items() if s in (registry.DEAD, MISSING))


MISSING = "missing"  # a rank the run's world size promises that never registered


class _Stop:
    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name


class WriteFailed(Exception):
    """A sink's write failed for a reason other than a full disk: the sink stops, its output kept."""

    def __init__(self, error: OSError, record: dict | None):
        super().__init__(str(error))
        self.error = error
        self.record = record


def _say(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)


def _sleep(seconds: float, stop: _Stop) -> bool:
    """Sleep, waking for a signal; True if one asked the sink to stop."""
    deadline = time.monotonic() + seconds
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return stop.signal is not None


def _write(sink: Sink, action, retry, stop: _Stop, record: dict | None = None) -> bool:
    """Run `action` (a sink call that writes). On a full disk, say so once and call `retry` every
    RETRY_SECONDS until it goes through (True) or a signal stops the sink (False, the record still held).
    Any other OSError raises WriteFailed."""
    try:
        action()
        return True
    except OSError as e:
        if not is_disk_full(e):
            raise WriteFailed(e, record) from e
        error = e
    if stop.signal is not None:
        return False  # already stopping: close() says what could not be written
    where = error.filename or f"the {sink.kind} sink's output"
    _say(f"fg-sink {sink.kind}: cannot write {where}: {error.strerror or error} (no room); holding the record and "
         f"trying again every {RETRY_SECONDS:g} s until there is room (Ctrl-C stops it: restarted, the sink "
         "continues where its output ends)")
    waited = time.monotonic()
    while not _sleep(RETRY_SECONDS, stop):
        try:
            retry()
        except OSError as e:
            if not is_disk_full(e):
                raise WriteFailed(e, record) from e
            continue
        _say(f"fg-sink {sink.kind}: {where} has room again after {time.monotonic() - waited:.0f} s: continuing")
        return True
    return False


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
    try:
        position = sink.open_run(info)
    except OutputError:
        raise
    except OSError as e:  # a user sink's own file; ours say more themselves
        raise OutputError(f"cannot open the {sink.kind} sink's output for run {info.run_id}: {e}") from None
    positions = position if isinstance(position, dict) else {0: position}
    raw = bool(getattr(sink, "raw", False))
    subs: dict[int, Subscriber] = {}
    rank_status: dict[int, str] = {}
    for rank in ranks:
        if start == "start":
            from_seq = positions.get(rank) or 0
        else:
            from_seq = None if start == "now" else int(start)
        try:
            subs[rank] = Subscriber(str(info.bus_dir), from_seq=from_seq, dead_after=dead_after, rank=rank,
                                    rank_wait=rank_wait, raw=raw)
        except registry.RunNotFound as e:
            logger.error("%s", e)
            rank_status[rank] = MISSING
    handled = skipped = 0
    held = False  # a signal stopped the sink while it held a record it could not write (a full disk)
    retry_write = getattr(sink, "retry_write", None)
    try:
        while stop.signal is None:
            following = [sub for sub in subs.values() if not sub.finished]
            if not following:
                break
            for sub in following:
                for record in sub.poll(0.5 / len(following)):
                    if raw:  # RawLines: first_seq..last_seq of this rank, as bytes
                        handle = lambda lines=record, rank=sub.rank: sink.handle_raw(  # noqa: E731
                            lines.data, rank, lines.first_seq, lines.last_seq)
                        count = record.last_seq - record.first_seq + 1
                        at = {"rank": sub.rank, "seq": record.first_seq, "event": f"through seq {record.last_seq}"}
                    else:
                        handle = lambda record=record: sink.handle(record)  # noqa: E731
                        count, at = 1, record
                    try:
                        if _write(sink, handle, retry_write or handle, stop, at):
                            handled += count
                        else:
                            held = True
                    except (KeyError, TypeError, ValueError, AttributeError) as e:
                        skipped += count
                        logger.warning("skipping record rank %s seq %s (%s): %s: %s", at.get("rank"),
                                       at.get("seq"), at.get("event"), type(e).__name__, e)
                    if stop.signal is not None:
                        break
                if stop.signal is not None:
                    break
    finally:
        for sub in subs.values():
            sub.close()
    rank_reason: dict[int, dict | None] = {r: {"text": f"rank {r} never registered"} for r in rank_status}
    for rank, sub in subs.items():
        rank_status[rank] = f"stopped by {stop.signal}" if held else sub.status or f"stopped by {stop.signal}"
        rank_reason[rank] = None if held else sub.end_reason
    status, reason = _overall(rank_status, rank_reason, ranks)
    end = lambda: call_end_run(sink.end_run, status, reason)  # noqa: E731
    _write(sink, end, end, stop)
    stats = [s.stats for s in subs.values()]
    return RunSummary(info.run_id, status, handled, sum(s.gaps_repaired for s in stats),
                      sum(s.malformed_total for s in stats), skipped, rank_status, sum(s.lost for s in stats),
                      sum(s.holes for s in stats), sorted(r for s in stats for r in s.hole_ranges), reason)


def _overall(rank_status: dict[int, str], rank_reason: dict[int, dict | None],
             ranks: list[int]) -> tuple[str, dict | None]:
    """The run's status as a sink saw it, and why: dead if any followed rank died (or never came), with the
    first such rank's reason, else the first followed rank's (rank 0's: completed, stopped, interrupted,
    failed, or "stopped by SIGTERM": the sink itself was)."""
    dead = [r for r in ranks if rank_status.get(r) in (registry.DEAD, MISSING)]
    if dead:
        reason = rank_reason.get(dead[0])
        if isinstance(reason, dict) and len(ranks) > 1:
            reason = {**reason, "text": f"rank {dead[0]}: {reason.get('text')}"}
        return registry.DEAD, reason
    return rank_status[ranks[0]], rank_reason.get(ranks[0])


def call_end_run(hook, status: str, reason: dict | None) -> None:
    """`hook(status, reason)`, a sink's `end_run`; one that takes the status alone (a sink written before the
    reason came) gets just that."""
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): the status alone
        params = []
    if len(params) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        hook(status, reason)
    else:
        hook(status)


def run_sink(sink: Sink, run: str = "latest", start: int | str = "start", follow: bool = False,
             wait: float | None = None, dead_after: float = 5.0, argv: list[str] | None = None) -> int:
    """The whole life of a sink process. Exit status: 0 when every run ended (completed, stopped, interrupted
    or failed: the output is complete), 3 when a trainer died, 5 when records are missing from the output (the
    trainer could not journal them and this sink missed them live, or its journal has holes), 2 when the
    output cannot be used, 7 when another sink holds it, 8 when a write failed (not for a full disk: that
    waits for room), 130/143 when stopped by a signal. `argv`: the command's arguments, for the resume
    command printed after a failed write."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    last_started: float | None = None  # None: the newest live run, else the first to start from now on
    try:
        while stop.signal is None:
            try:
                info = _attach(run, wait, started_after=last_started, stop=stop)
            except TimeoutError as e:
                _say(f"fg-sink {sink.kind}: {e}")
                return 4
            if info is None:
                break
            try:
                summary = follow_run(sink, info, start, stop, dead_after)
            except OutputError as e:
                _say(f"fg-sink {sink.kind}: error: {e}")
                return e.status
            except WriteFailed as e:
                if isinstance(e.error, BrokenPipeError):  # its reader went away (`| head`): end quietly, as cat
                    _stdout_to_devnull()
                    return 0
                _say(_write_failed(sink.kind, e, info, argv))
                return EXIT_WRITE_FAILED
            print(summary.line(sink.kind), file=sys.stderr, flush=True)
            if summary.status == registry.DEAD:
                which = "the trainer" if len(summary.rank_status or {}) <= 1 else \
                    "rank " + ", ".join(map(str, summary.dead_ranks))
                _say(f"fg-sink {sink.kind}: {which} of run {summary.run_id} stopped sending heartbeats (or never "
                     "started) and its journal ends without an end record: the run died")
                code = 3
            elif summary.incomplete:
                code = 5  # the output is missing records: say so in the exit status too
            last_started = info.data.get("started", 0) + 1e-6
            if not follow:
                break
            run, start = "latest", "start"
    finally:
        _close(sink)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.signal is not None:
        return 128 + getattr(signal, stop.signal)
    return code


def _stdout_to_devnull() -> None:
    """After a broken pipe: what is still buffered for stdout goes nowhere, so the interpreter's flush at
    exit does not print a BrokenPipeError of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to quiet
        pass


def _close(sink: Sink) -> None:
    """Close the sink; bytes it could not write (the disk still full when a signal stopped it) are said, not
    raised: a restarted sink continues where its output ends."""
    try:
        sink.close()
    except OSError as e:
        _say(f"fg-sink {sink.kind}: could not write the last records to {e.filename or 'its output'}: "
             f"{e.strerror or e}; started again, the sink continues where its output ends")


def _write_failed(kind: str, failure: WriteFailed, info: registry.RunInfo, argv: list[str] | None) -> str:
    e, record = failure.error, failure.record
    at = f" (at rank {record.get('rank')} seq {record.get('seq')}, {record.get('event')})" if record else ""
    return (f"fg-sink {kind}: cannot write {e.filename or 'its output'}{at}: {e.strerror or e}; stopped with the "
            f"output as far as it got. Fix that, then resume (it continues where its output ends): "
            f"{resume_command(kind, info, argv)}")


def resume_command(kind: str, info: registry.RunInfo, argv: list[str] | None) -> str:
    """This sink's command for this run: its arguments without --run/--from, then --run RUN_DIR."""
    kept, args = [], list(argv if argv is not None else [kind])
    while args:
        arg = args.pop(0)
        if arg in ("--run", "--from"):
            args[:1] = []
        elif not arg.startswith(("--run=", "--from=")):
            kept.append(arg)
    return shlex.join(["fg-sink", *kept, "--run", str(info.bus_dir)])


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
