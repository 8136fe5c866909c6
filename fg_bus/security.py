"""CURVE keys for tcp endpoints.

`fg-bus keys` writes, under `$FG_HOME/keys/` (mode 0700, files 0600):
  server.key / server.key_secret      the trainer's keypair (its public key also goes into run.json)
  client.key / client.key_secret      this user's client keypair (sinks, `fg-bus ctl`)
  authorized/client.key               public keys allowed to connect; add other users' or hosts' here
With keys present, a tcp bus accepts only clients whose public key is in `authorized/`. ipc endpoints rely
on the 0700 socket directory instead.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .registry import fg_home, private_dir

logger = logging.getLogger(__name__)


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
