"""Where runs are, and what state they are in.

A run's bus directory (`<output_dir>/fg-bus/<run_id>/`) holds `run.json` (endpoints, pid, host, start
time, world size, status, last step) and one journal per rank. Under torchrun every rank publishes its own
stream: rank 0 writes `run.json`, rank N > 0 the same fields for itself in `rank<N>.json`, so the ranks of
a run on several hosts only need the run directory shared. A per-user registry (`$FG_HOME/runs/`, default
`~/.fg/runs/`) holds one small file per run pointing at that directory, so `latest`, a run id or a path
work from any working directory. ipc sockets live in a short private directory (`$XDG_RUNTIME_DIR/fg/<id>/`
where that exists, else `/tmp/fg-<uid>/<id>/`, mode 0700, checked to be ours and not a symlink), since
socket paths are limited to about 100 bytes.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
BUS_DIRNAME = "fg-bus"
#: run.json "status" values; "dead" is never written, it is what a running entry with no process becomes.
#: How a run ended, with its `reason` (records.end_reason): completed (ran to max_steps / its epochs),
#: stopped (`fg-bus ctl` or a callback asked), interrupted (a signal), failed (an exception).
RUNNING, COMPLETED, STOPPED, FAILED, INTERRUPTED, DEAD = ("running", "completed", "stopped", "failed",
                                                          "interrupted", "dead")
END_STATUSES = (COMPLETED, STOPPED, INTERRUPTED, FAILED, DEAD)
#: What `RunInfo.status` reports besides those: "live", "paused" (the trainer's pid exists on this host but
#: its heartbeat stopped: SIGSTOP, a suspended job, a paused VM), "unknown" (its run.json is gone).
LIVE, PAUSED, UNKNOWN = "live", "paused", "unknown"
#: A live run whose trainer has made no progress for a while (its run.json has `stalled_since`): its
#: heartbeat goes on, its steps do not (a hung collective, a stuck data loader).
STALLED = "stalled"
#: A running run whose run.json heartbeat is older than this (seconds) is reported dead, unless its pid is
#: alive on this host (then it is paused).
STALE_AFTER = 30.0
#: A local run whose heartbeat (written every second) is older than this while its pid lives is paused.
PAUSED_AFTER = 5.0


class RunNotFound(LookupError):
    pass


class UnsafeDirectory(PermissionError):
    """A directory meant to be private that another user could control: a symlink, not a directory, or
    owned by someone else. The message says which and how to fix it."""


def private_dir(path: Path) -> Path:
    """Create `path` (parents as needed) user-only (0700), or check an existing one: it must be a real
    directory (not a symlink: not followed) owned by us; a looser mode is tightened, with a warning.
    Raises UnsafeDirectory otherwise: in a shared directory such as /tmp another user may have made it first,
    to read what we put there or swap our sockets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:  # opened without following a symlink, so what is checked is what is tightened
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafeDirectory(f"{path} is a symbolic link (to {os.readlink(path)}); refusing to keep private "
                                  "files behind it: remove it") from None
        if e.errno == errno.ENOTDIR:
            raise UnsafeDirectory(f"{path} is not a directory: remove it or move it away") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeDirectory(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): another user "
                                  "may have made it to read or swap what goes there; remove it, or set "
                                  "XDG_RUNTIME_DIR or TMPDIR to a directory of your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            logger.warning("%s was readable by others (mode %o); setting it to 0700", path, mode)
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def fg_home() -> Path:
    return private_dir(Path(os.environ.get("FG_HOME") or Path.home() / ".fg"))


def registry_dir() -> Path:
    return private_dir(fg_home() / "runs")


def _runtime_dir() -> Path | None:
    """$XDG_RUNTIME_DIR when it is a directory of ours that only we can enter (0700), else None."""
    value = os.environ.get("XDG_RUNTIME_DIR")
    if not value:
        return None
    try:
        st = os.lstat(value)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700:
        return Path(value)
    logger.debug("XDG_RUNTIME_DIR=%s is not a private directory of ours; sockets go under the temp dir", value)
    return None


def socket_dir(run_id: str) -> Path:
    """A fresh private directory for one run's ipc sockets: under $XDG_RUNTIME_DIR (private to us by
    design) when there is one, else `fg-<uid>` in the shared temp dir, checked by `private_dir`."""
    runtime = _runtime_dir()
    base = private_dir(runtime / "fg" if runtime is not None else Path(tempfile.gettempdir()) / f"fg-{os.getuid()}")
    return private_dir(base / secrets.token_hex(4))


#: A timestamp (and a run id's 4-hex suffix) at the end of a name: `-20261201-085816`, `_20261201_085816-3f18`,
#: `-2026-12-01_08-58-16`, `-2026-12-01T08:58:16`. A name taken from an output dir made by `fg-train`
#: (`fg-runs/NAME-TIME`) or from an earlier run id ends so; the run id's own time replaces it.
_TRAILING_TIME = re.compile(r"[-_.]*(?:\d{8}[-_T]?\d{6}|\d{4}-\d\d-\d\d[-_T]\d\d[-:]\d\d[-:]\d\d)"
                            r"(?:[-_][0-9a-f]{4})?$")
RUN_ID_NAME_MAX = 40


def run_name_part(name: str) -> str:
    """NAME of a run id: ASCII letters, digits, `-`, `_` and `.` (anything else becomes `-`, runs of `-`
    one), no trailing timestamp or run-id suffix, no leading or trailing punctuation, at most 40 characters;
    `run` if nothing is left."""
    safe = re.sub(r"-{2,}", "-", "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in name))
    while True:
        stripped = _TRAILING_TIME.sub("", safe)
        if stripped == safe:
            break
        safe = stripped
    return safe.strip("-_.")[:RUN_ID_NAME_MAX].rstrip("-_.") or "run"


def new_run_id(name: str = "run") -> str:
    """`NAME-YYYYMMDD-HHMMSS-XXXX`: NAME as `run_name_part` makes it, the local time, 4 random hex digits."""
    return f"{run_name_part(name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie, killed but not yet reaped, does not count)."""
    if type(pid) is not int or not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: state is the field after the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _int_in(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value < high


#: run.json fields a reader relies on: each is optional, but when present must have this shape.
_FIELD_CHECKS: dict[str, tuple[str, Any]] = {
    "pid": ("a process id (a positive integer)", lambda v: v is None or _int_in(v, 1, 1 << 31)),
    "host": ("a host name (a string)", lambda v: type(v) is str),
    "started": ("a time (seconds since 1970)", _number),
    "heartbeat": ("a time (seconds since 1970)", _number),
    "ended": ("a time (seconds since 1970)", lambda v: v is None or _number(v)),
    "status": ("a status string", lambda v: type(v) is str),
    "world_size": ("a positive integer", lambda v: _int_in(v, 1, 1 << 20)),
    "rank": ("a rank (an integer >= 0)", lambda v: _int_in(v, 0, 1 << 20)),
    "last_seq": ("a seq (an integer >= -1)", lambda v: v is None or _int_in(v, -1, 1 << 63)),
    "last_step": ("a step (an integer >= 0)", lambda v: v is None or _int_in(v, 0, 1 << 63)),
    "curve_server_key": ("a key (a string)", lambda v: v is None or type(v) is str),
    "journal_error": ("a message (a string)", lambda v: v is None or type(v) is str),
}


def shape_error(data: Any) -> str | None:
    """What is wrong with a decoded run.json / rank file (valid JSON of the wrong shape), or None."""
    if type(data) is not dict:
        return f"expected a JSON object, got {type(data).__name__}"
    if type(data.get("run_id")) is not str or not data["run_id"]:
        return f"run_id must be a non-empty string, got {data.get('run_id')!r:.60}"
    for key, (what, ok) in _FIELD_CHECKS.items():
        if key in data and not ok(data[key]):
            return f"{key} must be {what}, got {data[key]!r:.60}"
    ranks = data.get("ranks", {})
    if type(ranks) is not dict:
        return f"ranks must be an object of endpoints by rank, got {ranks!r:.60}"
    for rank, endpoints in ranks.items():
        if not rank.isdigit() or type(endpoints) is not dict:
            return f"ranks[{rank!r:.20}] must be a rank number holding an object of endpoints"
        if any(type(endpoints.get(k, "")) is not str for k in ("pub", "replay", "inbox")):
            return f"ranks[{rank!r}]: endpoints (pub, replay, inbox) must be strings"
    return None


def rank_file(rank: int) -> str:
    return RUN_FILE if rank == 0 else f"rank{rank}.json"


@dataclass
class RunInfo:
    """A run as `run.json` describes it; `for_rank(n)` is rank n's view (its `rank<n>.json`)."""

    bus_dir: Path
    data: dict[str, Any] = field(default_factory=dict)
    rank: int = 0

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def ranks(self) -> dict[str, dict]:
        """Endpoints by rank ("0", "1", ...): this file's, plus those of every rank file found."""
        found = dict(self.data.get("ranks", {}))
        for path in self.bus_dir.glob("rank*.json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being replaced right now, or broken: that rank is not reachable
            if shape_error(data) is None:
                found.update(data.get("ranks", {}))
        return found

    @property
    def world_size(self) -> int:
        return int(self.data.get("world_size", 1))

    def for_rank(self, rank: int, wait: float = 0.0) -> "RunInfo":
        """Rank `rank`'s own view of the run. Waits up to `wait` s for its file (ranks start a moment
        apart); raises RunNotFound at once for a rank beyond the world size, and if its file never appears."""
        if rank == self.rank:
            return self
        if not 0 <= rank < self.world_size:
            raise RunNotFound(f"run {self.run_id} has no rank {rank}: its ranks are {self.rank_names()}")
        if self.data.get("orphan"):
            if not self.journal_path(rank).exists():
                raise RunNotFound(f"{self.bus_dir} has no {self.journal_path(rank).name}")
            return RunInfo(self.bus_dir, {**self.data, "rank": rank}, rank)
        deadline = time.monotonic() + wait
        while True:
            try:
                return load_run(self.bus_dir, rank)
            except RunNotFound:
                if time.monotonic() >= deadline:
                    raise RunNotFound(f"run {self.run_id} has no rank {rank} ({self.bus_dir / rank_file(rank)} "
                                      f"did not appear within {wait:g} s)") from None
                time.sleep(0.1)

    def rank_names(self) -> str:
        return "0" if self.world_size == 1 else f"0..{self.world_size - 1} (world size {self.world_size})"

    @property
    def status(self) -> str:
        """live / stalled / paused / dead / unknown while it runs (as far as we can tell); completed / stopped /
        interrupted / failed once it ended (`end_reason` says why), as `fg-bus ls` shows it."""
        raw = self.data.get("status", RUNNING)
        if raw != RUNNING:
            return raw
        silent = time.time() - self.data.get("heartbeat", time.time())
        pid = self.data.get("pid")
        if self.is_local and pid is not None:
            if not pid_alive(pid):
                return DEAD
            # Alive but its heartbeat stopped: stopped (SIGSTOP, a suspended job) rather than dead.
            return PAUSED if silent > PAUSED_AFTER else self._live_or_stalled()
        if silent > STALE_AFTER:
            return DEAD  # elsewhere: killed, or hung, if it wrote nothing for long
        return self._live_or_stalled()

    def _live_or_stalled(self) -> str:
        return STALLED if self.data.get("stalled_since") is not None else LIVE

    @property
    def is_local(self) -> bool:
        return self.data.get("host") == socket.gethostname()

    @property
    def end_reason(self) -> dict | None:
        """Why the run ended (records.end_reason's dict, `text` always there), or None while it runs. A dead
        run's reason is what its followers saw: its process gone, or its heartbeat silent."""
        status = self.status
        if status == DEAD:
            pid = self.data.get("pid")
            if self.is_local and pid is not None and not pid_alive(pid):
                return {"text": f"its process (pid {pid}) is gone without ending the run"}
            silent = time.time() - self.data.get("heartbeat", time.time())
            return {"text": f"no heartbeat for {silent:.0f} s"}
        if status in END_STATUSES:
            reason = self.data.get("reason")
            return reason if isinstance(reason, dict) and isinstance(reason.get("text"), str) else {"text": status}
        return None

    @property
    def is_live(self) -> bool:
        """Running as far as we can tell (a paused run counts: it may go on any moment)."""
        return self.status in (LIVE, STALLED, PAUSED)

    def journal_path(self, rank: int | None = None) -> Path:
        return self.bus_dir / f"journal.rank{self.rank if rank is None else rank}.jsonl"

    def reload(self) -> "RunInfo":
        """The run's file read again (a run known only from its journal stays as it is)."""
        if self.data.get("orphan") and not (self.bus_dir / rank_file(self.rank)).exists():
            return self
        return load_run(self.bus_dir, self.rank)


class BrokenRun(RunNotFound):
    """A run file that is valid JSON of the wrong shape (or not JSON): the message names the file."""


def load_run(bus_dir: str | os.PathLike, rank: int = 0) -> RunInfo:
    bus_dir = Path(bus_dir)
    path = bus_dir / rank_file(rank)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunNotFound(f"{bus_dir} has no readable {path.name}: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BrokenRun(f"{path} is not valid JSON ({e})") from None
    problem = shape_error(data)
    if problem is not None:
        raise BrokenRun(f"{path} is not a run file: {problem}")
    return RunInfo(bus_dir, data, rank)


def journal_only(bus_dir: Path, why: str) -> RunInfo | None:
    """A run whose run.json is gone (or broken) but whose journals are there: known from the journals
    alone, status unknown (read to its end: an end record says how it ended). None if it has no journal."""
    ranks = sorted(int(m) for m in (p.name[len("journal.rank"):-len(".jsonl")] for p in bus_dir.glob("journal.rank*.jsonl"))
                   if m.isdigit())
    if not ranks:
        return None
    logger.warning("%s: %s; reading its journal%s alone (the run's status and last seq are unknown)",
                   bus_dir, why, "s" if len(ranks) > 1 else "")
    return RunInfo(bus_dir, {"run_id": _journal_run_id(bus_dir / f"journal.rank{ranks[0]}.jsonl") or bus_dir.name,
                             "status": UNKNOWN, "world_size": ranks[-1] + 1, "rank": 0, "orphan": True,
                             "started": bus_dir.stat().st_mtime})


def _journal_run_id(path: Path) -> str | None:
    """The run id in a journal's first line (None if that line is not a record)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)  # a record's run id comes early: bound what is read
        run = json.loads(first).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if type(run) is str and run else None


def register(info: RunInfo) -> None:
    write_json_atomic(registry_dir() / f"{info.run_id}.json",
                      {"run_id": info.run_id, "bus_dir": str(info.bus_dir.resolve()),
                       "started": info.data.get("started")})


_warned: set[tuple[str, float]] = set()


def _warn_once(path: Path, message: str) -> None:
    """A broken file is reported once per process (and again if it changes), not at every poll."""
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        key = (str(path), 0.0)
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", message)


def list_runs() -> list[RunInfo]:
    """Every registered run whose directory still exists, oldest first. An entry or run.json of the wrong
    shape is skipped with a warning naming the file."""
    runs = []
    for entry in registry_dir().glob("*.json"):
        try:
            pointer = json.loads(entry.read_text(encoding="utf-8"))
        except OSError:
            continue  # removed while we looked
        except ValueError as e:
            _warn_once(entry, f"skipping registry entry {entry}: not valid JSON ({e})")
            continue
        if type(pointer) is not dict or type(pointer.get("bus_dir")) is not str:
            _warn_once(entry, f"skipping registry entry {entry}: expected an object with a bus_dir string")
            continue
        try:
            runs.append(load_run(pointer["bus_dir"]))
        except BrokenRun as e:
            _warn_once(Path(pointer["bus_dir"]) / RUN_FILE, f"skipping run: {e}")
        except RunNotFound:
            continue  # a run directory that was deleted: not a run any more
    return sorted(runs, key=_start_key)


def _start_key(info: RunInfo) -> tuple:
    return info.data.get("started", 0), info.run_id


def _runs_in(path: Path) -> list[RunInfo]:
    if (path / RUN_FILE).is_file():
        try:
            return [load_run(path)]
        except BrokenRun as e:
            orphan = journal_only(path, str(e))
            if orphan is None:
                raise
            return [orphan]
    bus = path / BUS_DIRNAME
    if bus.is_dir():
        found = []
        for d in bus.iterdir():
            if (d / RUN_FILE).is_file():
                try:
                    found.append(load_run(d))
                except BrokenRun as e:
                    _warn_once(d / RUN_FILE, f"skipping run: {e}")
            elif d.is_dir() and (orphan := journal_only(d, f"no {RUN_FILE} (deleted?)")) is not None:
                found.append(orphan)
        return sorted(found, key=_start_key)
    orphan = journal_only(path, f"no {RUN_FILE} (deleted?)") if path.is_dir() else None
    return [orphan] if orphan is not None else []


def resolve(spec: str | os.PathLike) -> RunInfo | None:
    """`latest` (the newest live run; None when no run is live), a run id, or a directory (a bus directory,
    or an output directory, meaning its newest run). Raises RunNotFound for an id or path that is not a run."""
    text = str(spec)
    if text == "latest":
        live = [r for r in list_runs() if r.is_live]
        return live[-1] if live else None
    path = Path(text)
    if path.is_dir():
        runs = _runs_in(path)
        if not runs:
            raise RunNotFound(f"{path} is not a run directory (no {RUN_FILE}, no {BUS_DIRNAME}/, no journal)")
        return runs[-1]
    runs = list_runs()
    exact = [r for r in runs if r.run_id == text]
    if exact:
        return exact[-1]
    matches = [r for r in runs if r.run_id.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(f"no run {text!r} (not a run id in {registry_dir()}, not a directory); "
                          "`fg-bus ls` lists the runs")
    raise RunNotFound(f"{text!r} matches {len(matches)} runs: {', '.join(r.run_id for r in matches[:5])}")


def wait_for_run(spec: str, timeout: float | None, started_after: float | None = None, poll: float = 0.2,
                 should_stop=lambda: False) -> RunInfo | None:
    """Resolve `spec`. For `latest`: the newest live run, if one is live and started after `started_after`;
    otherwise wait for the next run to start (the first one started after the wait began, even if it has
    already ended by the time it is seen: a short run is not missed). None if `should_stop()` turns true."""
    if spec != "latest":
        return resolve(spec)
    since = time.time() if started_after is None else started_after
    info = resolve("latest")
    if info is not None and info.data.get("started", 0) >= (started_after or 0):
        return info
    deadline = None if timeout is None else time.monotonic() + timeout
    while not should_stop():
        newer = [r for r in list_runs() if r.data.get("started", 0) >= since]
        if newer:
            return newer[0]
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no run started within {timeout:g} s")
        time.sleep(poll)
    return None
