"""One writer at a time: an exclusive, non-blocking `flock` on a lock file that names its holder's pid.

Used by `fg-train` (one run per output directory) and by the sinks (one writer per output). The kernel
drops the lock when its holder exits, even on SIGKILL, so a crashed holder never leaves a stale lock. The
file itself stays: unlinking a lock file races with a process that has just opened it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_PID_WIDTH = 16


class Locked(Exception):
    """The lock is held by another process; `holder` is its pid when the lock file says it."""

    def __init__(self, path: Path, holder: int | None):
        super().__init__(f"{path} is locked by {'pid ' + str(holder) if holder else 'another process'}")
        self.path = path
        self.holder = holder


def acquire(path: str | os.PathLike, mode: int = 0o600) -> int:
    """Take the lock on `path` (created if missing) and write our pid into it; returns the descriptor, which
    holds the lock until it is closed. Raises Locked if another process holds it, OSError if the file cannot
    be opened."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = holder_of(fd)
        os.close(fd)
        raise Locked(path, holder) from None
    # Overwritten in place at a fixed width, never truncated: ext4 flushes a file truncated to 0 at close,
    # which made taking the lock cost milliseconds instead of microseconds.
    os.pwrite(fd, f"{os.getpid()}\n".ljust(_PID_WIDTH).encode(), 0)
    return fd


def holder_of(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
