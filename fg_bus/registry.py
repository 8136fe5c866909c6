"""Where runs are, and what state they are in.

A run's bus directory (`<output_dir>/fg-bus/<run_id>/`) holds `run.json` (endpoints, pid, host, start
time, world size, status, last step) and one journal per rank. Under torchrun every rank publishes its own
stream: rank 0 writes `run.json`, rank N > 0 the same fields for itself in `rank<N>.json`, so the ranks of
a run on several hosts only need the run directory shared. A per-user registry (`$FG_HOME/runs/`, default
`~/.fg/runs/`) holds one small file per run pointing at that directory, so `latest`, a run id or a path
work from any working directory. ipc sockets live in a short private directory (`/tmp/fg-<uid>/<id>/`,
mode 0700), since socket paths are limited to about 100 bytes.
"""

from __future__ import annotations

import json
import logging
import os
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
RUNNING, COMPLETED, FAILED, INTERRUPTED, DEAD = "running", "completed", "failed", "interrupted", "dead"
#: A running run whose run.json heartbeat is older than this (seconds) is reported dead.
STALE_AFTER = 30.0


class RunNotFound(LookupError):
    pass


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) user-only (0700); tighten a looser existing one, with a warning."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); setting it to 0700", path, mode)
        os.chmod(path, 0o700)
    return path


def fg_home() -> Path:
    return private_dir(Path(os.environ.get("FG_HOME") or Path.home() / ".fg"))


def registry_dir() -> Path:
    return private_dir(fg_home() / "runs")


def socket_dir(run_id: str) -> Path:
    base = private_dir(Path(tempfile.gettempdir()) / f"fg-{os.getuid()}")
    return private_dir(base / secrets.token_hex(4))


def new_run_id(name: str = "run") -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40] or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                found.update(json.loads(path.read_text(encoding="utf-8")).get("ranks", {}))
            except (OSError, ValueError):
                continue  # being replaced right now, or broken: that rank is not reachable
        return found

    @property
    def world_size(self) -> int:
        return int(self.data.get("world_size", 1))

    def for_rank(self, rank: int, wait: float = 0.0) -> "RunInfo":
        """Rank `rank`'s own view of the run. Waits up to `wait` s for its file (ranks start a moment
        apart); raises RunNotFound if it never appears."""
        if rank == self.rank:
            return self
        deadline = time.monotonic() + wait
        while True:
            try:
                return load_run(self.bus_dir, rank)
            except RunNotFound:
                if time.monotonic() >= deadline:
                    raise RunNotFound(f"run {self.run_id} has no rank {rank} ({self.bus_dir / rank_file(rank)} "
                                      f"did not appear within {wait:g} s)") from None
                time.sleep(0.1)

    @property
    def status(self) -> str:
        """live / ended / failed / dead, as `fg-bus ls` shows it."""
        raw = self.data.get("status", RUNNING)
        if raw == RUNNING:
            local = self.data.get("host") == socket.gethostname()
            pid = self.data.get("pid")
            if local and pid is not None and not pid_alive(int(pid)):
                return DEAD
            if time.time() - self.data.get("heartbeat", time.time()) > STALE_AFTER:
                return DEAD  # no heartbeat written for a long while: killed elsewhere, or hung
            return "live"
        return {COMPLETED: "ended", INTERRUPTED: "ended", FAILED: "failed"}.get(raw, raw)

    @property
    def is_live(self) -> bool:
        return self.status == "live"

    def journal_path(self, rank: int | None = None) -> Path:
        return self.bus_dir / f"journal.rank{self.rank if rank is None else rank}.jsonl"

    def reload(self) -> "RunInfo":
        return load_run(self.bus_dir, self.rank)


def load_run(bus_dir: str | os.PathLike, rank: int = 0) -> RunInfo:
    bus_dir = Path(bus_dir)
    name = rank_file(rank)
    try:
        data = json.loads((bus_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunNotFound(f"{bus_dir} has no readable {name}: {e}") from None
    return RunInfo(bus_dir, data, rank)


def register(info: RunInfo) -> None:
    write_json_atomic(registry_dir() / f"{info.run_id}.json",
                      {"run_id": info.run_id, "bus_dir": str(info.bus_dir.resolve()),
                       "started": info.data.get("started")})


def list_runs() -> list[RunInfo]:
    """Every registered run whose directory still exists, oldest first."""
    runs = []
    for entry in registry_dir().glob("*.json"):
        try:
            pointer = json.loads(entry.read_text(encoding="utf-8"))
            runs.append(load_run(pointer["bus_dir"]))
        except (OSError, ValueError, KeyError, RunNotFound):
            continue  # a run directory that was deleted: not a run any more
    return sorted(runs, key=lambda r: (r.data.get("started", 0), r.run_id))


def _runs_in(path: Path) -> list[RunInfo]:
    if (path / RUN_FILE).is_file():
        return [load_run(path)]
    bus = path / BUS_DIRNAME
    if bus.is_dir():
        found = [load_run(d) for d in bus.iterdir() if (d / RUN_FILE).is_file()]
        return sorted(found, key=lambda r: (r.data.get("started", 0), r.run_id))
    return []


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
            raise RunNotFound(f"{path} is not a run directory (no {RUN_FILE}, no {BUS_DIRNAME}/)")
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
