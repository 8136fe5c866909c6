"""CURVE keys for tcp endpoints.

`fg-bus keys` writes, under `$FG_HOME/keys/` (mode 0700, files 0600):
  server.key / server.key_secret      the trainer's keypair (its public key also goes into run.json)
  client.key / client.key_secret      this user's client keypair (sinks, `fg-bus ctl`)
  authorized/client.key               public keys allowed to connect; add other users' or hosts' here
With keys present, a tcp bus accepts only clients whose public key is in `authorized/`. ipc endpoints rely
on the 0700 socket directory instead.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .registry import fg_home, private_dir

logger = logging.getLogger(__name__)


class InsecureBus(ValueError):
    """A tcp bus on a non-loopback address without CURVE keys, not asked for by name."""


def insecure_bus_message(tcp: str) -> str:
    return (f"--bus-tcp {tcp} would let anyone who can reach this host read the run, replay its journal (args, "
            "host, paths) and send it records and commands: there are no CURVE keys. Run `fg-bus keys` (then "
            "only clients with an authorized key connect), bind a loopback address (127.0.0.1:PORT), or pass "
            "--insecure to accept the risk")


def is_loopback_host(host: str) -> bool:
    """Whether a bind host reaches this machine only: "localhost", a loopback address, or a name every
    address of which is loopback. "0.0.0.0", "*" and a name that does not resolve are not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    if host in ("", "*"):
        return False
    try:
        ipaddress.ip_address(host)
        return is_loopback_address(host)
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(is_loopback_address(a) for a in addresses)


def is_loopback_address(address: str | None) -> bool:
    """Whether a peer's address (ZeroMQ's Peer-Address property, an IP) is a loopback one."""
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0].strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, from a dual-stack socket
    return (mapped or ip).is_loopback


def keys_dir() -> Path:
    return private_dir(fg_home() / "keys")


def authorized_dir() -> Path:
    return private_dir(keys_dir() / "authorized")


def make_keys(force: bool = False) -> Path:
    """Create the server and client keypairs and authorize the client key. Returns the keys directory."""
    directory = keys_dir()
    if (directory / "server.key_secret").exists() and not force:
        raise FileExistsError(f"keys already exist in {directory}; pass --force to replace them")
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(directory), "server")
        zmq.auth.create_certificates(str(directory), "client")
        shutil.copy(directory / "client.key", authorized_dir() / "client.key")
    finally:
        os.umask(old_umask)
    for path in directory.rglob("*.key*"):
        os.chmod(path, 0o600)
    return directory


@dataclass
class ServerKeys:
    public: bytes
    secret: bytes


@dataclass
class ClientKeys:
    public: bytes
    secret: bytes


def server_keys() -> ServerKeys | None:
    path = keys_dir() / "server.key_secret"
    if not path.exists():
        return None
    public, secret = zmq.auth.load_certificate(str(path))
    return ServerKeys(public, secret)


def client_keys() -> ClientKeys | None:
    path = keys_dir() / "client.key_secret"
    if not path.exists():
        return None
    public, secret = zmq.auth.load_certificate(str(path))
    return ClientKeys(public, secret)


def make_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, server_public: bytes, keys: ClientKeys | None = None) -> None:
    keys = keys or client_keys()
    if keys is None:
        raise PermissionError("this run's tcp bus requires CURVE keys; run `fg-bus keys` (or copy your "
                              f"client keypair into {keys_dir()}) and authorize the public key on the trainer")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def check_tcp(tcp: str | None, insecure: bool) -> None:
    """A tcp bus beyond loopback needs CURVE keys: raise InsecureBus without them, unless `insecure` (then
    warn loudly: the inbox is then bound on 127.0.0.1 only, and refuses non-loopback peers)."""
    if tcp is None:
        return
    host = tcp.rpartition(":")[0] or "127.0.0.1"
    if is_loopback_host(host) or server_keys() is not None:
        return
    if not insecure:
        raise InsecureBus(insecure_bus_message(tcp))
    logger.warning("INSECURE BUS: %s has no CURVE keys (--insecure): anyone who can reach this host can read the "
                   "run's records and replay its journal. Commands and records are taken from this host only "
                   "(the inbox listens on 127.0.0.1). Run `fg-bus keys` to require a key.", tcp)
