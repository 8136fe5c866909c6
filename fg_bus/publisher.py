"""The publishing side: a cheap, never-blocking `publish()` for the training thread, and a bus thread that
owns every socket and the journal.

Training thread: build the record, take the next seq, append it to a deque. No encoding, no socket, no
file, no wait; the lock it takes is held by other publishing threads only for the same few instructions.

Bus thread, in a loop: encode queued records (orjson), write them into the journal (append-only) and out on PUB; answer replay
requests on ROUTER by streaming journal chunks; take control commands and sink results from the PULL inbox;
publish a heartbeat (carrying the next seq, so subscribers notice a missed tail) every second; flush the
journal every 100 ms. On close: the `end` record, fsync, run.json status, sockets closed with a bounded
linger.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import zmq

from . import records, registry, security
from .journal import JournalWriter

logger = logging.getLogger(__name__)

CONTROL_COMMANDS = ("stop", "save", "evaluate", "save-and-stop")
INBOX_MAX_BYTES = 1 << 20
_POLL_MS = 5
_BATCH = 1024
#: Records queued for the bus thread beyond which publish() waits for it to catch up (to half of this):
#: memory stays bounded even when events come faster than the journal's disk takes them. A training loop
#: publishes tens of events per step and never gets near it.
MAX_QUEUED = 100_000
_SENTINEL = object()


class Publisher:
    """One rank's publisher. `start()`, then `publish(...)` from the training thread, then `close(status)`."""

    def __init__(self, bus_dir: str | os.PathLike, run_id: str, *, rank: int = 0, world_size: int = 1,
                 name: str | None = None, tcp: str | None = None, heartbeat_interval: float = 1.0,
                 flush_interval: float = 0.1, linger_ms: int = 1000):
        self.bus_dir = Path(bus_dir)
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.name = name or run_id
        self.tcp = tcp
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.linger_ms = linger_ms
        self._queue: collections.deque = collections.deque()
        self._control: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.endpoints: dict[str, str] = {}
        self.status = registry.RUNNING
        self.last_step = 0
        self.journal_error: str | None = None
        self.lost_from: int | None = None  # after a journal write error: the first seq not on disk
        self.info: registry.RunInfo | None = None
        self.received: collections.Counter = collections.Counter()  # records sinks sent in, by event
        self._encode_errors: set[str] = set()
        self.rejected: collections.Counter = collections.Counter()  # messages refused on replay / inbox, by reason
        self.stalls = 0  # times publish() waited for the bus thread (MAX_QUEUED), and for how long in all
        self.stalled_s = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "Publisher":
        registry.private_dir(self.bus_dir)
        self._thread = threading.Thread(target=self._run, name=f"fg-bus-rank{self.rank}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the bus thread did not come up within {timeout:g} s")
        if self._start_error is not None:
            raise RuntimeError(f"could not start the bus: {self._start_error}") from self._start_error
        atexit.register(self._close_at_exit)
        return self

    def close(self, status: str = registry.COMPLETED, timeout: float = 10.0) -> None:
        """Publish the `end` record with `status`, flush and sync the journal, close the sockets. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._enqueue_locked(records.END, {"status": status, "global_step": self.last_step})
            self._closed = True
            self.status = status
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the bus thread did not finish within %g s; the journal may be incomplete", timeout)
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        # The interpreter is exiting without close(): training did not reach its end.
        self.close(registry.FAILED, timeout=5.0)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the training thread's side -----------------------------------------------------------------------

    def publish(self, event: str, global_step: int | None = None, epoch: float | None = None,
                metrics: dict | None = None, **extra: Any) -> int:
        """Hand one record to the bus; returns its seq (-1 once closed). Never blocks on I/O.

        The bus thread builds and encodes the record a few milliseconds later, so `metrics` is copied (one
        level) here; do not change the values inside it afterwards. A value that cannot be encoded is
        logged, and the record goes out at its seq with empty metrics and an `error` naming the key."""
        fields = (time.time(), event, global_step, epoch, dict(metrics) if metrics else None, extra)
        with self._lock:
            if self._closed:
                return -1
            seq = self._seq
            self._seq = seq + 1
            self._queue.append((ready_now, seq, fields))
        if global_step is not None:
            self.last_step = global_step
        if len(self._queue) > MAX_QUEUED:
            self._wait_for_room()
        return seq

    def publish_when_ready(self, ready: Callable[[], bool], event: str, global_step: int | None = None,
                           epoch: float | None = None, metrics: dict | None = None, **extra: Any) -> int:
        """Like publish() without the copy of `metrics`, and the bus thread encodes the record only once
        `ready()` is true: for values still being copied off the device (a CUDA event's `query`). The seq,
        and so the order, is fixed now; the timestamp too."""
        fields = (time.time(), event, global_step, epoch, metrics, extra)
        with self._lock:
            if self._closed:
                return -1
            seq = self._seq
            self._seq = seq + 1
            self._queue.append((ready, seq, fields))
        if global_step is not None:
            self.last_step = global_step
        if len(self._queue) > MAX_QUEUED:
            self._wait_for_room()
        return seq

    def _wait_for_room(self) -> None:
        """Backpressure, the one wait on the publishing side: the bus thread is MAX_QUEUED records behind.
        Counted in `stalls` / `stalled_s`, logged the first time."""
        t0 = time.monotonic()
        if not self.stalls:
            logger.warning("the bus thread is %d records behind (the journal's disk cannot keep up with the "
                           "events); publishing waits for it to catch up", len(self._queue))
        while len(self._queue) > MAX_QUEUED // 2 and self._thread is not None and self._thread.is_alive():
            time.sleep(0.001)
        self.stalls += 1
        self.stalled_s += time.monotonic() - t0

    @property
    def has_control_requests(self) -> bool:
        return bool(self._control)

    def control_requests(self) -> list[dict]:
        """Control commands received since the last call (training thread, at a step boundary)."""
        out = []
        while self._control:
            out.append(self._control.popleft())
        return out

    def request_control(self, cmd: str, source: str) -> None:
        """Queue a control command from inside the process (a signal handler)."""
        self._control.append({"cmd": cmd, "id": f"local-{len(self._control)}", "source": source})

    def sync(self) -> None:
        """Ask the bus thread to fsync the journal (at checkpoints); returns at once."""
        self._queue.append(_SENTINEL)

    def _enqueue_locked(self, event: str, fields: dict) -> int:
        record = {"v": records.SCHEMA_VERSION, "run": self.run_id, "rank": self.rank, "seq": self._seq,
                  "timestamp": records.now(), "event": event, **fields}
        data = records.encode(record)
        self._seq += 1
        self._queue.append((event, data))
        return record["seq"]

    def _publish_from_bus(self, event: str, fields: dict) -> None:
        with self._lock:
            if not self._closed:
                self._enqueue_locked(event, fields)

    # -- the bus thread ------------------------------------------------------------------------------------

    def _bind(self, sock: zmq.Socket, kind: str, sockets_dir: Path | None) -> str:
        if self.tcp is None:
            endpoint = f"ipc://{sockets_dir / kind}"
            sock.bind(endpoint)
            return endpoint
        host, _, port = self.tcp.rpartition(":")
        host = host or "127.0.0.1"
        offset = {"pub": 0, "replay": 1, "inbox": 2}[kind]
        if int(port) == 0:
            port = sock.bind_to_random_port(f"tcp://{host}")
        else:
            port = int(port) + offset
            sock.bind(f"tcp://{host}:{port}")
        shown = socket.gethostname() if host in ("0.0.0.0", "*") else host
        return f"tcp://{shown}:{port}"

    def _run(self) -> None:
        ctx = zmq.Context()
        socks: list[zmq.Socket] = []
        journal = None
        auth = None
        try:
            journal = JournalWriter(self.bus_dir / f"journal.rank{self.rank}.jsonl")
            pub, router, pull = (ctx.socket(t) for t in (zmq.PUB, zmq.ROUTER, zmq.PULL))
            socks = [pub, router, pull]
            for s in socks:
                s.linger = self.linger_ms
            pub.sndhwm = 100_000  # beyond this a slow subscriber drops live records and repairs from the journal
            router.router_mandatory = True
            router.sndhwm = 64
            pull.maxmsgsize = INBOX_MAX_BYTES
            server_keys = security.server_keys() if self.tcp is not None else None
            if server_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(security.authorized_dir()))
                for s in socks:
                    security.make_server(s, server_keys)
            sockets_dir = registry.socket_dir(self.run_id) if self.tcp is None else None
            self.endpoints = {kind: self._bind(s, kind, sockets_dir)
                              for kind, s in (("pub", pub), ("replay", router), ("inbox", pull))}
            self.info = registry.RunInfo(self.bus_dir, {
                "run_id": self.run_id, "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "status": registry.RUNNING, "world_size": self.world_size,
                "ranks": {str(self.rank): {**self.endpoints, "pid": os.getpid()}},
                "curve_server_key": server_keys.public.decode() if server_keys else None,
                "sockets_dir": str(sockets_dir) if sockets_dir else None,
                "rank": self.rank, "last_seq": -1, "last_step": 0, "heartbeat": time.time(),
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
        self._ready.set()
        try:
            self._loop(journal, pub, router, pull)
        finally:
            journal.close()
            self.info.data.update(status=self.status, ended=time.time(), last_seq=journal.next_seq - 1,
                                  last_step=self.last_step, journal_error=self.journal_error)
            try:
                registry.write_json_atomic(self.bus_dir / registry.rank_file(self.rank), self.info.data)
            except OSError as e:
                logger.error("could not write the final status to %s: %s", self.bus_dir, e)
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

    def _loop(self, journal: JournalWriter, pub, router, pull) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        replays: list[_Replay] = []
        next_heartbeat = next_flush = time.monotonic()
        while True:
            self._drain(journal, pub)
            stopping = self._stop.is_set() and not self._queue
            if stopping:
                break
            # Wake every few ms and drain in batches rather than per record: each wake-up takes the GIL from
            # the training thread, so fewer, larger batches cost it less (live latency stays under ~5 ms).
            busy = any(r.sendable for r in replays) or len(self._queue) > _BATCH
            events = dict(poller.poll(0 if busy else (1 if replays else _POLL_MS)))
            if router in events:
                self._take_replay_requests(router, journal, pub, replays)
            if pull in events:
                self._take_inbox(pull)
            replays = [r for r in replays if r.pump(router)]
            now = time.monotonic()
            if now >= next_flush:
                self._flush(journal)
                next_flush = now + self.flush_interval
            if now >= next_heartbeat:
                self._heartbeat(pub, journal)
                next_heartbeat = now + self.heartbeat_interval

    def _drain(self, journal: JournalWriter, pub) -> int:
        """Journal every queued record, flush once, then send them live: a subscriber never holds a record
        the journal would lose if this process were killed now (the kernel has it after the flush)."""
        batch = []
        while self._queue:
            item = self._queue[0]
            if item is _SENTINEL:
                self._queue.popleft()
                self._flush(journal, durable=True)
                continue
            if len(item) == 3:  # from publish(): encoded here, once its values are ready
                ready, seq, fields = item
                if not ready():
                    if not self._stop.is_set():
                        break  # look again on the next loop; records behind it wait, keeping seq order
                    _wait_until(ready, timeout=5.0)
                event, data = fields[1], self._encode_queued(seq, fields)
                release = getattr(ready, "release", None)
                if release is not None:
                    release()  # the values are encoded: their buffers may be reused
            else:
                event, data = item
            self._queue.popleft()
            self._journal_append(journal, data)
            batch.append((event, data))
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

    def _encode_queued(self, seq: int, fields: tuple) -> bytes:
        timestamp, event, global_step, epoch, metrics, extra = fields
        record = {"v": records.SCHEMA_VERSION, "run": self.run_id, "rank": self.rank, "seq": seq,
                  "timestamp": datetime.fromtimestamp(timestamp, timezone.utc), "event": event,
                  "global_step": global_step, "epoch": epoch, "metrics": metrics if metrics is not None else {}}
        if extra:
            record.update(extra)
        try:
            return records.encode(record)
        except records.EncodeError as e:
            if str(e) not in self._encode_errors:  # once per distinct error, not once per step
                self._encode_errors.add(str(e))
                logger.error("record %s seq %d could not be encoded (published without its metrics): %s",
                             event, seq, e)
            keep = {k: record[k] for k in ("v", "run", "rank", "seq", "timestamp", "event", "global_step", "epoch")}
            return records.encode({**keep, "metrics": {}, "error": str(e)})

    def _flush(self, journal: JournalWriter, durable: bool = False) -> None:
        if journal.failed is not None:
            return
        try:
            journal.sync() if durable else journal.flush()
        except OSError as e:
            self._journal_failed(journal, e)

    def _heartbeat(self, pub, journal: JournalWriter) -> None:
        beat = {"v": records.SCHEMA_VERSION, "run": self.run_id, "rank": self.rank, "seq": journal.next_seq,
                "timestamp": records.now(), "event": records.HEARTBEAT, "global_step": self.last_step}
        try:
            pub.send_multipart(records.frames(records.HEARTBEAT, records.encode(beat)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        self.info.data.update(last_seq=journal.next_seq - 1, last_step=self.last_step, heartbeat=time.time(),
                              journal_error=self.journal_error)
        try:
            registry.write_json_atomic(self.bus_dir / registry.rank_file(self.rank), self.info.data)
        except OSError as e:
            logger.warning("could not update %s: %s", self.bus_dir / registry.rank_file(self.rank), e)

    def _take_replay_requests(self, router, journal: JournalWriter, pub, replays: list) -> None:
        while True:
            try:
                parts = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2:
                self._reject("replay-frame-count", f"replay request with {len(parts)} frames refused "
                                                   "(expected [identity, request])")
                continue
            identity, body = parts
            try:
                request = orjson.loads(body)
                op = request.get("op")
                start = request.get("from")
                if op not in ("replay", "position") or (op == "replay" and (type(start) is not int or start < 0)):
                    raise ValueError(body[:80])
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                self._reject("replay-malformed", f"malformed replay request refused: {body[:80]!r}")
                _send_reply(router, identity, b"error", b'{"reason":"malformed replay request"}')
                continue
            while self._drain(journal, pub):  # everything published so far is in the journal
                pass
            end = journal.next_seq
            start = end if op == "position" else min(start, end)  # "position": where "now" is, no records
            stop = end if self.lost_from is None else min(end, self.lost_from)
            lost_from = self.lost_from if self.lost_from is not None and start < end and stop < end else None
            replays.append(_Replay(identity, journal.read_chunks(min(start, stop), stop), end, lost_from))

    def _take_inbox(self, pull) -> None:
        for _ in range(1000):
            try:
                parts = pull.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle_inbox(parts)

    def _reject(self, reason: str, detail: str) -> None:
        """Count a refused message by reason; log the first few of each reason (a flood must not flood the log)."""
        self.rejected[reason] += 1
        if self.rejected[reason] <= 3:
            logger.warning("%s%s", detail, " (further ones are counted, not logged)" if self.rejected[reason] == 3 else "")

    def _handle_inbox(self, parts: list[bytes]) -> None:
        """One message from a sink or `fg-bus ctl`: a control command (answered with a `control` record, since
        its sender waits for one) or a record to publish (refused ones are counted and logged)."""
        try:
            if len(parts) != 1:
                raise ValueError(f"expected 1 frame, got {len(parts)}")
            message = orjson.loads(parts[0])
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
        except (ValueError, orjson.JSONDecodeError) as e:
            self._reject("inbox-malformed", f"inbox: malformed message refused: {e}")
            return
        op = message.get("op")
        if op == "control":
            cmd, request_id = message.get("cmd"), str(message.get("id", ""))[:64]
            if cmd not in CONTROL_COMMANDS:
                reason = f"unknown command {str(cmd)[:40]!r}; known: {', '.join(CONTROL_COMMANDS)}"
                self._reject("inbox-unknown-command", f"inbox: {reason}")
                self._publish_from_bus(records.CONTROL, {"cmd": str(cmd)[:40], "id": request_id, "accepted": False,
                                                         "reason": reason, "global_step": self.last_step})
                return
            self._control.append({"cmd": cmd, "id": request_id, "source": str(message.get("source", ""))[:80]})
            self._publish_from_bus(records.CONTROL, {"cmd": cmd, "id": request_id, "accepted": True,
                                                     "global_step": self.last_step})
        elif op == "record":
            event = message.get("event")
            if not isinstance(event, str) or not event or event in (records.END, records.HEARTBEAT, records.CONTROL):
                self._reject("inbox-event-refused", f"inbox: a record with event {str(event)[:40]!r} refused")
                return
            fields = {k: v for k, v in message.items() if k not in ("op", "v", "run", "rank", "seq", "timestamp")}
            try:  # what the sinks will check, checked here: a bad record never reaches the journal
                records.validate({"v": records.SCHEMA_VERSION, "run": self.run_id, "rank": self.rank, "seq": 0,
                                  "timestamp": "", "event": event, **fields}, restore=False)
                step = fields.get("global_step")
                if step is not None and (type(step) is not int or step < 0):
                    raise records.RecordError("bad-field", f"global_step must be an integer >= 0, got {step!r}")
            except records.RecordError as e:
                self._reject("inbox-" + e.reason, f"inbox: a {event[:40]!r} record refused: {e}")
                return
            self._publish_from_bus(event, fields)
            self.received[event] += 1
        else:
            self._reject("inbox-unknown-op", f"inbox: unknown op {str(op)[:40]!r} refused")


def ready_now() -> bool:
    """The `ready` of a record whose values can be read at once (publish(), and CPU tensors)."""
    return True


def _wait_until(ready: Callable[[], bool], timeout: float) -> None:
    """Bounded poll at close, for a device copy still in flight."""
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.001)


def _send_reply(router, identity: bytes, kind: bytes, body: bytes) -> str:
    """Send one reply without blocking: "sent", "full" (the client's queue is full: retry later) or
    "gone" (the client disconnected)."""
    try:
        router.send_multipart([identity, kind, body], flags=zmq.NOBLOCK)
        return "sent"
    except zmq.Again:
        return "full"
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:
            return "gone"
        raise


class _Replay:
    """One client's replay in progress: journal chunks, then `done` with the next seq. Paced by the
    client's queue (ROUTER_MANDATORY: a full queue says EAGAIN, and the rest waits for the next loop)."""

    def __init__(self, identity: bytes, chunks, end_seq: int, lost_from: int | None = None):
        self.identity = identity
        self.chunks = chunks
        self.end_seq = end_seq
        self.done = {"next_seq": end_seq} if lost_from is None else {"next_seq": end_seq, "lost_from": lost_from}
        self.pending: bytes | None = None
        self.sendable = True  # False while the client's queue is full: the loop then waits, not spins

    def pump(self, router) -> bool:
        """Send what the client will take now; False when this replay is over (done, or client gone)."""
        self.sendable = True
        for _ in range(16):
            if self.pending is None:
                self.pending = next(self.chunks, None)
            if self.pending is None:
                result = _send_reply(router, self.identity, b"done", orjson.dumps(self.done))
                self.sendable = False
                return result == "full"
            result = _send_reply(router, self.identity, b"chunk", self.pending)
            if result != "sent":
                self.sendable = False
                return result == "full"
            self.pending = None
        return True
