"""Runs and their discovery: private directories, run ids, status, `resolve`, `list_runs`, `wait_for_run`."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from fg_bus import registry
from fg_bus.registry import RunNotFound
from conftest import T0, make_run



def dead_pid() -> int:
    """A pid with no process behind it."""
    for pid in [4_194_303, 4_194_301, 2_000_003, *range(99_999, 1_000, -1)]:
        if not registry.pid_alive(pid):
            return pid
    raise RuntimeError("no free pid found")



def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- private directories, ids, atomic files ---------------------------------------------------------------

def test_private_dir_creates_0700(tmp_path, caplog):
    target = tmp_path / "a" / "b" / "c"
    with caplog.at_level(logging.WARNING, logger="fg_bus.registry"):
        assert registry.private_dir(target) == target
    assert target.is_dir()
    assert mode(target) == 0o700
    assert not caplog.records  # nothing to tighten
    # idempotent
    registry.private_dir(target)
    assert mode(target) == 0o700


def test_private_dir_tightens_a_loose_dir_with_a_warning(tmp_path, caplog):
    target = tmp_path / "loose"
    target.mkdir()
    os.chmod(target, 0o755)
    with caplog.at_level(logging.WARNING, logger="fg_bus.registry"):
        registry.private_dir(target)
    assert mode(target) == 0o700
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fg_bus.registry"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(target) in message and "755" in message and "0700" in message


def test_fg_home_and_registry_dir_are_private(fg_home):
    os.chmod(fg_home, 0o755)
    assert registry.fg_home() == fg_home
    assert mode(fg_home) == 0o700
    runs = registry.registry_dir()
    assert runs == fg_home / "runs" and mode(runs) == 0o700


def test_new_run_id_sanitises_names():
    pattern = r"-\d{8}-\d{6}-[0-9a-f]{4}"
    run_id = registry.new_run_id("my run/with:bad*chars")
    assert re.fullmatch(r"my-run-with-bad-chars" + pattern, run_id), run_id
    assert re.fullmatch(r"ok_name\.v2-x" + pattern, registry.new_run_id("ok_name.v2-x"))
    assert re.fullmatch(r"run" + pattern, registry.new_run_id(""))
    assert re.fullmatch(r"run" + pattern, registry.new_run_id())
    traversal = registry.new_run_id("../../etc/passwd")
    assert "/" not in traversal and os.sep not in traversal
    assert registry.new_run_id("two words").startswith("two-words-")
    for name in ("a\x00b", "tab\there", "semi;colon", "dollar$(x)", "quote'\""):
        rid = registry.new_run_id(name)
        assert re.fullmatch(r"[\w.-]+", rid), rid
        assert not set(rid) & set("/\\\x00\t;$()'\" ")
    long = registry.new_run_id("x" * 200)
    assert long.startswith("x" * 40 + "-") and not long.startswith("x" * 41)
    ids = {registry.new_run_id("same") for _ in range(20)}
    assert len(ids) > 1  # a random suffix tells apart runs started in the same second


def test_write_json_atomic(tmp_path):
    path = tmp_path / "run.json"
    registry.write_json_atomic(path, {"run_id": "r", "a": 1})
    registry.write_json_atomic(path, {"run_id": "r", "a": 2, "b": [1, 2]})
    assert registry.load_run(tmp_path).data == {"run_id": "r", "a": 2, "b": [1, 2]}
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind


def test_pid_alive():
    assert registry.pid_alive(os.getpid())
    assert not registry.pid_alive(dead_pid())


# -- status ----------------------------------------------------------------------------------------------

def test_status_of_runs(fg_home, tmp_path):
    out = tmp_path / "out"
    live = make_run(out, "live-1", started=T0 + 1)
    dead = make_run(out, "dead-1", pid=dead_pid(), started=T0 + 2)
    completed = make_run(out, "completed-1", status=registry.COMPLETED, pid=dead_pid(), started=T0 + 3)
    interrupted = make_run(out, "interrupted-1", status=registry.INTERRUPTED, pid=dead_pid(), started=T0 + 4)
    failed = make_run(out, "failed-1", status=registry.FAILED, pid=dead_pid(), started=T0 + 5)
    assert live.status == "live" and live.is_live
    assert dead.status == registry.DEAD and not dead.is_live
    assert completed.status == "completed" and not completed.is_live
    assert interrupted.status == "interrupted"
    assert failed.status == "failed" and not failed.is_live
    # the same, read back from disk through the registry
    statuses = {r.run_id: r.status for r in registry.list_runs()}
    assert statuses == {"live-1": "live", "dead-1": "dead", "completed-1": "completed",
                        "interrupted-1": "interrupted", "failed-1": "failed"}
    assert live.reload().data == live.data
    assert live.journal_path() == live.bus_dir / "journal.rank0.jsonl"
    assert live.journal_path(3) == live.bus_dir / "journal.rank3.jsonl"


def test_a_run_on_another_host_is_not_declared_dead(fg_home, tmp_path):
    info = make_run(tmp_path / "out", "remote-1", pid=dead_pid())
    info.data["host"] = socket.gethostname() + "-elsewhere"
    assert info.status == "live"  # its pid means nothing here


def test_list_runs_is_oldest_first(fg_home, tmp_path):
    out = tmp_path / "out"
    make_run(out, "c-run", started=T0 + 1)
    make_run(out, "a-run", started=T0 + 3)
    make_run(out, "b-run", started=T0 + 2)
    assert [r.run_id for r in registry.list_runs()] == ["c-run", "b-run", "a-run"]
    assert registry.list_runs()[0].bus_dir == (out / "fg-bus" / "c-run").resolve()


def test_list_runs_empty(fg_home):
    assert registry.list_runs() == []


def test_list_runs_ignores_deleted_runs(fg_home, tmp_path):
    out = tmp_path / "out"
    keep = make_run(out, "keep-1", started=T0 + 1)
    gone = make_run(out, "gone-1", started=T0 + 2)
    shutil.rmtree(gone.bus_dir)
    assert [r.run_id for r in registry.list_runs()] == ["keep-1"]
    with pytest.raises(RunNotFound):
        registry.resolve("gone-1")
    assert registry.resolve("latest").run_id == keep.run_id
    # a garbage registry entry is ignored as well
    (registry.registry_dir() / "junk.json").write_text("{not json")
    (registry.registry_dir() / "nokey.json").write_text('{"run_id": "x"}')
    assert [r.run_id for r in registry.list_runs()] == ["keep-1"]


# -- resolve ---------------------------------------------------------------------------------------------

def test_resolve_latest_is_the_newest_live_run(fg_home, tmp_path):
    out = tmp_path / "out"
    assert registry.resolve("latest") is None  # nothing registered
    make_run(out, "old-live", started=T0 + 1)
    make_run(out, "new-live", started=T0 + 2)
    make_run(out, "newer-dead", pid=dead_pid(), started=T0 + 3)
    make_run(out, "newest-ended", status=registry.COMPLETED, started=T0 + 4)
    latest = registry.resolve("latest")
    assert latest is not None and latest.run_id == "new-live"


def test_resolve_latest_is_none_when_no_run_is_live(fg_home, tmp_path):
    out = tmp_path / "out"
    make_run(out, "dead-1", pid=dead_pid(), started=T0 + 1)
    make_run(out, "done-1", status=registry.COMPLETED, pid=dead_pid(), started=T0 + 2)
    make_run(out, "failed-1", status=registry.FAILED, pid=dead_pid(), started=T0 + 3)
    assert registry.resolve("latest") is None


def test_resolve_by_id_and_unique_prefix(fg_home, tmp_path):
    out = tmp_path / "out"
    a1 = make_run(out, "alpha-20260101-000000-aaaa", started=T0 + 1)
    a2 = make_run(out, "alpha-20260101-000001-bbbb", started=T0 + 2)
    b = make_run(out, "beta-20260101-000000-cccc", pid=dead_pid(), started=T0 + 3)
    assert registry.resolve(a1.run_id).run_id == a1.run_id
    assert registry.resolve(a2.run_id).run_id == a2.run_id
    assert registry.resolve(b.run_id).run_id == b.run_id  # a dead run resolves too
    assert registry.resolve("beta").run_id == b.run_id
    assert registry.resolve("alpha-20260101-000001").run_id == a2.run_id
    assert registry.resolve("alpha-20260101-000000").run_id == a1.run_id


def test_resolve_full_id_wins_over_longer_ids_it_prefixes(fg_home, tmp_path):
    """A full run id names one run, even when another run's id starts with it."""
    out = tmp_path / "out"
    short = make_run(out, "train-20260101-000000-ab12", started=T0 + 1)
    make_run(out, "train-20260101-000000-ab12-20260102-000000-cd34", started=T0 + 2)
    assert registry.resolve(short.run_id).run_id == short.run_id


def test_resolve_ambiguous_prefix(fg_home, tmp_path):
    out = tmp_path / "out"
    make_run(out, "alpha-1", started=T0 + 1)
    make_run(out, "alpha-2", started=T0 + 2)
    with pytest.raises(RunNotFound) as info:
        registry.resolve("alpha")
    message = str(info.value)
    assert "'alpha'" in message and "2 runs" in message
    assert "alpha-1" in message and "alpha-2" in message


def test_resolve_unknown_id(fg_home, tmp_path):
    make_run(tmp_path / "out", "alpha-1")
    with pytest.raises(RunNotFound) as info:
        registry.resolve("nosuchrun")
    message = str(info.value)
    assert "nosuchrun" in message and "fg-bus ls" in message
    assert isinstance(info.value, LookupError)


def test_resolve_by_bus_directory(fg_home, tmp_path):
    out = tmp_path / "out"
    a = make_run(out, "alpha-1", started=T0 + 1)
    make_run(out, "alpha-2", started=T0 + 2)
    assert registry.resolve(str(a.bus_dir)).run_id == "alpha-1"
    assert registry.resolve(a.bus_dir).run_id == "alpha-1"
    # a bus directory needs no registry entry
    unregistered = make_run(tmp_path / "elsewhere", "solo-1", register=False)
    assert registry.resolve(str(unregistered.bus_dir)).run_id == "solo-1"


def test_resolve_by_output_directory_newest_run_wins(fg_home, tmp_path):
    out = tmp_path / "out"
    make_run(out, "zzz-older", started=T0 + 1, status=registry.COMPLETED)  # sorts last by name, but is older
    make_run(out, "aaa-newer", started=T0 + 5, status=registry.COMPLETED)
    make_run(out, "mmm-middle", started=T0 + 3, status=registry.COMPLETED)
    (out / registry.BUS_DIRNAME / "not-a-run").mkdir()  # a stray directory without run.json
    assert registry.resolve(str(out)).run_id == "aaa-newer"
    assert registry.resolve(out).run_id == "aaa-newer"


def test_resolve_directory_that_is_not_a_run(fg_home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunNotFound) as info:
        registry.resolve(str(empty))
    assert str(empty) in str(info.value)
    broken = tmp_path / "broken" / registry.BUS_DIRNAME / "r1"
    broken.mkdir(parents=True)
    (broken / registry.RUN_FILE).write_text("{truncated")
    with pytest.raises(RunNotFound):
        registry.resolve(str(broken))


# -- wait_for_run ----------------------------------------------------------------------------------------

def test_wait_for_run_times_out_when_nothing_is_live(fg_home, tmp_path):
    make_run(tmp_path / "out", "dead-1", pid=dead_pid())
    t = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        registry.wait_for_run("latest", timeout=0.5)
    elapsed = time.monotonic() - t
    assert 0.5 <= elapsed < 60  # waited its timeout, and gave up (the bound only catches a hang)
    assert "0.5" in str(info.value)


def test_wait_for_run_returns_a_run_that_starts_while_waiting(fg_home, tmp_path):
    out = tmp_path / "out"
    make_run(out, "dead-1", pid=dead_pid(), started=T0)
    errors = []

    def start_later():
        try:
            time.sleep(0.4)
            make_run(out, "fresh-1", started=time.time())
        except Exception as e:  # pragma: no cover - surfaced by the assertion below
            errors.append(e)

    thread = threading.Thread(target=start_later)
    t = time.monotonic()
    thread.start()
    try:
        info = registry.wait_for_run("latest", timeout=10, poll=0.05)
    finally:
        thread.join()
    assert not errors
    assert info.run_id == "fresh-1" and info.is_live
    assert 0.3 <= time.monotonic() - t < 60  # it waited for the start (the bound only catches a hang)


def test_wait_for_run_started_after(fg_home, tmp_path):
    make_run(tmp_path / "out", "old-live", started=T0)
    assert registry.wait_for_run("latest", timeout=0.5).run_id == "old-live"
    with pytest.raises(TimeoutError):
        registry.wait_for_run("latest", timeout=0.3, started_after=T0 + 10, poll=0.05)


def test_wait_for_run_with_an_id_does_not_wait(fg_home, tmp_path):
    make_run(tmp_path / "out", "done-1", status=registry.COMPLETED)
    assert registry.wait_for_run("done-1", timeout=0.1).run_id == "done-1"
    with pytest.raises(RunNotFound):
        registry.wait_for_run("nosuch", timeout=5)


RUN_ID = r"-\d{8}-\d{6}-[0-9a-f]{4}"


@pytest.mark.parametrize("name, part", [
    ("chargpt-20261201-085816", "chargpt"),  # fg-train's default output dir, fg-runs/NAME-TIME
    ("chargpt-20261201-085816-20261201-085816-3f18", "chargpt"),  # the doubled id of old
    ("chargpt-20261201-085816-3f18", "chargpt"),  # an earlier run id as a name
    ("exp_20261201_085816", "exp"), ("exp-2026-12-01_08-58-16", "exp"), ("exp.2026-12-01T08:58:16", "exp"),
    ("v1.2-20261201", "v1.2-20261201"),  # a date alone is part of the name
    ("lr-3e-4--bs 16__", "lr-3e-4-bs-16"), ("---", "run"), ("20261201-085816", "run"), ("été", "t"),
])
def test_run_id_is_name_time_suffix_once(name, part):
    run_id = registry.new_run_id(name)
    assert re.fullmatch(re.escape(part) + RUN_ID, run_id), run_id
    assert registry.new_run_id(run_id).startswith(part + "-")  # a run id as a name: no second timestamp
    assert re.fullmatch(re.escape(part) + RUN_ID, registry.new_run_id(run_id))


def test_run_id_name_is_cut_at_40_without_trailing_punctuation():
    part = registry.run_name_part("a" * 39 + "-bcdef")
    assert part == "a" * 39 and len(registry.new_run_id("x" * 100).split("-")[0]) == 40


def test_new_format_ids_resolve_by_prefix_and_list(fg_home, tmp_path):
    import json
    import subprocess
    import sys

    a = make_run(tmp_path / "a", registry.new_run_id("chargpt-20261201-085816"))
    b = make_run(tmp_path / "b", registry.new_run_id("other"))
    assert registry.resolve(a.run_id).bus_dir == a.bus_dir
    assert registry.resolve("chargpt-").bus_dir == a.bus_dir  # unique prefix
    assert registry.resolve(a.run_id[:-5]).bus_dir == a.bus_dir  # the id without its suffix
    assert registry.resolve("oth").bus_dir == b.bus_dir
    ls = subprocess.run([str(Path(sys.executable).parent / "fg-bus"), "ls", "--json"], capture_output=True,
                        text=True, timeout=60, check=True)
    assert sorted(r["run_id"] for r in json.loads(ls.stdout)) == sorted([a.run_id, b.run_id])
