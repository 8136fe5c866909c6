"""What `fg-bus top` follows: every run of the registry (or one), each with a `RunView` kept up to date.

The follower thread owns every Subscriber (and so every socket): it re-reads the registry once a second,
follows each live run from the tail of its journal on (a bounded read), replays the run shown in detail
from seq 0, and feeds the records into the views under `Follower.lock`, which the drawing thread takes to
read them. Ended runs are summarised from run.json (`progress`), not replayed, unless shown in detail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import _top_render as render
from . import registry
from .journal import decode_chunk, journal_tail_bytes, read_journal
from .monitor import RunView
from .subscriber import Subscriber

logger = logging.getLogger(__name__)

REGISTRY_EVERY = 1.0     # s between registry reads
TAIL_BYTES = 1 << 19     # a live run in the table starts from this much of its journal's end
SMALL_TAIL = 1 << 16     # an ended run whose run.json has no `progress`: its journal's last lines
LIVE = ("live", "paused", "stalled")


def journal_tail(path: Path, max_bytes: int) -> list[dict]:
    """The complete records in the last `max_bytes` of a journal (none if it cannot be read)."""
    try:
        return decode_chunk(journal_tail_bytes(path, max_bytes))
    except OSError:
        return []


def _num(value) -> float | None:
    return value if type(value) in (int, float) else None


@dataclass
class Tracked:
    """One run: its run file, its view, and (while it is followed) a Subscriber per rank."""

    info: registry.RunInfo
    view: RunView
    subs: dict[int, Subscriber] = field(default_factory=dict)
    from_seq: dict[int, int] = field(default_factory=dict)  # where each rank's subscriber starts
    full: bool = False        # the view holds the whole history (the run is or was shown in detail)
    final: str | None = None  # the stream's end, as rank 0's subscriber saw it
    final_reason: dict | None = None  # and why (the subscriber's `end_reason`)
    error: str | None = None

    def status(self) -> str:
        """live / stalled / paused, or how the run ended: completed / stopped / interrupted / failed / dead (the
        view's `end_reason` then says why: its end record's, else the subscriber's or run.json's)."""
        if self.final is not None:
            status, reason = self.final, self.final_reason
        else:
            status = self.info.status
            reason = self.info.end_reason if status not in LIVE else None
        self.view.set_status(status, reason)
        return self.view.status  # "stalled" where the records say so

    def row(self) -> render.RowData:
        v, data = self.view, self.info.data
        prog = data.get("progress") if isinstance(data.get("progress"), dict) else {}
        status = self.status()
        best = v.best_eval
        pbest = prog.get("best_eval")
        if best is None and isinstance(pbest, dict) and _num(pbest.get("value")) is not None:
            best = (str(pbest.get("name", "")), pbest["value"], pbest.get("step") or 0)
        step = v.global_step if v.steps else (_num(prog.get("global_step")) or _num(data.get("last_step")))
        util, used, total = render.gpu_figures(v.system)
        return render.RowData(
            run_id=self.info.run_id, status=status, step=None if step is None else int(step),
            max_steps=v.max_steps or _num(prog.get("max_steps")),
            eta_s=v.eta_s if v.eta_s is not None else _num(prog.get("eta_s")),
            rate=v.steps_per_second if v.steps_per_second is not None else _num(prog.get("steps_per_second")),
            loss=v.last_loss if v.last_loss is not None else _num(prog.get("last_loss")),
            best=best, gpu_util=util, gpu_used_mb=used, gpu_total_mb=total, elapsed_s=self.elapsed(),
            error=self.error, end_reason=v.end_reason if status not in LIVE else None)

    def elapsed(self) -> float | None:
        started, ended = _num(self.info.data.get("started")), _num(self.info.data.get("ended"))
        if started is None:
            return None
        return (ended if ended is not None else time.time()) - started


class Follower:
    """Every run `fg-bus top` shows, kept up to date. `spec`: one run (an id, a directory, `latest`), or
    None for every registered run. `follow`: subscribe to live runs (False: read files only, `--once`)."""

    def __init__(self, spec: str | None, follow: bool = True):
        self.spec = spec
        self.follow = follow
        self.lock = threading.Lock()
        self.runs: dict[str, Tracked] = {}
        self.version = 0           # bumped whenever something shown may have changed
        self.detail: str | None = None
        self.notes: deque = deque(maxlen=20)  # warnings logged meanwhile (shown instead of printed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._only: registry.RunInfo | None = None
        if spec is not None:
            info = registry.resolve(spec)
            if info is None:
                raise registry.RunNotFound("no live run (`fg-bus ls` lists the runs)")
            self._only = info

    # -- the registry --

    def refresh(self) -> None:
        if self._only is not None:
            try:
                infos = [self._only.reload()]
            except registry.RunNotFound:
                infos = [self._only]  # its run file went away: keep what we knew
        else:
            infos = registry.list_runs()
            gone = set(self.runs) - {info.run_id for info in infos} - {self.detail}
            for run_id in gone:  # its directory was deleted: not a run any more
                with self.lock:
                    tracked = self.runs.pop(run_id)
                    self.version += 1
                for sub in tracked.subs.values():
                    sub.close()
        for info in infos:
            with self.lock:
                tracked = self.runs.get(info.run_id)
                if tracked is None:
                    tracked = self.runs[info.run_id] = Tracked(info, RunView(info.run_id))
                    self._start(tracked)
                else:
                    tracked.info = info
                self.version += 1
        with self.lock:
            wanted = self.detail
        if wanted is not None and wanted in self.runs and not self.runs[wanted].full:
            self._replay(self.runs[wanted])
        for tracked in list(self.runs.values()):
            if self.follow and tracked.info.is_live and tracked.final is None:
                self._subscribe(tracked)

    def _start(self, tracked: Tracked) -> None:
        """A run seen for the first time: a live one starts from its journal's tail; an ended one is what
        run.json says (plus a little of its journal's end where run.json has no progress summary)."""
        info = tracked.info
        if not info.is_live and isinstance(info.data.get("progress"), dict):
            return
        for rank in range(info.world_size):
            tail = journal_tail(info.journal_path(rank), TAIL_BYTES if info.is_live else SMALL_TAIL)
            for record in tail:
                tracked.view.feed(record)
            tracked.from_seq[rank] = tail[-1]["seq"] + 1 if tail else 0

    def _subscribe(self, tracked: Tracked) -> None:
        for rank in range(tracked.info.world_size):
            if rank in tracked.subs:
                continue
            try:
                sub = Subscriber(tracked.info, from_seq=tracked.from_seq.get(rank, 0), rank=rank, rank_wait=0)
            except (registry.RunNotFound, zmq.ZMQError, OSError) as e:
                tracked.error = str(e)  # a rank not registered yet: tried again at the next refresh
                continue
            with self.lock:
                tracked.subs[rank] = sub

    def _replay(self, tracked: Tracked) -> None:
        """The run shown in detail: its whole history into a fresh view (then live, if it is)."""
        for sub in tracked.subs.values():
            sub.close()
        with self.lock:
            tracked.subs = {}
            tracked.view = RunView(tracked.info.run_id)
            tracked.from_seq = {rank: 0 for rank in range(tracked.info.world_size)}
            tracked.full, tracked.final, tracked.final_reason = True, None, None
            self.version += 1
        if not self.follow:  # --once: the journal files, read here
            for rank in range(tracked.info.world_size):
                for record in read_journal(tracked.info.journal_path(rank)):
                    tracked.view.feed(record)
            return
        for rank in range(tracked.info.world_size):
            try:
                tracked.subs[rank] = Subscriber(tracked.info, from_seq=0, rank=rank, rank_wait=0)
            except (registry.RunNotFound, zmq.ZMQError, OSError) as e:
                tracked.error = str(e)

    def _replay_wanted(self) -> bool:
        tracked = self.runs.get(self.detail) if self.detail is not None else None
        return tracked is not None and not tracked.full

    def show(self, run_id: str | None) -> None:
        """Ask for `run_id` in detail (the follower thread replays it), or None for the table."""
        with self.lock:
            self.detail = run_id

    # -- records --

    def pump(self, budget: float) -> int:
        """Feed what the subscribers have, for up to `budget` s; how many records were fed."""
        deadline = time.monotonic() + budget
        fed = 0
        while True:
            got = 0
            for tracked in list(self.runs.values()):
                for rank, sub in list(tracked.subs.items()):
                    if sub.finished:
                        continue
                    try:
                        batch = sub.poll(0)
                    except (registry.RunNotFound, zmq.ZMQError, OSError) as e:
                        tracked.error = str(e)
                        batch = []
                    with self.lock:
                        for record in batch:
                            tracked.view.feed(record)
                        if sub.finished and rank == 0:
                            tracked.final, tracked.final_reason = sub.status, sub.end_reason
                        if batch or sub.finished:
                            self.version += 1
                    got += len(batch)
            fed += got
            if not got or time.monotonic() >= deadline:
                return fed

    # -- the thread --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fg-bus-top-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_refresh = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_refresh or self._replay_wanted():
                    self.refresh()
                    next_refresh = time.monotonic() + REGISTRY_EVERY
                if not self.pump(0.1):
                    self._stop.wait(0.05)
        except Exception as e:  # shown, not fatal to the screen (a traceback would land in the middle of it)
            logger.exception("the follower stopped")
            self.notes.append((float("inf"), f"follower stopped: {e!r}"))
        finally:
            self._close_subs()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        else:
            self._close_subs()

    def _close_subs(self) -> None:
        for tracked in list(self.runs.values()):
            for sub in list(tracked.subs.values()):
                sub.close()

    # -- what is drawn --

    def ordered(self) -> list[Tracked]:
        """Live runs first, newest first within each group."""
        runs = list(self.runs.values())
        runs.sort(key=lambda t: t.info.data.get("started") or 0, reverse=True)
        return sorted(runs, key=lambda t: t.status() not in LIVE)
