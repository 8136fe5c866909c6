"""Faults on the reading side: journals garbled, emptied, cut or holding one huge line; a trainer stopped
(not dead); a socket directory another user controls; run files of the wrong shape; a deleted run.json.
Real journals come from a real Publisher (or `fg-train`), and are read back through `fg-bus cat` and
`fg-sink` as subprocesses and through a Subscriber. The promise under test: a reader never reports a
complete stream when records are missing, never holds an oversized line, never mistakes a paused trainer
for a dead one, and answers bad input with a message, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from fg_bus import Publisher, Subscriber, journal, read_journal, records, registry
from fg_bus.journal import JournalStats
from conftest import make_run
from test_process_faults import BIN, as_json, env, fg_sink, fg_train, lines, run_dir, steps_in, wait_for

pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine
N = 120  # records a published run holds (its end record is seq N)
STOPPED_FOR = 6.0  # seconds a trainer is stopped: 3 x the sink's dead_after, past registry.PAUSED_AFTER


def fg_bus(fg_home: Path, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fg-bus"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env(fg_home, **extra))


def published_run(tmp_path: Path, n: int = N, big: dict[int, int] | None = None) -> Path:
    """A run ended by a real Publisher: n records (seq 0..n-1; seq s padded to big[s] bytes), then `end`."""
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("readers")).start()
    for seq in range(n):
        pub.publish("on_log", seq, metrics={"loss": 1.0 / (seq + 1)}, pad="x" * (big or {}).get(seq, 0))
    pub.close()
    return pub.bus_dir


def garble_line(path: Path, index: int) -> None:
    """Overwrite line `index` in place (same length, so offsets still hold): it is no JSON any more."""
    data = path.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
    start, end = starts[index], starts[index + 1] - 1
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"#" * (end - start))


def drain(sub: Subscriber) -> list[dict]:
    return list(sub)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# -- holes: garbled, emptied, cut ------------------------------------------------------------------------

def test_a_line_garbled_mid_journal_is_a_hole_cat_names_and_exits_6_for(fg_home, tmp_path):
    bus = published_run(tmp_path)
    garble_line(bus / "journal.rank0.jsonl", 50)
    proc = fg_bus(fg_home, "cat", str(bus))
    assert proc.returncode == 6, proc.stderr
    assert [json.loads(line)["seq"] for line in proc.stdout.splitlines()] == [s for s in range(N + 1) if s != 50]
    assert "1 holes (seq 50)" in proc.stderr and "1 malformed (1 not-json)" in proc.stderr, proc.stderr
    assert "incomplete" in proc.stderr
    sub = Subscriber(str(bus))
    got = drain(sub)
    assert len(got) == N and sub.status == "completed"
    assert (sub.stats.holes, sub.stats.hole_ranges) == (1, [(50, 50)])


def test_a_live_subscriber_whose_replay_cannot_supply_a_record_counts_the_hole_and_goes_on(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("live"), heartbeat_interval=0.2).start()
    try:
        for seq in range(100):
            pub.publish("on_log", seq, metrics={"loss": float(seq)})
        path = pub.bus_dir / "journal.rank0.jsonl"
        wait_for(lambda: path.read_bytes().count(b"\n") >= 100, 30, "the journal to hold 100 records")
        garble_line(path, 40)
        sub = Subscriber(pub.run_id, from_seq=0, dead_after=30)  # joins late: seq 0..99 come by replay
        got = []
        deadline = time.monotonic() + 60
        while not sub.caught_up or len(got) < 99:
            got += sub.poll(0.5)
            assert time.monotonic() < deadline, f"stuck at {len(got)} records, stats {sub.stats}"
        for seq in range(100, 150):
            pub.publish("on_log", seq, metrics={"loss": float(seq)})
    finally:
        pub.close()
    got += drain(sub)
    assert [r["seq"] for r in got] == [s for s in range(151) if s != 40]
    assert sub.status == "completed"
    assert (sub.stats.holes, sub.stats.hole_ranges) == (1, [(40, 40)])
    assert sub.stats.malformed == {"not-json": 1}


@pytest.mark.parametrize("cut", ["emptied", "cut"])
def test_a_journal_emptied_or_cut_after_the_run_is_a_hole_up_to_run_json_last_seq(fg_home, tmp_path, cut):
    bus = published_run(tmp_path)
    path = bus / "journal.rank0.jsonl"
    keep = 0 if cut == "emptied" else sum(len(line) + 1 for line in path.read_bytes().splitlines()[:70])
    os.truncate(path, keep)
    first = 0 if cut == "emptied" else 70
    proc = fg_bus(fg_home, "cat", str(bus))
    assert proc.returncode == 6, proc.stderr
    assert len(proc.stdout.splitlines()) == first
    assert f"{N + 1 - first} holes (seq {first}..{N})" in proc.stderr, proc.stderr
    sub = Subscriber(str(bus))
    assert len(drain(sub)) == first
    assert sub.stats.hole_ranges == [(first, N)] and sub.stats.holes == N + 1 - first
    assert sub.status == "completed"  # as run.json says: the journal lost it, the run did not


# -- one huge line ---------------------------------------------------------------------------------------

def test_a_40_mb_line_is_skipped_without_being_held_and_the_records_after_it_are_read(fg_home, tmp_path):
    # The publisher itself refuses a record over the bound (next test), so the huge line is put in by hand,
    # as an older writer or a damaged file would leave it.
    bus = published_run(tmp_path, n=6, big={2: 8})
    path = bus / "journal.rank0.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"pad":"' + b"x" * 8 + b'"', b'"pad":"' + b"x" * (40 << 20) + b'"', 1))
    assert path.stat().st_size > 40 << 20
    stats = JournalStats()
    tracemalloc.start()
    try:
        seqs = [r["seq"] for r in read_journal(path, stats=stats)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seqs == [0, 1, 3, 4, 5, 6]
    assert stats.malformed == {"too-large": 1}
    # Read piece by piece and dropped past the bound: memory stays under the bound, not the line's 40 MB
    # (and no piece is copied again and again: the old reader's `pending += piece` peaked at twice the line).
    assert peak < records.MAX_RECORD_BYTES + 8 * journal.CHUNK_BYTES, peak
    proc = fg_bus(fg_home, "cat", str(bus))
    assert proc.returncode == 6, proc.stderr
    assert [json.loads(line)["seq"] for line in proc.stdout.splitlines()] == [0, 1, 3, 4, 5, 6]
    assert "1 too-large" in proc.stderr and "(seq 2)" in proc.stderr, proc.stderr


def test_the_publisher_sends_a_record_over_the_bound_as_an_error_at_its_seq(fg_home, tmp_path):
    bus = published_run(tmp_path, n=4, big={1: records.MAX_RECORD_BYTES + 1})
    stats = JournalStats()
    got = list(read_journal(bus / "journal.rank0.jsonl", stats=stats))
    assert [r["seq"] for r in got] == [0, 1, 2, 3, 4] and stats.malformed == {}
    assert "pad" not in got[1] and "bytes, over the" in got[1]["error"], got[1]


def test_a_long_line_under_the_bound_is_read_from_many_pieces(fg_home, tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "CHUNK_BYTES", 4096)
    bus = published_run(tmp_path, n=4, big={1: 3 << 20})
    stats = JournalStats()
    got = list(read_journal(bus / "journal.rank0.jsonl", stats=stats))
    assert [r["seq"] for r in got] == [0, 1, 2, 3, 4] and stats.malformed == {}
    assert len(got[1]["pad"]) == 3 << 20


# -- a stopped trainer is paused, not dead -----------------------------------------------------------------

def test_a_trainer_stopped_for_6_s_is_followed_on_and_its_sink_output_is_complete(fg_home, tmp_path):
    log = tmp_path / "log.jsonl"
    sink = fg_sink(fg_home, "json", "--out", str(log), "--wait", "60", "--dead-after", "2")
    train = fg_train(fg_home, tmp_path / "run", max_steps=400)
    bus = run_dir(tmp_path / "run")
    wait_for(lambda: steps_in(log) > 20, 240, "the sink to write 20 steps")
    train.send_signal(signal.SIGSTOP)
    try:
        beat = registry.load_run(bus).data["heartbeat"]  # not written again while stopped
        wait_for(lambda: time.time() - beat > STOPPED_FOR, 30, "the heartbeat to go stale")
        assert sink.poll() is None, sink.stderr.read().decode()  # 3 x dead_after of silence: still there
        ls = fg_bus(fg_home, "ls", "--json")
        assert [r["status"] for r in json.loads(ls.stdout)] == ["paused"], ls.stdout
        assert "paused?" in fg_bus(fg_home, "ls").stdout
    finally:
        train.send_signal(signal.SIGCONT)
    assert train.wait(180) == 0, train.stderr.read().decode()[-3000:]
    assert sink.wait(60) == 0, sink.stderr.read().decode()
    stderr = sink.stderr.read().decode()
    assert "is alive but silent" in stderr and "paused? still following" in stderr, stderr
    assert lines(log) == as_json(read_journal(bus / "journal.rank0.jsonl"))  # complete, in order, once each


# -- the socket directory --------------------------------------------------------------------------------

@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """A temp dir of our own as the shared one (TMPDIR), no XDG_RUNTIME_DIR: `<it>/fg-<uid>` is the base."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches: let it see TMPDIR
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return shared / f"fg-{os.getuid()}"


@pytest.mark.parametrize("planted", ["other-owner", "symlink", "file"])
def test_a_socket_dir_planted_by_someone_else_is_refused_with_the_reason(fg_home, tmp_path, tmpdir_env, planted):
    if planted == "other-owner":
        if os.getuid() != 0:
            pytest.skip("needs root to make a directory owned by another user")
        tmpdir_env.mkdir(mode=0o700)
        os.chown(tmpdir_env, 65534, 65534)
        reason = "belongs to uid 65534"
    elif planted == "symlink":
        (tmp_path / "attacker").mkdir(mode=0o700)
        tmpdir_env.symlink_to(tmp_path / "attacker")
        reason = "is a symbolic link"
    else:
        tmpdir_env.write_bytes(b"")
        reason = "is not a directory"
    with pytest.raises(registry.UnsafeDirectory, match=reason):
        registry.socket_dir("r")
    if planted == "symlink":
        assert list((tmp_path / "attacker").iterdir()) == []  # nothing went behind the link
    pub = Publisher(tmp_path / "bus", registry.new_run_id("t"))
    with pytest.raises(RuntimeError, match=f"could not start the bus: .*{reason}"):
        pub.start()
    if planted != "other-owner":
        return  # fg-train takes the same path: once is enough
    proc = subprocess.run([str(BIN / "fg-train"), str(Path(__file__).parents[1] / "e2e" / "tiny.yaml"), "--device",
                           "cpu", "--output-dir", str(tmp_path / "run"), "--max-steps", "3"], capture_output=True,
                          text=True, timeout=120, env=env(fg_home, TMPDIR=str(tmpdir_env.parent)))
    assert proc.returncode != 0 and reason in proc.stderr, proc.stderr[-3000:]
    no_traceback(proc)


def test_sockets_go_under_xdg_runtime_dir_when_it_is_private(fg_home, tmp_path, tmpdir_env, monkeypatch):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert registry.socket_dir("r").parent == runtime / "fg"
    runtime.chmod(0o755)  # not private: not used
    assert registry.socket_dir("r").parent == tmpdir_env


# -- run files of the wrong shape ----------------------------------------------------------------------

WRONG_SHAPES = {
    "entry-list": ("entry", [1, 2]),
    "entry-string": ("entry", "x"),
    "run-list": ("run", [1]),
    "ranks-5": ("run", {"ranks": 5}),
    "started-x": ("run", {"started": "x"}),
    "pid-abc": ("run", {"pid": "abc"}),
}


@pytest.mark.parametrize("shape", WRONG_SHAPES)
def test_a_registry_entry_or_run_json_of_the_wrong_shape_is_skipped_with_a_warning(fg_home, tmp_path, shape):
    good = make_run(tmp_path / "out", "good-20260101-000000-aaaa", pid=1 << 22, status="completed")
    bad = make_run(tmp_path / "out", "bad-20260101-000000-bbbb", started=good.data["started"] + 1)
    where, value = WRONG_SHAPES[shape]
    if where == "entry":
        broken = fg_home / "runs" / f"{bad.run_id}.json"
        broken.write_text(json.dumps(value))
    else:
        broken = bad.bus_dir / "run.json"
        broken.write_text(json.dumps(value if isinstance(value, list) else {**bad.data, **value}))
    ls = fg_bus(fg_home, "ls")
    no_traceback(ls)
    assert ls.returncode == 0 and good.run_id in ls.stdout and bad.run_id not in ls.stdout, ls.stdout
    assert str(broken) in ls.stderr, ls.stderr
    cat = fg_bus(fg_home, "cat", "latest", "--wait", "1")
    no_traceback(cat)
    assert cat.returncode == 1 and str(broken) in cat.stderr, cat.stderr
    sink = subprocess.run([str(BIN / "fg-sink"), "json", "--wait", "1", "--out", str(tmp_path / "log.jsonl")],
                          capture_output=True, text=True, timeout=60, env=env(fg_home))
    no_traceback(sink)
    assert str(broken) in sink.stderr, sink.stderr


def test_cat_refuses_a_rank_the_run_does_not_have_at_once(fg_home, tmp_path):
    bus = published_run(tmp_path, n=3)
    proc = fg_bus(fg_home, "cat", str(bus), "--rank", "5", timeout=20)  # it used to wait 30 s, silently
    assert proc.returncode == 2, proc.stderr
    assert "has no rank 5" in proc.stderr and "its ranks are 0" in proc.stderr, proc.stderr


@pytest.mark.parametrize("spec", ["bus", "output"])
def test_a_deleted_run_json_does_not_hide_an_intact_journal(fg_home, tmp_path, spec):
    bus = published_run(tmp_path, n=10)
    (bus / "run.json").unlink()
    proc = fg_bus(fg_home, "cat", str(bus if spec == "bus" else bus.parents[1]))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["seq"] for line in proc.stdout.splitlines()] == list(range(11))
    assert "no run.json" in proc.stderr and "completed" in proc.stderr, proc.stderr
    shutil.copy(bus / "journal.rank0.jsonl", tmp_path / "whole")
    os.truncate(bus / "journal.rank0.jsonl", (tmp_path / "whole").stat().st_size // 2)  # and no end record
    proc = fg_bus(fg_home, "cat", str(bus))
    assert proc.returncode == 3 and "dead" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", [str(2 ** 70), str(2 ** 63)])
def test_cat_from_a_seq_beyond_63_bits_is_refused(fg_home, value):
    proc = fg_bus(fg_home, "cat", "whatever", "--from", value)
    no_traceback(proc)
    assert proc.returncode == 2 and "63 bits" in proc.stderr, proc.stderr
