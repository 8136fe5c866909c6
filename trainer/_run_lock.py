"""One `fg-train` per output directory: an exclusive `flock` on `OUTPUT_DIR/.fg-train.lock` for the run's life.

Two runs writing checkpoints, the final model and `trainer_state.json` into one directory overwrite each
other without a word; the second is refused at start instead, naming the holder's pid (written in the
lock file). The lock goes with the process (the kernel drops it at exit, even on SIGKILL), so a crashed run
never leaves a stale lock; the file itself stays (deleting a lock file races with the next taker).
Under torchrun only global rank 0 takes it: the ranks of one job share the directory by design.
"""

from __future__ import annotations

import os
from pathlib import Path

from fg_bus import lockfile

LOCK_NAME = ".fg-train.lock"

_held: list[int] = []  # open descriptors of the locks this process holds (kept open: closing drops the lock)


class OutputDirInUse(RuntimeError):
    """Another process holds the output directory."""


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """The output directory, created if needed; ValueError if it is a file (or cannot be created)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {str(path)!r} exists and is not a directory; pass another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, a read-only file system
        raise ValueError(f"output_dir {str(path)!r} cannot be created: {e.strerror}") from None
    return path


def lock_output_dir(output_dir: str | os.PathLike) -> Path:
    """Take the run's lock on `output_dir` (held until this process exits); OutputDirInUse if taken."""
    path = check_output_dir(output_dir) / LOCK_NAME
    try:
        fd = lockfile.acquire(path)
    except lockfile.Locked as e:
        raise OutputDirInUse(
            f"output_dir {str(output_dir)!r} is in use by another fg-train (pid {e.holder or 'unknown'}, lock "
            f"{path}); two runs in one directory overwrite each other's checkpoints: wait for it to finish, or "
            "pass another --output-dir") from None
    except OSError as e:
        raise ValueError(f"cannot create the lock file {path}: {e.strerror}") from None
    _held.append(fd)
    return path
