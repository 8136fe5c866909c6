"""`fg-bus gc` with real leftovers: a real Publisher killed with SIGKILL leaves its socket directory behind;
a run's output dir deleted leaves its registry entry. Live and paused runs, and a dead run whose directory
is still there, are never touched; nor are a live run's journal files. (fg-train removing them at its
start: tests/e2e/test_abort.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
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



def _leave_a_cut_seal(bus_dir: Path) -> list[Path]:
    """What a crash mid-seal leaves, made from the run's own sealed segments: the plain copy of the first
    compressed one back beside it (a crash after the rename, before the unlink), and half of the second
    one as `.zst.tmp` (a crash while compressing). Returns the two files."""
    import zstandard

    zsts = sorted(bus_dir.glob("journal.rank0.*.jsonl.zst"))
    assert len(zsts) >= 2, sorted(p.name for p in bus_dir.iterdir())
    plain = zsts[0].with_name(zsts[0].name[:-len(".zst")])
    with zsts[0].open("rb") as f:  # as `zstd -dc` does: the index frame is skipped
        plain.write_bytes(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read())
    tmp = zsts[1].with_name(zsts[1].name + ".tmp")
    tmp.write_bytes(zsts[1].read_bytes()[: zsts[1].stat().st_size // 2])
    return [plain, tmp]


def test_gc_removes_the_files_a_seal_cut_short_left_in_ended_runs_only(env, tmp_path, monkeypatch):
    from fg_bus import Publisher, read_journal

    monkeypatch.setenv("FG_JOURNAL_SEGMENT_BYTES", "4096")  # sealed and compressed every 4 KB
    runs = {}
    for name in ("ended", "live"):
        pub = Publisher(tmp_path / name / "fg-bus" / "r", registry.new_run_id(name), system_interval=0).start()
        for i in range(400):
            pub.publish("on_log", i, metrics={"loss": 1.0 / (i + 1)})
        runs[name] = pub
    runs["ended"].close()
    live = runs["live"]
    live.sync()
    try:
        deadline = time.monotonic() + 120  # the live run's seal thread compresses off the bus thread
        while len(list(live.bus_dir.glob("journal.rank0.*.jsonl.zst"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        journals = {name: pub.bus_dir / "journal.rank0.jsonl" for name, pub in runs.items()}
        before = {name: list(read_journal(path)) for name, path in journals.items()}
        leftovers = {name: _leave_a_cut_seal(pub.bus_dir) for name, pub in runs.items()}

        listed = fg_bus(env, "gc")
        assert listed.returncode == 0, listed.stderr
        for path in leftovers["ended"]:
            assert f"would remove journal file {path}" in listed.stdout, listed.stdout
        assert str(live.bus_dir) not in listed.stdout  # a live run's files are its writer's
        assert all(p.exists() for p in leftovers["ended"])  # a dry run

        removed = fg_bus(env, "gc", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert "2 journal files of seals cut short" in removed.stderr, removed.stderr
        assert not any(p.exists() for p in leftovers["ended"]) and all(p.exists() for p in leftovers["live"])
        assert list(read_journal(journals["ended"])) == before["ended"]  # every record still there, once
        assert [r["seq"] for r in before["ended"]] == list(range(len(before["ended"])))
    finally:
        live.close()
