"""What every sink that writes files shares: one writer per output (an OS lock), private files and
directories, appends that survive a full disk, and text made safe for a terminal.

Exit statuses a sink process uses for its output (besides the runner's 0, 3, 4, 5 and 128+N):
2 the output cannot be used (not a log of records, a path that cannot be created or written),
7 another sink holds the output (`EXIT_LOCKED`), 8 a write failed for a reason other than a full disk
(`EXIT_WRITE_FAILED`; restarted, the sink continues where its output ends).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

from fg_bus import lockfile

logger = logging.getLogger(__name__)

EXIT_UNUSABLE = 2
EXIT_LOCKED = 7
EXIT_WRITE_FAILED = 8

#: errors that mean "no room now": wait for space rather than fail (EFBIG: a file-size limit, RLIMIT_FSIZE)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputError(ValueError):
    """An output this sink cannot use; the message names it and says what to do. `status`: the exit status."""

    status = EXIT_UNUSABLE


class OutputLocked(OutputError):
    status = EXIT_LOCKED


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def file_mode(group_readable: bool) -> int:
    return 0o640 if group_readable else 0o600


def dir_mode(group_readable: bool) -> int:
    return 0o750 if group_readable else 0o700


def umask_for(group_readable: bool) -> int:
    """The sink process's umask: files a library creates for it (TensorBoard's own writers, a user sink's)
    are private too."""
    return 0o027 if group_readable else 0o077


def make_dirs(path: Path, mode: int) -> None:
    """Create `path` and its missing parents with `mode` (Path.mkdir gives the mode to the last one only)."""
    missing = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        what = f"{path} is not a directory" if probe == path else f"cannot create the directory {path}: {probe} " \
                                                                  "is not a directory"
        raise OutputError(f"{what}; choose another output path")
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=mode, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the directory {path}: {e.strerror or e}; choose another output "
                          "path") from None


class OutputLock:
    """An exclusive lock on `path` (`fg_bus.lockfile`), held until `release()`; a refused writer is told the
    holder's pid. A killed sink's lock is free at once (the kernel drops it)."""

    def __init__(self, path: Path, what: str, mode: int = 0o600):
        self.path = path
        self.what = what
        self.mode = mode
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            self._fd = lockfile.acquire(self.path, self.mode)
        except lockfile.Locked as e:
            who = f"another sink (pid {e.holder})" if e.holder else "another sink"
            raise OutputLocked(f"{self.what} is being written by {who}: a second writer would interleave its "
                               f"records and double every point; stop that sink, or give this one another "
                               f"output (lock {self.path})") from None
        except OSError as e:
            raise OutputError(f"cannot write {self.what}: {self.path}: {e.strerror or e}") from None
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def released(lock: OutputLock | None) -> None:
    """Release `lock` if one is held. Returns None, for a sink's `self._lock = released(self._lock)`."""
    if lock is not None:
        lock.release()


class AppendFile:
    """An append-only file with its own buffer, so a failed write loses nothing: what the OS did not take
    stays in the buffer, and `flush()` tries again (after a full disk, until space returns). `size` is
    what the file holds; `tell()` adds what is still buffered."""

    def __init__(self, path: Path, mode: int = 0o600, buffer_bytes: int = 1 << 16):
        self.path = path
        self.buffer_bytes = buffer_bytes
        self._buffer = bytearray()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        self.size = os.fstat(self._fd).st_size

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        if not self._buffer and len(data) >= self.buffer_bytes:
            self._write_through(data)  # a raw sink's 256 KB pieces: no copy into the buffer first
            return
        self._buffer += data
        if len(self._buffer) >= self.buffer_bytes:
            self.flush()

    def _write_through(self, data: bytes) -> None:
        """Write `data` straight to the file; what the OS did not take (a short write, an OSError) is
        buffered, as write() + flush() would leave it."""
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:] if written else data)
        except OSError as e:
            self._buffer += data[written:]
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        finally:
            self.size += written

    def flush(self) -> int:
        """Write everything buffered; returns the file's size. On an OSError (named with this file) the
        bytes not written stay buffered."""
        view = memoryview(self._buffer)
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])  # a short write: the rest goes next turn
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        finally:
            view.release()
            del self._buffer[:written]
            self.size += written
        return self.size

    def sync(self) -> int:
        size = self.flush()
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        return size

    def tell(self) -> int:
        return self.size + len(self._buffer)

    def truncate(self, size: int) -> None:
        self.flush()
        os.ftruncate(self._fd, size)
        self.size = size

    def close(self) -> None:
        """Flush and close; the descriptor is closed even when the flush fails (the error is raised)."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None


# -- text for a terminal -----------------------------------------------------------------------------------

# C0 and C1 controls, DEL, line/paragraph separators, bidirectional overrides and isolates, and the BOM:
# each can move the cursor, retitle the window, hide text or reorder what the reader sees.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
# The same characters as orjson leaves them in its UTF-8 output (it escapes C0 itself).
_UNSAFE_UTF8 = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]|\xef\xbb\xbf")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` as a string with every control character shown escaped (`\\x1b`), safe to print."""
    text = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def has_controls(text: str) -> bool:
    return _UNSAFE.search(text) is not None


def json_safe_line(data: bytes) -> bytes:
    """A JSON line (orjson's output) with the controls orjson leaves raw escaped as `\\u00XX`: the same JSON
    value, safe on a terminal."""
    if not _UNSAFE_UTF8.search(data):
        return data
    return _UNSAFE_UTF8.sub(lambda m: f"\\u{ord(m.group().decode()):04x}".encode(), data)


class SafeFormatter(logging.Formatter):
    """Log messages (which may quote record text) with control characters escaped; tracebacks unchanged."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))
