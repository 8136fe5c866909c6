"""The bus thread's inbox: control commands (`fg-bus ctl`) and records from sinks (`textgen`), checked
before anything reaches the run.

Only the trainer makes trainer events: a record sent in may not use one of their names, and it is marked
`"origin": "sink"` whatever it says itself. On tcp without CURVE, only a loopback peer is heard at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import zmq

from . import records, security

if TYPE_CHECKING:
    from .publisher import Publisher

CONTROL_COMMANDS = ("stop", "save", "evaluate", "save-and-stop", "abort")
#: Events only the trainer (or its bus) publishes, beside every `on_*` callback event.
TRAINER_EVENTS = frozenset({records.END, records.HEARTBEAT, records.CONTROL, "warning", "snapshot", "system",
                            "alert"})
ORIGIN_SINK = "sink"
#: Messages read per loop iteration (the rest wait in ZeroMQ's bounded queue).
MESSAGES_PER_LOOP = 1000


def is_trainer_event(event: str) -> bool:
    return event.startswith("on_") or event in TRAINER_EVENTS


def take(pub: "Publisher", pull: zmq.Socket, loopback_only: bool) -> None:
    """Handle the waiting messages; with `loopback_only` (tcp without CURVE), refuse every message whose
    peer is not a loopback address (ZeroMQ's Peer-Address of the connection it came on)."""
    for _ in range(MESSAGES_PER_LOOP):
        try:
            frames = pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if loopback_only:
            try:
                peer = frames[0].get("Peer-Address")
            except zmq.ZMQError:
                peer = None
            if not security.is_loopback_address(peer):
                pub._reject("inbox-not-loopback", f"inbox: a message from {peer} refused: on tcp without CURVE "
                                                  "keys only this host's own processes may send commands or records")
                continue
        handle(pub, [frame.bytes for frame in frames])


def handle(pub: "Publisher", parts: list[bytes]) -> None:
    """One message from a sink or `fg-bus ctl`: a control command (answered with a `control` record, since
    its sender waits for one) or a record to publish (refused ones are counted and logged)."""
    try:
        if len(parts) != 1:
            raise ValueError(f"expected 1 frame, got {len(parts)}")
        message = orjson.loads(parts[0])
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except (ValueError, orjson.JSONDecodeError) as e:
        pub._reject("inbox-malformed", f"inbox: malformed message refused: {e}")
        return
    op = message.get("op")
    if op == "control":
        _control(pub, message)
    elif op == "record":
        _record(pub, message)
    else:
        pub._reject("inbox-unknown-op", f"inbox: unknown op {str(op)[:40]!r} refused")


def _control(pub: "Publisher", message: dict) -> None:
    cmd, request_id = message.get("cmd"), str(message.get("id", ""))[:64]
    if cmd not in CONTROL_COMMANDS:
        reason = f"unknown command {str(cmd)[:40]!r}; known: {', '.join(CONTROL_COMMANDS)}"
        pub._reject("inbox-unknown-command", f"inbox: {reason}")
        pub._publish_from_bus(records.CONTROL, {"cmd": str(cmd)[:40], "id": request_id, "accepted": False,
                                                "reason": reason, "global_step": pub.last_step})
        return
    pub.control_queue.append({"cmd": cmd, "id": request_id, "source": str(message.get("source", ""))[:80],
                         "origin": _origin(message.get("origin"))})
    pub._publish_from_bus(records.CONTROL, {"cmd": cmd, "id": request_id, "accepted": True,
                                            "global_step": pub.last_step})


def _origin(value) -> dict | None:
    """Who sent a control request (`user`, `host`, `pid`), as the sender says: short strings and an int,
    anything else dropped. Shown in the run's end reason; the socket's access rules decide who may send."""
    if not isinstance(value, dict):
        return None
    out = {k: str(value[k])[:64] for k in ("user", "host") if isinstance(value.get(k), (str, int))}
    if type(value.get("pid")) is int:
        out["pid"] = value["pid"]
    return out or None


def _record(pub: "Publisher", message: dict) -> None:
    event = message.get("event")
    if not isinstance(event, str) or not event or is_trainer_event(event):
        pub._reject("inbox-event-refused", f"inbox: a record with event {str(event)[:40]!r} refused (only the "
                                           "trainer makes trainer events: on_*, " + ", ".join(sorted(TRAINER_EVENTS))
                    + ")")
        return
    fields = {k: v for k, v in message.items() if k not in ("op", "v", "run", "rank", "seq", "timestamp")}
    fields["origin"] = ORIGIN_SINK  # whatever the message says: it came in through the inbox
    try:  # what the sinks will check, checked here: a bad record never reaches the journal
        records.validate({"v": records.SCHEMA_VERSION, "run": pub.run_id, "rank": pub.rank, "seq": 0,
                          "timestamp": "", "event": event, **fields}, restore=False)
        step = fields.get("global_step")
        if step is not None and (type(step) is not int or step < 0):
            raise records.RecordError("bad-field", f"global_step must be an integer >= 0, got {step!r}")
    except records.RecordError as e:
        pub._reject("inbox-" + e.reason, f"inbox: a {event[:40]!r} record refused: {e}")
        return
    pub._publish_from_bus(event, fields)
    pub.received[event] += 1
