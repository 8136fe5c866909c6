"""The publishing side: a cheap, never-blocking `publish()` for the training thread, and a bus thread that
owns every socket and the journal.

Training thread: one tuple of what the event gave (the clock as `time.time()`, the event, step, epoch,
metrics, extra fields) appended to a deque: no record dict, no timestamp formatting, no encoding, no seq, no
lock, no socket, no file, no wait (well under 1 us in a tight loop). `deque.append` is atomic under the GIL,
so several publishing threads need no lock: the queue's order is the records' order.

Bus thread, in a loop: take queued entries in order, give each the next seq (0, 1, 2, ... in queue order,
the bus's own records included: no hole, no reordering), build and encode the record (orjson), write them
into the journal (append-only) and out on PUB; answer replay requests on ROUTER by streaming journal chunks;
take control commands and sink results from the PULL inbox;
publish a heartbeat (carrying the next seq, so subscribers notice a missed tail) every second; flush the
journal every 100 ms. On close: the `end` record, fsync, run.json status, sockets closed with a bounded
linger.

Beside the stream, two duties read nothing but what goes through it: `_stall` watches the trainer events as
they are drained (run.json's `progress`, and a `warning` record when training stops making progress:
`stall_after`), and `_system` samples the host and this rank's GPUs in a thread of its own every
`system_interval` seconds, which the bus thread publishes as `system` records.

The bus thread must not die of a peer or of the file system: every socket has a message size limit and
high-water marks, replays are bounded per client and in all (`_replay`), the inbox hears only trusted peers
and never takes trainer events from a sink (`_inbox`), a deleted journal is restored from its open handle,
and an unexpected error in one loop iteration is logged, counted (`bus_errors`), published as a `warning`
and survived. If records are lost all the same, `incomplete` says why, and the end record and run.json say so.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from . import _encode, _inbox, _sockets, records, registry, security
from ._inbox import CONTROL_COMMANDS  # noqa: F401 - part of this module's API (fg-bus ctl's choices)
from ._replay import ReplayService
from ._sockets import INBOX_MAX_BYTES  # noqa: F401 - likewise
from ._stall import Progress, StallDetector
from ._system import SystemSampler
from .journal import JournalWriter

logger = logging.getLogger(__name__)

#: Loop iterations in a row that fail before the bus thread gives up (training is told through `incomplete`).
MAX_CONSECUTIVE_ERRORS = 20
#: Unexpected errors published as `warning` records; later ones are only counted.
MAX_ERROR_WARNINGS = 10
_POLL_MS = 5
_BATCH = 1024
#: Records queued for the bus thread beyond which publish() waits for it to catch up (to half of this):
#: memory stays bounded even when events come faster than the journal's disk takes them. A training loop
#: publishes tens of events per step and never gets near it.
MAX_QUEUED = 100_000
_SENTINEL = object()
_NO_FIELDS: dict = {}  # the extra fields of a record that has none (read, never written, by the bus thread)


def seconds_option(owner: str, name: str, value: Any) -> float:
    """A duration option (`system_interval`, `stall_after`): a finite number of seconds >= 0, 0 for off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{owner}: {name} must be a number of seconds >= 0 (0: off), got {value!r}")
    return float(value)


class Publisher:
    """One rank's publisher. `start()`, then `publish(...)` from the training thread, then `close(status)`."""

    def __init__(self, bus_dir: str | os.PathLike, run_id: str, *, rank: int = 0, world_size: int = 1,
                 name: str | None = None, tcp: str | None = None, heartbeat_interval: float = 1.0,
                 flush_interval: float = 0.1, linger_ms: int = 1000, insecure: bool = False,
                 system_interval: float = 0.0, gpus: list[int | str] | None = None,
                 stall_after: float | None = 120.0):
        """`system_interval`: seconds between `system` records (0: none); `gpus`: the GPUs this rank uses, as
        NVML indices or UUIDs (see `_system.NvmlProbe`; empty for a CPU run). `stall_after`: seconds without a
        trainer event, while training, before the run is `stalled` (at least 10 median step times; 0 or
        None: never)."""
        system_interval = seconds_option("Publisher", "system_interval", system_interval)
        stall_after = seconds_option("Publisher", "stall_after", stall_after or 0.0)
        self.bus_dir = Path(bus_dir)
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.name = name or run_id
        self.tcp = tcp
        self.insecure = insecure  # tcp beyond loopback without CURVE keys, asked for by name
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.linger_ms = linger_ms
        self.system_interval = system_interval
        self.gpus = list(gpus or [])
        self.sampler: SystemSampler | None = None
        self.progress = Progress()
        self.stall = StallDetector(stall_after, check_every=heartbeat_interval)
        self._queue: collections.deque = collections.deque()
        #: control commands (dicts) waiting for the training thread, oldest first: the inbox appends, and
        #: `control_requests()` takes them; truthy while any waits (what a step boundary checks)
        self.control_queue: collections.deque = collections.deque()
        self._lock = threading.Lock()  # close() against close() and the bus thread's death; publish() takes none
        self._seq = 0  # the next record's seq: the bus thread's alone, given as it drains the queue
        self._ended = False  # the bus thread has drained the end record: anything queued later is dropped
        self._closed = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.endpoints: dict[str, str] = {}
        self.status = registry.RUNNING
        self.end_reason: dict | None = None  # why it ended (records.end_reason), set by close()
        self.last_step = 0
        self.journal_error: str | None = None
        self.lost_from: int | None = None  # after a journal write error: the first seq not on disk
        self.info: registry.RunInfo | None = None
        self.received: collections.Counter = collections.Counter()  # records sinks sent in, by event
        self._encode_errors: set[str] = set()
        self.rejected: collections.Counter = collections.Counter()  # messages refused on replay / inbox, by reason
        self.stalls = 0  # times publish() waited for the bus thread (MAX_QUEUED), and for how long in all
        self.stalled_s = 0.0
        self.bus_errors = 0  # unexpected errors the bus thread survived
        self._loopback_only = False  # tcp without CURVE: the inbox hears loopback peers only
        self._journal_lost: str | None = None  # the journal's file was deleted and could not be restored
        self._died: str | None = None  # why the bus thread stopped before close()
        self._dead = False  # the bus thread is gone: publish() queues nothing more
        self._final_written = False  # the bus thread wrote run.json's final status
        self._status_write_failed = False

    @property
    def incomplete(self) -> str | None:
        """None while every record published is in the journal and on the stream; otherwise why not."""
        reasons = []
        if self.journal_error is not None:
            reasons.append(f"the journal could not be written from seq {self.lost_from} on ({self.journal_error})")
        reasons += [r for r in (self._journal_lost, self._died) if r]
        return "; ".join(reasons) or None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "Publisher":
        security.check_tcp(self.tcp, self.insecure)
        registry.private_dir(self.bus_dir)
        self._thread = threading.Thread(target=self._run, name=f"fg-bus-rank{self.rank}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the bus thread did not come up within {timeout:g} s")
        if self._start_error is not None:
            raise RuntimeError(f"could not start the bus: {self._start_error}") from self._start_error
        atexit.register(self._close_at_exit)
        return self

    def close(self, status: str = registry.COMPLETED, timeout: float = 10.0, reason: dict | None = None) -> None:
        """Publish the `end` record with `status` and `reason` (records.end_reason: why it ended; and
        `incomplete`, if records were lost), flush and sync the journal, close the sockets. Idempotent. If
        the bus thread is gone, writes run.json's final status."""
        with self._lock:
            if self._closed:
                return
            self.end_reason = reason or records.end_reason(status)
            self._closed = True  # before the end record is queued: publish() queues nothing after it
            self.status = status
            if not self._dead:  # its global_step and `incomplete` are the bus thread's, once it gets there
                self._queue.append((None, (time.time(), records.END, {"status": status, "reason": self.end_reason})))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._died = self._died or (f"the bus thread did not finish within {timeout:g} s; the journal may "
                                            "lack the last records")
                logger.error("%s", self._died)
        if not self._final_written:
            self._write_final_status(status)
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        # The interpreter is exiting without close(): training did not reach its end.
        self.close(registry.FAILED, timeout=5.0,
                   reason=records.end_reason("the process exited without ending the run"))

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the training thread's side -----------------------------------------------------------------------

    def publish(self, event: str, global_step: int | None = None, epoch: float | None = None,
                metrics: dict | None = None, **extra: Any) -> bool:
        """Hand one record to the bus; False (nothing queued) once closed, or once the bus thread is gone.
        Never blocks on I/O.

        The bus thread gives the record its seq (the queue's order is the stream's order) and builds and
        encodes it a few milliseconds later, so `metrics` is copied (one level) here; do not change the
        values inside it afterwards. A value that cannot be encoded is logged, and the record goes out at
        its seq with empty metrics and an `error` naming the key."""
        if self._closed or self._dead:  # dead: nothing would take it
            return False
        queue = self._queue
        queue.append((ready_now, (time.time(), event, global_step, epoch, dict(metrics) if metrics else None, extra)))
        if len(queue) > MAX_QUEUED:
            self._wait_for_room()
        return True

    def publish_when_ready(self, ready: Callable[[], bool], event: str, global_step: int | None = None,
                           epoch: float | None = None, metrics: dict | None = None, **extra: Any) -> bool:
        """Like publish() without the copy of `metrics` (the caller hands over a dict it never touches
        again), and the bus thread encodes the record only once `ready()` is true: for values still being
        copied off the device (a CUDA event's `query`). The order (so the seq) and the timestamp are fixed
        now: records behind it wait for it."""
        if self._closed or self._dead:
            return False
        queue = self._queue
        queue.append((ready, (time.time(), event, global_step, epoch, metrics, extra)))
        if len(queue) > MAX_QUEUED:
            self._wait_for_room()
        return True

    def publish_step_event(self, event: str, global_step: int, epoch: float | None, metrics: dict | None = None) -> bool:
        """publish() for the events of every step (on_step_begin, on_pre_optimizer_step, on_log, ...): the
        same record, without the keyword dict and the copy that publish() pays per call (a few hundred ns
        each on the caches a step leaves). `metrics` is handed over, not copied: do not touch it again."""
        if self._closed or self._dead:
            return False
        queue = self._queue
        queue.append((ready_now, (time.time(), event, global_step, epoch, metrics, _NO_FIELDS)))
        if len(queue) > MAX_QUEUED:
            self._wait_for_room()
        return True

    def _wait_for_room(self) -> None:
        """Backpressure, the one wait on the publishing side: the bus thread is MAX_QUEUED records behind.
        Counted in `stalls` / `stalled_s`, logged the first time."""
        t0 = time.monotonic()
        if not self.stalls:
            logger.warning("the bus thread is %d records behind (the journal's disk cannot keep up with the "
                           "events); publishing waits for it to catch up", len(self._queue))
        while (len(self._queue) > MAX_QUEUED // 2 and not self._dead and self._thread is not None
               and self._thread.is_alive()):
            time.sleep(0.001)
        self.stalls += 1
        self.stalled_s += time.monotonic() - t0

    @property
    def has_control_requests(self) -> bool:
        return bool(self.control_queue)

    def control_requests(self) -> list[dict]:
        """Control commands received since the last call (training thread, at a step boundary)."""
        out = []
        while self.control_queue:
            out.append(self.control_queue.popleft())
        return out

    def request_control(self, cmd: str, source: str) -> None:
        """Queue a control command from inside the process (a signal handler)."""
        self.control_queue.append({"cmd": cmd, "id": f"local-{len(self.control_queue)}", "source": source})

    def sync(self) -> None:
        """Ask the bus thread to fsync the journal (at checkpoints); returns at once."""
        self._queue.append(_SENTINEL)

    def _publish_from_bus(self, event: str, fields: dict) -> None:
        """Queue the bus's own record (`fields`: every key after `event`, as given); it takes its seq in line."""
        if not self._closed:
            self._queue.append((None, (time.time(), event, fields)))

    # -- the bus thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()
        socks: list[zmq.Socket] = []
        journal = None
        auth = None
        try:
            journal = JournalWriter(self.bus_dir / f"journal.rank{self.rank}.jsonl")
            pub, router, pull = (ctx.socket(t) for t in (zmq.PUB, zmq.ROUTER, zmq.PULL))
            socks = [pub, router, pull]
            _sockets.limit(pub, router, pull, self.linger_ms)
            server_keys = security.server_keys() if self.tcp is not None else None
            self._loopback_only = self.tcp is not None and server_keys is None
            if server_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(security.authorized_dir()))
                for s in socks:
                    security.make_server(s, server_keys)
            sockets_dir = registry.socket_dir(self.run_id) if self.tcp is None else None
            self.endpoints = {kind: _sockets.bind(s, kind, self.tcp, sockets_dir, curve=server_keys is not None)
                              for kind, s in (("pub", pub), ("replay", router), ("inbox", pull))}
            self.info = registry.RunInfo(self.bus_dir, {
                "run_id": self.run_id, "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "status": registry.RUNNING, "world_size": self.world_size,
                "ranks": {str(self.rank): {**self.endpoints, "pid": os.getpid()}},
                "curve_server_key": server_keys.public.decode() if server_keys else None,
                "sockets_dir": str(sockets_dir) if sockets_dir else None,
                "rank": self.rank, "last_seq": -1, "last_step": 0, "heartbeat": time.time(),
                "stalled_since": None, "progress": self.progress.summary(),
            }, self.rank)
            registry.write_json_atomic(self.bus_dir / registry.rank_file(self.rank), self.info.data)
            if self.rank == 0:
                registry.register(self.info)
        except BaseException as e:  # reported to start() in the training thread
            self._start_error = e
            for s in socks:
                s.close(linger=0)
            if journal is not None:
                journal.close()
            ctx.term()
            self._ready.set()
            return
        self._start_sampler()
        self._ready.set()
        try:
            self._loop(journal, pub, router, pull)
        except BaseException as e:  # noqa: BLE001 - the thread is going: say why, to training and in run.json
            self._bus_died(e, journal.next_seq)
        finally:
            if self.sampler is not None:
                self.sampler.close()
            journal.close()
            self.info.data["last_seq"] = journal.next_seq - 1
            closed = self._closed
            self._write_final_status(self.status if closed else registry.FAILED)
            self._final_written = closed
            for s in socks:
                s.close()
            if auth is not None:
                auth.stop()
            ctx.term()
            if sockets_dir is not None:
                for kind in ("pub", "replay", "inbox"):
                    (sockets_dir / kind).unlink(missing_ok=True)
                try:
                    sockets_dir.rmdir()
                except OSError:
                    pass

    def _start_sampler(self) -> None:
        if self.system_interval <= 0:
            return
        try:
            self.sampler = SystemSampler(self.system_interval, self.bus_dir, self.gpus,
                                         name=f"fg-bus-system-rank{self.rank}").start()
        except Exception as e:  # noqa: BLE001 - no thread to be had: no system records, the stream goes on
            self.sampler = None
            self._bus_error(e, "starting the system sampler")

    def _bus_died(self, error: BaseException, next_seq: int) -> None:
        with self._lock:
            self._dead = True
            self._queue.clear()  # nothing will journal or send these; publish() queues no more
        self._died = (f"the bus thread stopped ({type(error).__name__}: {error}): records from seq {next_seq} on "
                      "are neither in the journal nor on the stream")
        logger.critical("%s", self._died, exc_info=error)

    def _write_final_status(self, status: str) -> None:
        """run.json's last word: the status, and `incomplete` when records were lost."""
        if self.info is None:
            return
        self.info.data.update(status=status, reason=self.end_reason, ended=time.time(), last_step=self.last_step, stalled_since=None,
                              progress=self.progress.summary(), journal_error=self.journal_error,
                              incomplete=self.incomplete,
                              bus_errors=self.bus_errors, rejected=dict(self.rejected))
        try:
            registry.write_json_atomic(self.bus_dir / registry.rank_file(self.rank), self.info.data)
        except OSError as e:
            logger.error("could not write the final status to %s: %s", self.bus_dir, e)

    def _loop(self, journal: JournalWriter, pub, router, pull) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        replays = ReplayService(router, self._reject, self._bus_error)
        next_heartbeat = next_flush = time.monotonic()
        failures = 0
        while True:
            try:
                self._drain(journal, pub)
                if self._stop.is_set() and not self._queue:
                    break
                # Wake every few ms and drain in batches rather than per record: each wake-up takes the GIL
                # from the training thread, so fewer, larger batches cost it less (live latency under ~5 ms).
                busy = replays.sendable or len(self._queue) > _BATCH
                events = dict(poller.poll(0 if busy else (1 if replays.active else _POLL_MS)))
                if router in events:
                    replays.take_requests(journal, lambda: self._catch_up(journal, pub))
                if pull in events:
                    self._take_inbox(pull)
                if self.sampler is not None and self.sampler.ready:  # {"metrics": ..., "gpus": ...}
                    self._publish_from_bus("system", {"global_step": self.last_step, **self.sampler.take()})
                replays.pump()
                now = time.monotonic()
                if now >= next_flush:
                    next_flush = now + self.flush_interval
                    self._flush(journal)
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_interval
                    self._heartbeat(pub, journal)
                failures = 0
            except Exception as e:  # noqa: BLE001 - a peer or the file system must not end the stream
                failures += 1
                self._bus_error(e, "the bus loop")
                if failures >= MAX_CONSECUTIVE_ERRORS:
                    raise
                time.sleep(min(0.005 * 2 ** failures, 0.5))  # a persistent fault: do not spin on it

    def _bus_error(self, error: BaseException, where: str) -> None:
        """An unexpected error in the bus thread, survived: logged (the first few with a traceback), counted in
        `bus_errors`, published as a `warning` record (the first MAX_ERROR_WARNINGS)."""
        self.bus_errors += 1
        text = f"{type(error).__name__}: {error}"
        if self.bus_errors <= 3:
            logger.error("bus thread: unexpected error in %s (the bus goes on): %s", where, text, exc_info=error)
        if self.bus_errors <= MAX_ERROR_WARNINGS:
            self._publish_from_bus("warning", {"message": f"the bus thread met an unexpected error in {where} "
                                                          f"and went on: {text}", "error": text,
                                               "bus_errors": self.bus_errors, "global_step": self.last_step})

    def _catch_up(self, journal: JournalWriter, pub) -> int | None:
        """Before a replay is served: everything published so far into the journal. Returns `lost_from`."""
        while self._drain(journal, pub):
            pass
        return self.lost_from

    def _drain(self, journal: JournalWriter, pub) -> int:
        """Journal every queued record, flush once, then send them live: a subscriber never holds a record
        the journal would lose if this process were killed now (the kernel has it after the flush)."""
        batch = []
        if self._ended:  # published by another thread while the end went out: as if after close()
            self._queue.clear()
        while self._queue:
            item = self._queue[0]
            if item is _SENTINEL:
                self._queue.popleft()
                self._flush(journal, durable=True)
                continue
            # Each record takes its seq here, in queue order: the stream's order is the order of publishing.
            ready, fields = item
            event = fields[1]
            if ready is None:  # the bus's own record (_publish_from_bus, close)
                data = self._encode_bus_record(self._seq, fields)
            else:  # from publish(): encoded once its values are ready
                data = self._encode_when_ready(ready, self._seq, fields)
                if data is None:
                    break  # look again on the next loop; records behind it wait, keeping seq order
                if fields[2] is not None:
                    self.last_step = fields[2]
            self._seq += 1
            self._queue.popleft()
            self._journal_append(journal, data)
            batch.append((event, data))
            if ready is not None and event.startswith("on_"):
                self._observe(event, fields)
            if event == records.END and ready is None:
                self._ended = True
                break
            if len(batch) >= _BATCH:
                break
        if not batch:
            return 0
        self._flush(journal)
        for event, data in batch:
            try:
                pub.send_multipart(records.frames(event, data), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # PUB drops for a subscriber over its HWM; it repairs the gap from the journal
        return len(batch)

    def _observe(self, event: str, fields: tuple) -> None:
        """A trainer event, encoded (its values are on the host): progress, and the end of a stall."""
        try:
            self.progress.observe(event, fields)
            cleared = self.stall.progress(event, fields[2], time.monotonic())
        except Exception as e:  # noqa: BLE001 - a summary must not cost the stream
            self._bus_error(e, f"reading the progress of a {event} record")
            return
        if cleared is not None:
            logger.warning("%s", cleared["message"])
            self._publish_from_bus("warning", cleared)

    def _check_stall(self, now: float) -> None:
        stalled = self.stall.check(now, self.progress.median_step_s)
        if stalled is not None:
            logger.warning("%s", stalled["message"])
            self._publish_from_bus("warning", stalled)

    def _encode_when_ready(self, ready: Callable[[], bool], seq: int, fields: tuple) -> bytes | None:
        """The encoded record, or None while its values are not ready. Never raises: a value whose copy or
        conversion fails goes out at its seq with an `error`, so one bad record cannot stop the stream."""
        try:
            if not ready():
                if not self._stop.is_set():
                    return None
                _wait_until(ready, timeout=5.0)
            data = self._encode_queued(seq, fields)
            release = getattr(ready, "release", None)
            if release is not None:
                release()  # the values are encoded: their buffers may be reused
            return data
        except Exception as e:  # noqa: BLE001 - see the docstring
            self._bus_error(e, f"encoding record seq {seq}")
            return _encode.error_record(self.run_id, self.rank, seq, fields,
                                        f"cannot encode the record: {type(e).__name__}: {e}")

    def _journal_append(self, journal: JournalWriter, data: bytes) -> None:
        if journal.failed is not None:
            journal.append(data)  # keeps the offsets; nothing is written after a failure
            return
        try:
            journal.append(data)
        except OSError as e:
            self._journal_failed(journal, e)

    def _journal_failed(self, journal: JournalWriter, error: OSError) -> None:
        """The journal cannot be written (disk full, quota, I/O error): training goes on and records go on
        live; say so once, in the log and as a `warning` record, and remember from which seq replay cannot
        serve (a subscriber asking for those is told they are lost)."""
        self.journal_error = f"{type(error).__name__}: {error}"
        self.lost_from = journal.complete_on_disk()
        message = (f"journal {journal.path} could not be written ({self.journal_error}); records from seq "
                   f"{self.lost_from} on are sent live only, and a sink that misses them live cannot get them back")
        logger.error("%s", message)
        self._publish_from_bus("warning", {"message": message, "journal_error": self.journal_error,
                                           "lost_from": self.lost_from, "global_step": self.last_step})

    def _encode_bus_record(self, seq: int, fields: tuple) -> bytes:
        """The bus's own record; the end record gets here what the stream ended at: the last step drained,
        and `incomplete` if records were lost on the way. Never raises (see _encode_when_ready)."""
        timestamp, event, values = fields
        if event == records.END:
            values = {**values, "global_step": self.last_step}
            if self.incomplete is not None:
                values["incomplete"] = self.incomplete
        try:
            return _encode.bus_record(self.run_id, self.rank, seq, timestamp, event, values)
        except Exception as e:  # noqa: BLE001 - one bad record cannot stop the stream
            self._bus_error(e, f"encoding record seq {seq}")
            return _encode.error_record(self.run_id, self.rank, seq, (timestamp, event, values.get("global_step"),
                                                                      values.get("epoch")),
                                        f"cannot encode the record: {type(e).__name__}: {e}")

    def _encode_queued(self, seq: int, fields: tuple) -> bytes:
        try:
            return _encode.queued_record(self.run_id, self.rank, seq, fields)
        except records.EncodeError as e:
            if str(e) not in self._encode_errors:  # once per distinct error, not once per step
                self._encode_errors.add(str(e))
                logger.error("record %s seq %d could not be encoded (published without its metrics): %s",
                             fields[1], seq, e)
            return _encode.error_record(self.run_id, self.rank, seq, fields, str(e))

    def _flush(self, journal: JournalWriter, durable: bool = False) -> None:
        if journal.failed is not None:
            return
        try:
            journal.sync() if durable else journal.flush()
        except OSError as e:
            self._journal_failed(journal, e)

    def _heartbeat(self, pub, journal: JournalWriter) -> None:
        now = time.monotonic()
        self._check_stall(now)
        beat = {"v": records.SCHEMA_VERSION, "run": self.run_id, "rank": self.rank, "seq": journal.next_seq,
                "timestamp": records.now(), "event": records.HEARTBEAT, "global_step": self.last_step}
        stalled_for = self.stall.stalled_for(now)
        if stalled_for is not None:
            beat["stalled_for"] = stalled_for
        try:
            pub.send_multipart(records.frames(records.HEARTBEAT, records.encode(beat)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._check_journal_path(journal)
        self.info.data.update(last_seq=journal.next_seq - 1, last_step=self.last_step, heartbeat=time.time(),
                              stalled_since=self.stall.stalled_since(now), progress=self.progress.summary(),
                              journal_error=self.journal_error, incomplete=self.incomplete,
                              bus_errors=self.bus_errors, rejected=dict(self.rejected))
        path = self.bus_dir / registry.rank_file(self.rank)
        try:
            registry.write_json_atomic(path, self.info.data)
            self._status_write_failed = False
        except OSError as e:
            if not self._status_write_failed:  # once until it works again, not every second
                logger.warning("could not update %s: %s", path, e)
            self._status_write_failed = True

    def _check_journal_path(self, journal: JournalWriter) -> None:
        """The journal's file deleted (or moved away) while the run goes on: replay goes on from the open
        handle; put the file back at its path from that handle if we can; say so once either way."""
        if self._journal_lost is not None or not journal.path_lost():
            return
        self._flush(journal)  # what is buffered goes into the copy (a write error is handled as ever)
        try:
            journal.restore()
        except OSError as e:
            self._journal_lost = (f"the journal {journal.path} was deleted during the run and could not be "
                                  f"restored ({type(e).__name__}: {e})")
            message = (f"{self._journal_lost}; replay is still served from the open file, but the journal is "
                       "gone once the run ends")
            logger.error("%s", message)
        else:
            message = (f"the journal {journal.path} was deleted during the run; it was restored at its path from "
                       "the open file, no record lost")
            logger.warning("%s", message)
        self._publish_from_bus("warning", {"message": message, "journal": str(journal.path),
                                           "restored": self._journal_lost is None, "global_step": self.last_step})

    def _take_inbox(self, pull) -> None:
        _inbox.take(self, pull, loopback_only=self._loopback_only)

    def _reject(self, reason: str, detail: str) -> None:
        """Count a refused message by reason; log the first few of each reason (a flood must not flood the log)."""
        self.rejected[reason] += 1
        if self.rejected[reason] <= 3:
            logger.warning("%s%s", detail, " (further ones are counted, not logged)" if self.rejected[reason] == 3 else "")


def ready_now() -> bool:
    """The `ready` of a record whose values can be read at once (publish(), and CPU tensors)."""
    return True


def _wait_until(ready: Callable[[], bool], timeout: float) -> None:
    """Bounded poll at close, for a device copy still in flight."""
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.001)
