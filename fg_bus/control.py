"""Asking a running job to stop / save / evaluate: the one control path `fg-bus ctl` and `fg-bus top` share.

The request goes to the trainer's inbox (PUSH); its answer comes back as a `control` record on the PUB
stream: first accepted (or refused), then applied at the next step boundary.

    result = send_control(registry.resolve(run_id), "save")
    print(result.message)          # "save applied by run ... at step 120"
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from dataclasses import dataclass

import orjson
import zmq

from . import records, registry, security

#: outcomes of `send_control`
APPLIED = "applied"            # the trainer applied it (at step `step`)
ACCEPTED = "accepted"          # accepted; it applies at the next step boundary (not seen applied in time)
REFUSED = "refused"            # the trainer said no (`reason` in the message)
NOT_RUNNING = "not-running"    # the run is over (or dead): nothing to ask
NO_HEARTBEAT = "no-heartbeat"  # no heartbeat within the timeout (stopped, suspended or dead)
NO_ANSWER = "no-answer"        # a heartbeat, but no acknowledgement within the timeout


@dataclass(frozen=True)
class ControlResult:
    """What came of a control request. `message` is a sentence without the program's name."""

    outcome: str
    message: str
    run_id: str
    cmd: str
    step: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (APPLIED, ACCEPTED)


def send_control(info: registry.RunInfo, cmd: str, *, rank: int = 0, timeout: float = 10.0,
                 source: str = "fg-bus top") -> ControlResult:
    """Send `cmd` (one of publisher.CONTROL_COMMANDS) to rank `rank` of the run and wait up to `timeout` s
    for it to be applied. Raises registry.RunNotFound for a rank the run does not have."""
    info = info.for_rank(rank)
    if not info.is_live:
        return ControlResult(NOT_RUNNING, f"run {info.run_id} is {info.status}, not running", info.run_id, cmd)
    endpoints = info.ranks[str(rank)]
    ctx = zmq.Context()
    sub, push = ctx.socket(zmq.SUB), ctx.socket(zmq.PUSH)
    server_key = info.data.get("curve_server_key")

    def result(outcome: str, message: str, step: int | None = None) -> ControlResult:
        return ControlResult(outcome, message, info.run_id, cmd, step)

    try:
        for sock in (sub, push):
            sock.linger = 1000
            if server_key:
                security.make_client(sock, server_key.encode())
        sub.setsockopt(zmq.SUBSCRIBE, records.HEARTBEAT.encode())
        sub.setsockopt(zmq.SUBSCRIBE, records.CONTROL.encode())
        sub.connect(endpoints["pub"])
        deadline = time.monotonic() + timeout
        # A heartbeat first: then our subscription is in place and the acknowledgement cannot be missed.
        if not _wait_for(sub, deadline, lambda r: r["event"] == records.HEARTBEAT):
            return result(NO_HEARTBEAT, f"run {info.run_id} sent no heartbeat within {timeout:g} s "
                                        "(is it stopped or dead?)")
        request_id = secrets.token_hex(6)
        push.connect(endpoints["inbox"])
        push.send(orjson.dumps({"op": "control", "cmd": cmd, "id": request_id, "source": source,
                                "origin": {"user": _user(), "host": socket.gethostname(), "pid": os.getpid()}}))
        ack = _wait_for(sub, deadline, lambda r: r["event"] == records.CONTROL and r.get("id") == request_id)
        if ack is None:
            return result(NO_ANSWER, f"no acknowledgement from run {info.run_id} within {timeout:g} s")
        if not ack.get("accepted", ack.get("applied")):
            return result(REFUSED, f"run {info.run_id} refused {cmd}: {ack.get('reason')}")
        applied = _wait_for(sub, deadline, lambda r: r["event"] == records.CONTROL and r.get("id") == request_id
                            and r.get("applied"))
        if applied is None:
            return result(ACCEPTED, f"{cmd} accepted by run {info.run_id}; it applies at the next step boundary")
        return result(APPLIED, f"{cmd} applied by run {info.run_id} at step {applied['global_step']}",
                      applied["global_step"])
    finally:
        sub.close(linger=0)
        push.close()
        ctx.term()


def _wait_for(sub, deadline: float, match) -> dict | None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sub.poll(int(remaining * 1000)):
            return None
        try:
            record = records.parse_frames(sub.recv_multipart())
        except records.RecordError:
            continue
        if match(record):
            return record


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())
