"""`fg-bus gc`: what dead runs leave behind, found and (with `--yes`) removed.

Three kinds of leftovers, all this user's only:
- socket directories (`$XDG_RUNTIME_DIR/fg/<id>/`, `/tmp/fg-<uid>/<id>/`) of trainers that died without
  closing their bus (SIGKILL, OOM killer, a crash of the interpreter). A directory is stale when no socket
  in it takes a connection (nothing listens: every connect is refused), no live or paused run names it in
  its run.json, and it holds nothing but the bus's own sockets (`pub`, `replay`, `inbox`). An empty one
  counts only once it is a minute old (a trainer starting right now makes it before it binds).
- registry entries (`$FG_HOME/runs/<run_id>.json`) whose run directory is gone (deleted with its output
  dir). A run whose directory is still there is history, whatever its status, and stays listed.
- seals of a journal segment cut short by a crash, in runs that are over (ended or dead, never live or
  paused): a partial `.zst.tmp`, and the plain copy of a sealed segment whose compressed copy was
  completed (renamed into place, so whole, and its index reads) before the crash could remove the plain
  one. Readers already take either; this is disk only: up to two segments (16 MiB) per crash and rank.

A run's records are never touched: checkpoints, run.json, and every journal segment but such a second
copy of one stay.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _segments, registry

#: The files a bus puts in its socket directory: a directory holding anything else is left alone.
SOCKET_NAMES = frozenset({"pub", "replay", "inbox"})
#: An empty socket directory younger than this (seconds) may belong to a trainer that is binding right now.
EMPTY_GRACE_S = 60.0


@dataclass
class Garbage:
    """What `find` found: stale socket directories, registry entries and unfinished seals (paths), each
    with why."""

    socket_dirs: list[tuple[Path, str]] = field(default_factory=list)
    entries: list[tuple[Path, str]] = field(default_factory=list)
    seals: list[tuple[Path, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.socket_dirs or self.entries or self.seals)

    def describe(self) -> list[str]:
        return ([f"socket dir {path}  ({why})" for path, why in self.socket_dirs]
                + [f"registry entry {path}  ({why})" for path, why in self.entries]
                + [f"journal file {path}  ({why})" for path, why in self.seals])


def socket_bases() -> list[Path]:
    """The directories socket directories are made in, as `registry.socket_dir` picks them (both, when
    XDG_RUNTIME_DIR is set: an earlier run may have started without it). Only existing ones, real
    directories of ours: nothing is created or followed."""
    candidates = []
    runtime = registry._runtime_dir()
    if runtime is not None:
        candidates.append(runtime / "fg")
    candidates.append(Path(tempfile.gettempdir()) / f"fg-{os.getuid()}")
    return [p for p in candidates if _own_dir(p)]


def _own_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _listening(path: Path) -> bool | None:
    """True if something accepts connections on the unix socket `path`, False if nothing does (refused, or
    gone), None if that cannot be told (then it counts as in use)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return None
    finally:
        s.close()


def _live_socket_dirs() -> set[str]:
    """The socket directories that registered runs still alive (live, stalled, paused) name, every rank."""
    names = set()
    for info in registry.list_runs():
        if not info.is_live:
            continue
        for path in [info.bus_dir / registry.RUN_FILE, *info.bus_dir.glob("rank*.json")]:
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("sockets_dir")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, str):
                names.add(os.path.realpath(value))
    return names


def _stale_socket_dir(path: Path, live: set[str], now: float) -> str | None:
    """Why `path` is a dead run's socket directory, or None to keep it."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    if os.path.realpath(path) in live:
        return None
    try:
        names = os.listdir(path)
    except OSError:
        return None
    if not set(names) <= SOCKET_NAMES:
        return None  # something that is not a bus's: not ours to judge
    if not names:
        return "empty" if now - st.st_mtime > EMPTY_GRACE_S else None
    for name in names:
        try:
            if not stat.S_ISSOCK(os.lstat(path / name).st_mode):
                return None
        except OSError:
            continue
        if _listening(path / name) is not False:
            return None
    return "no process listens on its sockets"


def _stale_entry(entry: Path) -> str | None:
    """Why registry entry `entry` points at nothing, or None (a broken entry is left for `ls` to report)."""
    bus_dir = _bus_dir_of(entry)
    if bus_dir is None or bus_dir.exists():
        return None
    if not bus_dir.parent.parent.exists():
        return f"its output dir {bus_dir.parent.parent} is gone"
    return f"its run dir {bus_dir} is gone"


def _unfinished_seals(bus_dir: Path) -> list[tuple[Path, str]]:
    """The files a seal cut short left in the journals of the run in `bus_dir` (see the module's docstring),
    if that run is over: none while it is live or paused (its writer's), or if its state is unknown."""
    try:
        info = registry.load_run(bus_dir)
    except (OSError, ValueError):
        return []
    if info.is_live or info.status == registry.UNKNOWN:
        return []
    found = []
    for rank in range(info.world_size):
        live = info.journal_path(rank)
        found += [(tmp, "a compressed segment cut short by a crash") for tmp in _segments.partial_seals(live)]
        for segment in _segments.sealed_segments(live):
            if segment.plain is not None and segment.zst is not None and _whole(segment.zst):
                found.append((segment.plain, f"its compressed copy {segment.zst.name} is whole"))
    return found


def _whole(zst: Path) -> bool:
    try:
        fd = os.open(zst, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        _segments.read_index(fd)
        return True
    except OSError:  # CorruptSegment included
        return False
    finally:
        os.close(fd)


def _bus_dir_of(entry: Path) -> Path | None:
    """The run directory registry entry `entry` points at; None for an entry of the wrong shape."""
    try:
        pointer = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if type(pointer) is not dict or type(pointer.get("bus_dir")) is not str:
        return None
    return Path(pointer["bus_dir"])


def find(run_ids: set[str] | None = None) -> Garbage:
    """Every stale socket directory, registry entry and unfinished seal of this user's runs (of `run_ids`
    only, if given)."""
    found = Garbage()
    now = time.time()
    live = _live_socket_dirs()
    for base in socket_bases():
        try:
            children = sorted(base.iterdir())
        except OSError:
            continue
        for child in children:
            why = _stale_socket_dir(child, live, now)
            if why is not None:
                found.socket_dirs.append((child, why))
    for entry in sorted(registry.registry_dir().glob("*.json")):
        if run_ids is not None and entry.stem not in run_ids:
            continue
        why = _stale_entry(entry)
        if why is not None:
            found.entries.append((entry, why))
            continue
        bus_dir = _bus_dir_of(entry)
        if bus_dir is not None and bus_dir.is_dir():
            found.seals += _unfinished_seals(bus_dir)
    return found


def remove(garbage: Garbage) -> tuple[int, int, int, list[str]]:
    """Remove what `find` found, checking each again just before (a run may have started since). Returns
    (socket dirs, registry entries and journal files removed, an error line for each that could not be)."""
    dirs = 0
    errors: list[str] = []
    live = _live_socket_dirs()
    now = time.time()
    for path, _ in garbage.socket_dirs:
        if _stale_socket_dir(path, live, now) is None:
            continue
        try:
            for name in os.listdir(path):
                if name in SOCKET_NAMES:
                    (path / name).unlink(missing_ok=True)
            path.rmdir()
            dirs += 1
        except FileNotFoundError:
            continue
        except OSError as e:
            errors.append(f"could not remove {path}: {e.strerror or e}")
    entries = _unlink_each(garbage.entries, lambda entry: _stale_entry(entry) is not None, errors)
    seals = _unlink_each(garbage.seals, lambda path: path in dict(_unfinished_seals(path.parent)), errors)
    return dirs, entries, seals, errors


def _unlink_each(found: list[tuple[Path, str]], still_garbage, errors: list[str]) -> int:
    """Remove each file of `found` that `still_garbage(path)` says still is; the number removed."""
    removed = 0
    for path, _ in found:
        if not still_garbage(path):
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as e:
            errors.append(f"could not remove {path}: {e.strerror or e}")
    return removed


def summary(dirs: int, entries: int, seals: int = 0) -> str:
    text = (f"{dirs} socket director{'y' if dirs == 1 else 'ies'} and {entries} registry "
            f"entr{'y' if entries == 1 else 'ies'} of dead runs")
    return text + (f", and {seals} journal file{'' if seals == 1 else 's'} of seals cut short" if seals else "")


def collect_quietly() -> str | None:
    """`fg-train`'s start: remove what dead runs left behind; one line saying what, or None if nothing was
    (or if anything went wrong: housekeeping never stops a run from starting)."""
    quiet = registry.logger.disabled
    registry.logger.disabled = True  # a broken registry entry is `fg-bus ls`'s to report, not the run's start
    try:
        garbage = find()
        if not garbage:
            return None
        dirs, entries, seals, _ = remove(garbage)
    except (OSError, ValueError):  # UnsafeDirectory is an OSError
        return None
    finally:
        registry.logger.disabled = quiet
    if not dirs and not entries and not seals:
        return None
    return f"removed {summary(dirs, entries, seals)} (`fg-bus gc` lists such leftovers)"
