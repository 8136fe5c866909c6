"""The bus thread's replay service: `replay` and `position` requests on the ROUTER socket, answered by
streaming journal chunks, paced by each client's queue.

Everything a peer can make it hold is bounded: replays in progress per client and in all (past the bound
a request is refused with an `error` reply saying why), requests read per loop, one chunk held per replay,
and the journal is read through the writer's one read handle, so no request opens a file.
"""

from __future__ import annotations

import collections
from typing import Callable

import orjson
import zmq

from .journal import JournalWriter

#: Replays in progress (waiting for their client to take chunks) one client may have; a subscriber has one
#: at a time.
MAX_PER_CLIENT = 4
#: Replays in progress over all clients.
MAX_TOTAL = 64
#: Requests read per loop iteration: a flood waits in ZeroMQ's bounded queue while the journal, the live
#: stream and the heartbeat go on.
REQUESTS_PER_LOOP = 256


class ReplayService:
    """`take_requests()` when the ROUTER is readable, `pump()` on every loop."""

    def __init__(self, router: zmq.Socket, reject: Callable[[str, str], None],
                 report: Callable[[BaseException, str], None]):
        self.router = router
        self._reject = reject  # (reason, detail): counted in Publisher.rejected
        self._report = report  # (error, where): an unexpected error, counted and published by the publisher
        self.active: list[_Replay] = []
        self._per_client: collections.Counter = collections.Counter()

    @property
    def sendable(self) -> bool:
        """Some replay can send now (the loop should not wait)."""
        return any(r.sendable for r in self.active)

    def take_requests(self, journal: JournalWriter, catch_up: Callable[[], int | None]) -> None:
        """Read waiting requests. `catch_up()` journals everything published so far and returns the first
        seq the journal lost (None if none); it runs once, before the first request served."""
        lost_from: int | None = None
        caught_up = False
        for _ in range(REQUESTS_PER_LOOP):
            try:
                parts = self.router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            request = self._parse(parts)
            if request is None:
                continue
            identity, op, start = request
            if not self._admit(identity):
                continue
            if not caught_up:
                lost_from, caught_up = catch_up(), True
            end = journal.next_seq
            start = end if op == "position" else min(start, end)  # "position": where "now" is, no records
            stop = end if lost_from is None else min(end, lost_from)
            lost = lost_from if lost_from is not None and start < end and stop < end else None
            self.active.append(_Replay(identity, journal.read_chunks(min(start, stop), stop), end, lost))
            self._per_client[identity] += 1

    def _parse(self, parts: list[bytes]) -> tuple[bytes, str, int] | None:
        if len(parts) != 2:
            self._reject("replay-frame-count", f"replay request with {len(parts)} frames refused "
                                               "(expected [identity, request])")
            return None
        identity, body = parts
        try:
            request = orjson.loads(body)
            op = request.get("op")
            start = request.get("from")
            if op not in ("replay", "position") or (op == "replay" and (type(start) is not int or start < 0)):
                raise ValueError(body[:80])
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            self._reject("replay-malformed", f"malformed replay request refused: {body[:80]!r}")
            _send_reply(self.router, identity, b"error", b'{"reason":"malformed replay request"}')
            return None
        return identity, op, start

    def _admit(self, identity: bytes) -> bool:
        """Whether one more replay fits; if not, refuse it with a reason (sent if the client's queue has room)."""
        if self._per_client[identity] >= MAX_PER_CLIENT:
            reason, detail = "replay-too-many-per-client", (f"this client already has {MAX_PER_CLIENT} replays in "
                                                            "progress; read them before asking for more")
        elif len(self.active) >= MAX_TOTAL:
            reason, detail = "replay-too-many-in-all", (f"{MAX_TOTAL} replays are in progress; ask again later")
        else:
            return True
        self._reject(reason, f"replay request refused: {detail}")
        _send_reply(self.router, identity, b"error", orjson.dumps({"reason": detail}))
        return False

    def pump(self) -> None:
        """Send what each client will take now; forget the replays that are over (done, or client gone)."""
        still = []
        for replay in self.active:
            try:
                going = replay.pump(self.router)
            except Exception as e:  # noqa: BLE001 - one broken replay must not stop the others, or the loop
                self._report(e, "a replay")
                _send_reply(self.router, replay.identity, b"error",
                            orjson.dumps({"reason": f"the journal could not be read: {type(e).__name__}: {e}"}))
                going = False
            if going:
                still.append(replay)
            else:
                self._per_client[replay.identity] -= 1
                if not self._per_client[replay.identity]:
                    del self._per_client[replay.identity]
        self.active = still


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
