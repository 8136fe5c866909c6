"""Following a run: live records plus catch-up from the journal, in seq order, each exactly once.

The Clone pattern: connect SUB first, then ask the replay endpoint for everything from the seq we need,
apply it, and drop live records we already have. A hole in the live seq (a record dropped for a slow
subscriber) or a heartbeat announcing records we never saw triggers another replay. The `end` record
finishes the stream with the run's status; silence past `dead_after` seconds finishes it as `dead`, after
reading whatever the journal still holds. A run that is over is read straight from its journal file.

    for record in Subscriber("latest"):      # waits for a run to start if none is live
        ...

With `raw=True` it hands out `RawLines` instead of dicts: the records' encoded lines, for a sink that stores
them as they are (`fg-sink json`). Lines that pass `records.raw_run_length`'s check on their bytes (head,
run, rank, the seq expected, a well-formed line) are passed through unparsed, a replayed chunk at a time;
the rest (out of order, the `end` record, anything that looks unusual) takes the decoding path, with its
checks and reasons, and comes out as `records.encode` writes it: the same bytes either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple

import orjson
import zmq

from . import records, registry, security
from .journal import JournalStats, decode_chunk, journal_chunks, read_journal

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
_REPLY_BATCH = 4096  # records taken from replay replies per poll() before returning them
_SEQ, _EVENT = itemgetter("seq"), itemgetter("event")
_HEARTBEAT_TOPIC = records.HEARTBEAT.encode()


class RawLines(NamedTuple):
    """Records first_seq..last_seq of one rank, in order, as `data`: their encoded lines, each ending
    with a newline (what a raw Subscriber hands out)."""

    first_seq: int
    last_seq: int
    data: bytes


@dataclass
class SubscriberStats:
    """Records received live and by replay; those received twice count as duplicates, so the records
    delivered are live + replayed - duplicates."""

    live: int = 0
    replayed: int = 0
    duplicates: int = 0
    gaps_repaired: int = 0
    lost: int = 0  # records the trainer could neither journal nor deliver here live (its disk failed)
    malformed: dict[str, int] = field(default_factory=dict)
    #: Records missing for good (not live, not in the journal: a garbled or emptied journal), and their
    #: inclusive (first, last) seq ranges; the stream goes on past them.
    holes: int = 0
    hole_ranges: list[tuple[int, int]] = field(default_factory=list)
    paused_s: float = 0.0  # time spent waiting on a trainer that was silent but alive (stopped, suspended)

    def count_malformed(self, reason: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class Subscriber:
    """Follow one rank's records of a run (rank 0 by default). `run`: "latest", a run id, or a directory.

    from_seq: the first seq wanted (0: the whole history; None: from now on).
    events: deliver only these event names (the `end` record always comes through).
    wait: seconds to wait for a live run when `run` is "latest" and none is live (None: forever).
    dead_after: seconds without a heartbeat before the trainer is declared dead.
    rank: which rank's stream (each rank of a torchrun job publishes its own); rank_wait: seconds to wait
    for a rank that has not registered yet.
    raw: hand out `RawLines` (encoded lines) instead of dicts; every event (no `events` filter).
    """

    def __init__(self, run: str | registry.RunInfo = "latest", *, from_seq: int | None = 0,
                 events: Iterable[str] | None = None, wait: float | None = None, dead_after: float = 5.0,
                 rank: int = 0, rank_wait: float = 30.0, raw: bool = False):
        if raw and events:
            raise ValueError("a raw Subscriber hands out every record: filter by event on the decoded path")
        self.raw = raw
        self.spec = run
        self.events = frozenset(events) if events else None
        self.dead_after = dead_after
        self.rank = rank
        self.stats = SubscriberStats()
        self.status: str | None = None  # set when the stream is over: completed / stopped / interrupted / failed / dead
        #: why it ended (records.end_reason: `text`, and by status who stopped it, the signal, the exception)
        self.end_reason: dict | None = None
        if isinstance(run, registry.RunInfo):
            info = run
        else:
            info = registry.wait_for_run(run, wait) if run == "latest" else registry.resolve(run)
        self.info = info.for_rank(rank, wait=rank_wait) if rank else info
        self._head = records.raw_head(self.info.run_id, rank)  # every line of this stream starts so
        self._paused_since: float | None = None  # silent past dead_after, but the trainer's pid is alive
        self._next_liveness_check = 0.0
        self._reload_warned = False
        self._expected = from_seq
        self._buffer: dict[int, dict] = {}
        self._replaying = False
        self._end_waiting_since: float | None = None  # the end record arrived, but records before it did not
        self._ctx: zmq.Context | None = None
        self._journal_iter: Iterator[dict] | None = None
        self._journal_stats = JournalStats()
        if self.info.is_live:
            self._connect()
        else:
            self._open_journal(self._expected or 0)

    @property
    def finished(self) -> bool:
        return self.status is not None

    @property
    def caught_up(self) -> bool:
        """True once the history asked for has been replayed (no replay in flight)."""
        return not self._replaying and self._expected is not None

    @property
    def run_id(self) -> str:
        return self.info.run_id

    # -- set-up ----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        endpoints = self.info.ranks.get(str(self.rank))
        if endpoints is None or "pub" not in endpoints or "replay" not in endpoints:
            raise registry.RunNotFound(f"run {self.info.run_id} has no endpoints for rank {self.rank} in "
                                       f"{self.info.bus_dir / registry.rank_file(self.rank)}")
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._dealer = self._ctx.socket(zmq.DEALER)
        server_key = self.info.data.get("curve_server_key")
        for sock in (self._sub, self._dealer):
            sock.linger = 0
            sock.maxmsgsize = MAX_MESSAGE_BYTES
            if server_key:
                security.make_client(sock, server_key.encode())
        self._sub.rcvhwm = 200_000
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")  # every event: filtering here would look like holes in seq
        self._sub.connect(endpoints["pub"])
        self._dealer.connect(endpoints["replay"])
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._dealer, zmq.POLLIN)
        self._last_heard = time.monotonic()
        self._request_replay(self._expected)

    def _open_journal(self, from_seq: int) -> None:
        path = self.info.journal_path(self.rank)
        if not path.exists():
            self._journal_iter = iter(())
        elif self.raw:
            self._journal_iter = self._raw_journal(path, from_seq)
        else:
            self._journal_iter = read_journal(path, from_seq, self._journal_stats)

    def _raw_journal(self, path, from_seq: int) -> Iterator[RawLines | dict]:
        """The journal's files read for a raw Subscriber: a piece of whole lines that is exactly the next
        seqs passes through as one RawLines (the byte check of `records.raw_run_length`); any other piece
        (the first, which may start before `from_seq`; the end record's; a garbled line; the live segment
        read again after a seal) is decoded and its records go the careful way, one by one."""
        expected = from_seq
        for chunk, _live in journal_chunks(path, from_seq, self._journal_stats):
            n = records.raw_run_length(chunk, self._head, expected)
            if n:
                expected += n
                self._journal_stats.records += n
                yield RawLines(expected - n, expected - 1, chunk)
                continue
            for record in decode_chunk(chunk, self._journal_stats):
                if record["seq"] >= expected:
                    expected = record["seq"] + 1
                    self._journal_stats.records += 1
                    yield record

    def _request_replay(self, from_seq: int | None) -> None:
        """Ask for the journal from `from_seq`; None asks only where "now" is (the next seq)."""
        request = {"op": "position"} if from_seq is None else {"op": "replay", "from": from_seq}
        self._dealer.send(orjson.dumps(request))
        self._replaying = True

    # -- reading ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        try:
            while not self.finished:
                yield from self.poll(0.5)
        finally:
            self.close()

    def poll(self, timeout: float = 0.5) -> list[dict]:
        """Records that are ready, in order (waits up to `timeout` s for the first). [] once finished."""
        if self.finished:
            return []
        if self._journal_iter is not None:
            return self._poll_journal()
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while not self.finished:
            remaining = max(0.0, deadline - time.monotonic())
            events = dict(self._poller.poll(int(remaining * 1000)))
            if self._dealer in events:
                self._take_replies(out)
            if self._sub in events:
                self._take_live(out)
            if self._end_waiting_since is not None and time.monotonic() - self._end_waiting_since > 0.5:
                # The trainer has ended and will answer no more replays: the journal has the rest.
                self._finish_from_journal(out, "the run ended with records still missing here")
                break
            if out or time.monotonic() >= deadline:
                break
            if self._check_silence(out):
                break
        if not self.finished:
            self._check_silence(out)
        return out

    def _check_silence(self, out: list[dict]) -> bool:
        """Past `dead_after` s without a word from the trainer, ask its run file whether it is gone: a pid
        that still exists on this host is a stopped (or suspended) trainer, followed on; a gone pid (or,
        elsewhere, a run file not written for registry.STALE_AFTER s) is dead, and the rest is read from the
        journal. True when the stream was finished here."""
        now = time.monotonic()
        silent = now - self._last_heard
        if silent <= self.dead_after or now < self._next_liveness_check:
            return False
        self._next_liveness_check = now + min(0.5, self.dead_after)
        info = self._reload()
        if info.is_live:
            if self._paused_since is None:
                self._paused_since = self._last_heard
                pid = info.data.get("pid")
                if info.is_local:
                    logger.warning("run %s: trainer pid %s is alive but silent for %.0f s: paused? still following",
                                   info.run_id, pid, silent)
                else:
                    logger.warning("run %s: the trainer (pid %s on %s) is silent for %.0f s but its run file is "
                                   "fresh: still following", info.run_id, pid, info.data.get("host"), silent)
            return False
        self._finish_from_journal(out, f"no heartbeat for {silent:.1f} s")
        return True

    def _heard(self) -> None:
        """A message from the trainer: it is not silent (any more)."""
        self._last_heard = time.monotonic()
        if self._paused_since is not None:
            self._end_pause("the trainer is sending again")

    def _end_pause(self, why: str) -> None:
        waited = time.monotonic() - self._paused_since
        self.stats.paused_s += waited
        self._paused_since = None
        logger.warning("run %s: %s after %.1f s of silence", self.info.run_id, why, waited)

    def _reload(self) -> registry.RunInfo:
        """The run file read again; the last one read if it is gone or broken now (said once)."""
        try:
            return self.info.reload()
        except registry.RunNotFound as e:
            if not self._reload_warned:
                logger.warning("run %s: %s; going on with what it said before", self.info.run_id, e)
                self._reload_warned = True
            return self.info

    def _poll_journal(self, batch: int = 10_000) -> list[dict]:
        out = []
        for record in self._journal_iter:
            if type(record) is RawLines:  # a raw Subscriber's run of the next seqs, checked on its bytes
                self._expected = record.last_seq + 1
                out.append(record)
                self.stats.replayed += record.last_seq - record.first_seq + 1
                if len(out) >= batch:
                    self._merge_journal_stats()
                    return out
                continue
            seq = record["seq"]
            if self._expected is not None and seq != self._expected:
                if seq < self._expected:
                    continue
                self._missing(self._expected, seq - 1, "not in the journal: a line garbled or removed")
            self._deliver(record, out)
            self.stats.replayed += 1
            if self.finished or len(out) >= batch:
                self._merge_journal_stats()
                return out
        # The journal is exhausted without an end record: the trainer died (or is dying).
        self._merge_journal_stats()
        if not self.finished:
            info = self._reload()
            dead = info.status in (registry.LIVE, registry.STALLED, registry.PAUSED, registry.DEAD, registry.UNKNOWN)
            self.status = registry.DEAD if dead else info.data.get("status")
            self.end_reason = (info.end_reason or records.end_reason("its journal ends without an end record while "
                                                                     f"its run.json says {info.status}")
                               if dead else info.data.get("reason"))
            last_seq = info.data.get("last_seq")
            self._expected = self._expected or 0
            if type(last_seq) is int and last_seq >= self._expected:
                if info.data.get("journal_error"):
                    self._skip_lost(last_seq + 1)  # the run went on after its journal failed: the rest is gone
                else:  # emptied or cut short after the fact: run.json saw the trainer write further
                    self._missing(self._expected, last_seq, f"the journal ends before seq {last_seq}, the last "
                                  f"one {registry.rank_file(self.rank)} records")
                    self._expected = last_seq + 1
        return out

    def _merge_journal_stats(self) -> None:
        for reason, n in self._journal_stats.malformed.items():
            self.stats.malformed[reason] = self.stats.malformed.get(reason, 0) + n
        self._journal_stats.malformed.clear()

    def _missing(self, first: int, last: int, why: str, lost: bool = False) -> None:
        """Records first..last will never come (nothing holds them any more): count them, say so, go on."""
        if lost:
            self.stats.lost += last - first + 1
        else:
            self.stats.holes += last - first + 1
            self.stats.hole_ranges.append((first, last))
        logger.error("run %s rank %d: records %d..%d are missing for good (%s); going on without them",
                     self.info.run_id, self.rank, first, last, why)

    def _give_up_below(self, next_seq: int, lost_from: int | None, out: list[dict]) -> None:
        """A replay has sent everything the journal holds below `next_seq`: whatever is still missing there
        is not in the journal (garbled, emptied) and no other replay will bring it."""
        while self._expected is not None and self._expected < next_seq and not self.finished:
            resume = min([s for s in self._buffer if s > self._expected] + [next_seq])
            lost = type(lost_from) is int and self._expected >= lost_from
            self._missing(self._expected, resume - 1, "lost with the trainer's journal" if lost else
                          "not in the journal: a line garbled, or the file emptied or cut", lost=lost)
            self._expected = resume
            self._flush_buffer(out)

    def _take_replies(self, out: list[dict]) -> None:
        while len(out) < _REPLY_BATCH:  # hand records to the caller in batches: memory freed is memory reused
            try:
                parts = self._dealer.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard()
            if len(parts) != 2:
                self.stats.count_malformed("frame-count")
                continue
            kind, body = parts
            if kind == b"chunk":
                self._take_chunk(body, out)
            elif kind == b"done":
                self._replaying = False
                try:
                    reply = orjson.loads(body)
                    next_seq, lost_from = int(reply["next_seq"]), reply.get("lost_from")
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.stats.count_malformed("bad-reply")
                    self._request_replay(self._expected)
                    continue
                if self._expected is None:  # "from now": start at the trainer's next seq
                    self._expected = next_seq
                elif type(lost_from) is int and lost_from <= self._expected < next_seq:
                    self._skip_lost(next_seq)
                self._flush_buffer(out)
                self._give_up_below(next_seq, lost_from, out)
            elif kind == b"error":
                logger.error("replay refused by the trainer: %r", body[:200])
                self._replaying = False
            else:
                self.stats.count_malformed("unknown-reply")

    def _take_chunk(self, body: bytes, out: list) -> None:
        """One replayed chunk of journal lines: passed through as it is when raw and it is exactly the next
        seqs; else decoded, and delivered at once if it is the next seqs, record by record if not."""
        first = self._expected
        if self.raw and first is not None:
            n = records.raw_run_length(body, self._head, first)
            if n:
                self.stats.replayed += n
                self._pass_raw(first, n, body, out)
                return
        stats = JournalStats()
        chunk = decode_chunk(body, stats)
        self.stats.replayed += len(chunk)
        if not self._deliver_run(chunk, out):
            for record in chunk:
                self._accept(record, out)
        for reason, n in stats.malformed.items():
            self.stats.malformed[reason] = self.stats.malformed.get(reason, 0) + n

    def _take_raw_live(self, parts: list[bytes], out: list) -> bool:
        """A live record passed through unparsed (raw, and it is the next seq, and its line passes the byte
        check with its topic as its event); False: it takes the decoding path."""
        first = self._expected
        if len(parts) != 2 or first is None or parts[0] == _HEARTBEAT_TOPIC:
            return False
        topic, data = parts
        line = data + b"\n"
        if records.raw_run_length(line, self._head, first) != 1 or b'","event":"%s"' % topic not in data:
            return False
        self.stats.live += 1
        self._pass_raw(first, 1, line, out)
        return True

    def _pass_raw(self, first: int, n: int, data: bytes, out: list) -> None:
        """Hand out `data`, the n lines of seqs first.., as they are; then whatever was buffered behind them."""
        self._expected = first + n
        out.append(RawLines(first, first + n - 1, data))
        if self._buffer:
            self._flush_buffer(out)

    def _take_live(self, out: list[dict]) -> None:
        for _ in range(10_000):
            try:
                parts = self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            if self._paused_since is not None:
                self._end_pause("the trainer is sending again")
            if self.raw and self._take_raw_live(parts, out):
                continue
            try:
                record = records.parse_frames(parts)
            except records.RecordError as e:
                self.stats.count_malformed(e.reason)
                if self.stats.malformed_total <= 10:
                    logger.warning("skipping a malformed message: %s", e)
                continue
            if record["run"] != self.info.run_id or record["rank"] != self.rank:
                self.stats.count_malformed("other-run")
                continue
            if record["event"] == records.HEARTBEAT:
                self._heartbeat(record)
                continue
            self.stats.live += 1
            self._accept(record, out)

    def _heartbeat(self, beat: dict) -> None:
        next_seq = beat["seq"]
        if self._expected is not None and next_seq > self._expected and not self._replaying:
            self.stats.gaps_repaired += 1
            self._request_replay(self._expected)  # records we never saw (a dropped tail)

    def _accept(self, record: dict, out: list[dict]) -> None:
        seq = record["seq"]
        if self._expected is None:  # waiting to learn where "now" is
            if seq in self._buffer:
                self.stats.duplicates += 1
            self._buffer[seq] = record
            return
        if seq < self._expected or seq in self._buffer:
            self.stats.duplicates += 1
        elif seq == self._expected:
            self._deliver(record, out)
            self._flush_buffer(out)
        else:
            self._buffer[seq] = record
            if record["event"] == records.END:
                self._end_waiting_since = time.monotonic()
            if not self._replaying:
                self.stats.gaps_repaired += 1
                self._request_replay(self._expected)

    def _deliver_run(self, chunk: list[dict], out: list[dict]) -> bool:
        """Deliver a replayed chunk at once if it is exactly the next seqs (the usual case); False (nothing
        done) otherwise, and the chunk goes record by record through `_accept`."""
        first = self._expected
        if not chunk or first is None or chunk[0]["seq"] != first:
            return False
        if list(map(_SEQ, chunk)) != list(range(first, first + len(chunk))):
            return False
        if records.END in map(_EVENT, chunk):
            chunk = chunk[:list(map(_EVENT, chunk)).index(records.END) + 1]  # nothing after it is the stream's
            self._ended(chunk[-1])
        self._expected = chunk[-1]["seq"] + 1
        if self.raw:
            out.extend(RawLines(r["seq"], r["seq"], records.encode(r) + b"\n") for r in chunk)
        elif self.events is None:
            out.extend(chunk)
        else:
            wanted = self.events
            out.extend(record for record in chunk if record["event"] in wanted or record["event"] == records.END)
        if self._buffer and self.status is None:
            self._flush_buffer(out)
        return True

    def _skip_lost(self, next_seq: int) -> None:
        """The trainer's journal failed and the records from `_expected` on were never on disk: the ones
        missed live are gone. Count them, say so, and go on with what did arrive."""
        resume = min(self._buffer) if self._buffer else next_seq
        self.stats.lost += resume - self._expected
        logger.error("run %s: records %d..%d are lost (the trainer's journal could not be written and they "
                     "did not arrive live)", self.info.run_id, self._expected, resume - 1)
        self._expected = resume

    def _flush_buffer(self, out: list[dict]) -> None:
        while self._expected in self._buffer:
            self._deliver(self._buffer.pop(self._expected), out)
        for seq in [s for s in self._buffer if s < self._expected]:
            del self._buffer[seq]
            self.stats.duplicates += 1

    def _deliver(self, record: dict, out: list) -> None:
        seq = self._expected = record["seq"] + 1
        if record["event"] == records.END:
            self._ended(record)
        elif self.events is not None and record["event"] not in self.events:
            return
        out.append(RawLines(seq - 1, seq - 1, records.encode(record) + b"\n") if self.raw else record)

    def _ended(self, end: dict) -> None:
        self.status = end.get("status", registry.COMPLETED)
        reason = end.get("reason")
        self.end_reason = reason if isinstance(reason, dict) else None

    def _finish_from_journal(self, out: list[dict], why: str) -> None:
        """Live delivery is over (trainer silent, or ended with a gap here): finish from the journal file."""
        if self._paused_since is not None:
            self._end_pause("the trainer is gone")
        info = self._reload()
        deadline = time.monotonic() + 5.0
        while (info.status in (registry.LIVE, registry.STALLED) and self._end_waiting_since is not None
               and time.monotonic() < deadline):
            time.sleep(0.05)  # the trainer is closing: its final status follows the journal's last flush
            info = self._reload()
        logger.warning("run %s: %s (status: %s); reading the rest from its journal", info.run_id, why, info.status)
        self._close_sockets()
        self.info = info
        self._buffer.clear()
        self._open_journal(self._expected or 0)
        out.extend(self._poll_journal(batch=1 << 62))
        if not self.finished:
            self.status = registry.DEAD
            self.end_reason = records.end_reason(f"{why}, and its journal ends without an end record")

    # -- end -------------------------------------------------------------------------------------------

    def _close_sockets(self) -> None:
        if self._ctx is not None:
            self._sub.close(linger=0)
            self._dealer.close(linger=0)
            self._ctx.term()
            self._ctx = None

    def close(self) -> None:
        self._close_sockets()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
