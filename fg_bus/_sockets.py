"""The bus thread's three sockets: where they bind, and the limits that bound what a peer can make the bus
hold (a message over a socket's size limit disconnects its sender before it is buffered)."""

from __future__ import annotations

import socket
from pathlib import Path

import zmq

from . import security

#: The largest message the inbox (PULL) takes.
INBOX_MAX_BYTES = 1 << 20
#: The same for the replay (ROUTER) and PUB sockets, which only ever receive small requests and
#: subscriptions: a 100 MB frame there would otherwise be buffered whole.
REQUEST_MAX_BYTES = 64 << 10
#: Messages queued per peer on receipt (beyond it ZeroMQ stops reading that peer; the inbox's may be 1 MB
#: each), and replay chunks (about 256 KB each) queued per client on the way out.
RECEIVE_HWM = 256
INBOX_RECEIVE_HWM = 64
REPLAY_SEND_HWM = 16
#: Live records queued per subscriber: beyond this a slow one drops live records and repairs from the journal.
PUB_SEND_HWM = 100_000
_PORT_OFFSET = {"pub": 0, "replay": 1, "inbox": 2}


def limit(pub: zmq.Socket, router: zmq.Socket, pull: zmq.Socket, linger_ms: int) -> None:
    for s in (pub, router, pull):
        s.linger = linger_ms
        s.rcvhwm = RECEIVE_HWM
    pub.sndhwm = PUB_SEND_HWM
    pub.maxmsgsize = REQUEST_MAX_BYTES
    router.router_mandatory = True
    router.sndhwm = REPLAY_SEND_HWM
    router.maxmsgsize = REQUEST_MAX_BYTES
    pull.maxmsgsize = INBOX_MAX_BYTES
    pull.rcvhwm = INBOX_RECEIVE_HWM


def inbox_host(host: str, curve: bool) -> str:
    """Where the inbox binds. On tcp beyond loopback without CURVE keys (`insecure`): 127.0.0.1 only, so no
    peer on another address can send a command or a record at all."""
    return host if curve or security.is_loopback_host(host) else "127.0.0.1"


def bind(sock: zmq.Socket, kind: str, tcp: str | None, sockets_dir: Path | None, curve: bool) -> str:
    """Bind `kind` ("pub", "replay", "inbox") on ipc in `sockets_dir`, or on tcp HOST:PORT (PORT + 0/1/2;
    port 0 picks free ports); returns the endpoint to advertise."""
    if tcp is None:
        endpoint = f"ipc://{sockets_dir / kind}"
        sock.bind(endpoint)
        return endpoint
    host, _, port = tcp.rpartition(":")
    host = host or "127.0.0.1"
    if kind == "inbox":
        host = inbox_host(host, curve)
    if int(port) == 0:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        port = int(port) + _PORT_OFFSET[kind]
        sock.bind(f"tcp://{host}:{port}")
    shown = socket.gethostname() if host in ("0.0.0.0", "*") else host
    return f"tcp://{shown}:{port}"
