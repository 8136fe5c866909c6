"""`fg-bus gc` with real leftovers: a real Publisher killed with SIGKILL leaves its socket directory behind;
a run's output dir deleted leaves its registry entry. Live and paused runs, and a dead run whose directory
is still there, are never touched. (fg-train removing them at its start: tests/e2e/test_abort.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from fg_bus import registry
from conftest import make_run

BIN = Path(sys.executable).parent

PUBLISHER = textwrap.dedent("""
    import sys, time
    from fg_bus import Publisher
    Publisher(sys.argv[1], sys.argv[2], system_interval=0).start()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def env(fg_home, monkeypatch):
    """A private temp dir for the sockets (never the machine's shared /tmp/fg-UID, where other runs live),
    and no XDG_RUNTIME_DIR: the processes started here and this one see the same socket base."""
    tmp = Path(tempfile.mkdtemp(prefix="gc", dir="/tmp"))  # short: socket paths are limited to ~100 bytes
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(tmp, ignore_errors=True)


class Pub:
    """A real Publisher in its own process."""

    def __init__(self, env: dict, bus_dir: Path, run_id: str):
        self.proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(bus_dir), run_id], env=env,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.info = registry.load_run(bus_dir)
        self.sockets = Path(self.info.data["sockets_dir"])
        assert sorted(p.name for p in self.sockets.iterdir()) == ["inbox", "pub", "replay"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(120)


def fg_bus(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fg-bus"), *args], capture_output=True, text=True, timeout=120, env=env)


def test_gc_lists_then_removes_only_what_dead_runs_left(env, tmp_path):
    dead = Pub(env, tmp_path / "dead" / "fg-bus" / "dead-1", "dead-20261201-000001-aaaa")
    paused = Pub(env, tmp_path / "paused" / "fg-bus" / "paused-1", "paused-20261201-000002-bbbb")
    live = Pub(env, tmp_path / "live" / "fg-bus" / "live-1", "live-20261201-000003-cccc")
    try:
        dead.kill()
        os.kill(paused.proc.pid, signal.SIGSTOP)
        make_run(tmp_path / "gone", "gone-20261201-000004-dddd", status="completed")
        shutil.rmtree(tmp_path / "gone")  # the output dir deleted: its registry entry points at nothing
        base = dead.sockets.parent
        other = base / "not-a-bus"  # something that is not a bus's socket dir: never ours to judge
        other.mkdir()
        (other / "notes.txt").write_text("keep me")
        young = base / "young"  # empty and new: a trainer may be about to bind in it
        young.mkdir()

        dry = fg_bus(env, "gc")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove socket dir {dead.sockets}" in dry.stdout
        assert "would remove registry entry" in dry.stdout and "gone-20261201-000004-dddd.json" in dry.stdout
        assert dry.stdout.count("would remove") == 2, dry.stdout
        assert "fg-bus gc --yes" in dry.stdout
        assert dead.sockets.is_dir()  # a dry run removes nothing
        assert (registry.registry_dir() / "gone-20261201-000004-dddd.json").exists()

        done = fg_bus(env, "gc", "--yes")
        assert done.returncode == 0, done.stderr
        assert "1 socket directory and 1 registry entry" in done.stderr
        assert not dead.sockets.exists()
        assert not (registry.registry_dir() / "gone-20261201-000004-dddd.json").exists()
        for kept in (paused.sockets, live.sockets):
            assert sorted(p.name for p in kept.iterdir()) == ["inbox", "pub", "replay"]
        assert (other / "notes.txt").exists() and young.is_dir()
        # The dead run's directory is still there: it stays listed (as dead), with the paused and live ones.
        ls = fg_bus(env, "ls", "--json")
        status = {r["run_id"]: r["status"] for r in json.loads(ls.stdout)}
        assert status.pop("paused-20261201-000002-bbbb") in ("paused", "live")  # paused once 5 s silent
        assert status == {"dead-20261201-000001-aaaa": "dead", "live-20261201-000003-cccc": "live"}, status

        again = fg_bus(env, "gc")
        assert again.returncode == 0 and "nothing to remove" in again.stdout, again.stdout
    finally:
        for p in (dead, paused, live):
            p.kill()

