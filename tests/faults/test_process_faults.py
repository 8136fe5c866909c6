"""Faults injected into real processes, started as a user starts them: sinks stopped and killed, the
trainer killed or signalled, a torchrun rank killed. The promise under test: no record lost, no step
stalled, nothing hangs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import read_journal, registry

BIN = Path(sys.executable).parent
TINY = Path(__file__).parents[1] / "e2e" / "tiny.yaml"
pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine


def env(fg_home: Path, **extra: str) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1", **extra}


def fg_train(fg_home: Path, out: Path, *args: str, max_steps: int = 300, preexec_fn=None,
             **extra: str) -> subprocess.Popen:
    """fg-train on tests/e2e/tiny.yaml; `extra`: environment variables."""
    return subprocess.Popen([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", str(max_steps), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env(fg_home, **extra), preexec_fn=preexec_fn)


def fg_sink(fg_home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(fg_home))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_dir(out: Path) -> Path:
    return wait_for(lambda: next(iter((out / "fg-bus").glob("*/run.json")), None), 240, "the run").parent


def steps_in(path: Path) -> int:
    return path.read_bytes().count(b'"event":"on_step_end"') if path.exists() else 0


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def as_json(records) -> list[dict]:
    return [json.loads(json.dumps(r)) for r in records]


def child_sink_pid(parent: int, kind: str) -> int | None:
    """The pid of the `python -m sinks KIND` process fg-train started."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"sinks" in argv and kind.encode() in argv:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_sink_stopped_for_10_s_stalls_no_step_and_catches_up_complete(fg_home, tmp_path):
    out = tmp_path / "run"
    sink = fg_sink(fg_home, "json", "--out", str(tmp_path / "log.jsonl"), "--wait", "60")
    train = fg_train(fg_home, out, max_steps=1500)
    journal = run_dir(out) / "journal.rank0.jsonl"
    wait_for(lambda: steps_in(tmp_path / "log.jsonl") > 50, 240, "the sink to write 50 steps")
    sink.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(10)
    sink.send_signal(signal.SIGCONT)
    resumed_at = time.time()
    assert train.wait(180) == 0, train.stderr.read().decode()[-3000:]
    assert sink.wait(60) == 0, sink.stderr.read().decode()
    records = list(read_journal(journal))
    assert lines(tmp_path / "log.jsonl") == as_json(records)  # complete, in order, nothing twice
    ends = [datetime.fromisoformat(r["timestamp"]).timestamp() for r in records if r["event"] == "on_step_end"]
    during = [b - a for a, b in zip(ends, ends[1:]) if stopped_at <= a and b <= resumed_at]
    assert len(during) > 20, "the run ended before the sink was continued: make it longer"
    # No step waited for the stopped sink (a stall would show as a gap of seconds).
    assert max(during) < 1.0, max(during)


@pytest.mark.parametrize("kind", ["json", "tb"])
def test_a_sink_killed_mid_run_and_restarted_ends_like_one_that_never_died(fg_home, tmp_path, kind):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, max_steps=800)
    bus = run_dir(out)
    where = {"json": ("--out", str(tmp_path / "{run}-%s.jsonl")), "tb": ("--logdir", str(tmp_path / "tb-%s"))}[kind]
    steady = fg_sink(fg_home, kind, "--run", str(bus), where[0], where[1] % "steady")
    crashy = fg_sink(fg_home, kind, "--run", str(bus), where[0], where[1] % "crashy")
    wait_for(lambda: steps_in(bus / "journal.rank0.jsonl") > 200, 240, "200 steps")
    time.sleep(0.3)  # let it write some output before the crash (not needed for correctness)
    crashy.send_signal(signal.SIGKILL)
    crashy.wait(10)
    restarted = fg_sink(fg_home, kind, "--run", str(bus), where[0], where[1] % "crashy")
    assert train.wait(180) == 0
    assert steady.wait(60) == 0 and restarted.wait(60) == 0, restarted.stderr.read().decode()
    handled = int(restarted.stderr.read().decode().split(" records handled")[0].rsplit(" ", 1)[1])
    records = list(read_journal(bus / "journal.rank0.jsonl"))
    assert 0 < handled < len(records)  # the restart continued where the killed sink's output ended
    run_id = records[0]["run"]
    if kind == "json":
        steady_lines = (tmp_path / f"{run_id}-steady.jsonl").read_bytes()
        assert (tmp_path / f"{run_id}-crashy.jsonl").read_bytes() == steady_lines  # byte for byte
        assert steady_lines.count(b"\n") == len(records)
    else:
        a, b = scalars(tmp_path / "tb-steady" / run_id), scalars(tmp_path / "tb-crashy" / run_id)
        assert a.keys() == b.keys()
        for tag in a:
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag  # no duplicate, no hole
            assert all((x == y) or (math.isnan(x) and math.isnan(y)) for (_, x), (_, y) in zip(a[tag], b[tag]))


def scalars(tb_run: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(tb_run), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_fg_train_exits_in_bounded_time_when_its_sink_is_stopped(fg_home, tmp_path):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, "--sinks", "json", max_steps=200, FG_SINK_EXIT_TIMEOUT="5")
    sink_pid = wait_for(lambda: child_sink_pid(train.pid, "json"), 240, "fg-train to start its json sink")
    wait_for(lambda: steps_in(run_dir(out) / "journal.rank0.jsonl") > 5, 240, "training to start")
    os.kill(sink_pid, signal.SIGSTOP)  # stopped for good: it will never finish on its own
    assert train.wait(120) == 3  # a sink it started did not finish: fg-train says so in its status
    stderr = train.stderr.read().decode()
    assert f"the json sink (pid {sink_pid}) was stopped by fg-train" in stderr, stderr[-3000:]
    end = json.loads((run_dir(out) / "journal.rank0.jsonl").read_bytes().splitlines()[-1])
    waited = time.time() - datetime.fromisoformat(end["timestamp"]).timestamp()
    assert waited < 90, f"fg-train took {waited:.1f} s after its end record to exit"
    assert "had not finished when the run's end deadline passed" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(sink_pid, 0)  # not left behind
    # Started again, the sink finishes its output from where it stopped.
    log = out / "logs" / f"{end['run']}.jsonl"
    again = fg_sink(fg_home, "json", "--run", str(out))
    assert again.wait(60) == 0, again.stderr.read().decode()
    assert lines(log) == as_json(read_journal(run_dir(out) / "journal.rank0.jsonl"))


def test_a_killed_trainer_makes_every_sink_exit_3_and_its_journal_reads_back(fg_home, tmp_path):
    out = tmp_path / "run"
    sinks = {kind: fg_sink(fg_home, kind, *extra, "--wait", "60", "--dead-after", "2") for kind, extra in
             (("json", ["--out", str(tmp_path / "log.jsonl")]), ("tb", ["--logdir", str(tmp_path / "tb")]),
              ("tail", []))}
    train = fg_train(fg_home, out, max_steps=100_000)
    journal = run_dir(out) / "journal.rank0.jsonl"
    wait_for(lambda: steps_in(tmp_path / "log.jsonl") > 100, 240, "the sinks to get going")
    train.send_signal(signal.SIGKILL)
    train.wait(10)
    killed_at = time.monotonic()
    for kind, sink in sinks.items():
        assert sink.wait(30) == 3, (kind, sink.stderr.read().decode())
        stderr = sink.stderr.read().decode()
        assert "stopped sending heartbeats" in stderr and "the run died" in stderr, (kind, stderr)
    assert time.monotonic() - killed_at < 90  # a few heartbeats (dead_after 2 s); the bound only catches a hang
    records = list(read_journal(journal))
    assert [r["seq"] for r in records] == list(range(len(records))) and records[-1]["event"] != "end"
    assert lines(tmp_path / "log.jsonl") == as_json(records)  # every record written before the kill
    ls = subprocess.run([str(BIN / "fg-bus"), "ls", "--json"], capture_output=True, text=True, env=env(fg_home))
    assert [r["status"] for r in json.loads(ls.stdout)] == ["dead"]


def test_sigterm_ends_the_run_interrupted_with_a_checkpoint_and_its_sink_complete(fg_home, tmp_path):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, "--sinks", "json", max_steps=100_000)
    journal = run_dir(out) / "journal.rank0.jsonl"
    wait_for(lambda: steps_in(journal) > 50, 240, "training to start")
    train.send_signal(signal.SIGTERM)
    assert train.wait(60) == 128 + signal.SIGTERM
    records = list(read_journal(journal))
    end = records[-1]
    assert end["event"] == "end" and end["status"] == "interrupted"
    last_step = [r["global_step"] for r in records if r["event"] == "on_step_end"][-1]
    assert (out / f"checkpoint-{last_step}" / "trainer_state.json").exists()  # the step finished, then saved
    assert lines(out / "logs" / f"{end['run']}.jsonl") == as_json(records)  # fg-train waited for its sink


@pytest.mark.slow
def test_a_killed_rank_is_reported_dead_and_the_other_ranks_stream_reads_back(fg_home, tmp_path):
    out = tmp_path / "run"
    sink = fg_sink(fg_home, "json", "--ranks", "all", "--out", str(tmp_path / "log.jsonl"), "--wait", "120",
                   "--dead-after", "2")
    train = fg_train(fg_home, out, "--nproc-per-node", "2", max_steps=100_000)
    bus = run_dir(out)
    wait_for(lambda: steps_in(bus / "journal.rank1.jsonl") > 30, 90, "rank 1 to train")
    rank1 = registry.load_run(bus, rank=1)
    os.kill(int(rank1.data["pid"]), signal.SIGKILL)
    assert train.wait(120) != 0  # torchrun ends the job as failed when a rank dies
    assert sink.wait(60) == 3, sink.stderr.read().decode()
    stderr = sink.stderr.read().decode()
    assert "rank 1 dead" in stderr and "rank 1 of run" in stderr, stderr
    log = lines(tmp_path / "log.jsonl")
    for rank in (0, 1):
        records = list(read_journal(bus / f"journal.rank{rank}.jsonl"))
        assert [r["seq"] for r in records] == list(range(len(records)))
        assert [r for r in log if r["rank"] == rank] == as_json(records)  # each stream complete up to its end


def _small_files(limit: int):
    """preexec_fn: every file this process writes stops growing at `limit` bytes (EFBIG): a full disk for
    one process. Python ignores SIGXFSZ, so the write fails with an OSError instead of killing it."""
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_journal_that_cannot_be_written_leaves_training_and_the_live_stream_going(fg_home, tmp_path):
    out = tmp_path / "run"
    sink = fg_sink(fg_home, "json", "--out", str(tmp_path / "log.jsonl"), "--wait", "60")
    train = fg_train(fg_home, out, max_steps=400, preexec_fn=_small_files(100_000))
    assert train.wait(180) == 4, train.stderr.read().decode()[-3000:]  # 4: its stream is incomplete
    stderr = train.stderr.read().decode()
    assert "fg-train: error: the run's stream is incomplete: the journal could not be written" in stderr, stderr[-3000:]
    assert stderr.count("could not be written (") == 1, stderr[-3000:]  # printed once, not once per record
    assert sink.wait(60) == 0, sink.stderr.read().decode()
    journal = run_dir(out) / "journal.rank0.jsonl"
    assert journal.stat().st_size <= 100_000
    on_disk = list(read_journal(journal))
    log = lines(tmp_path / "log.jsonl")
    # The sink, following live, has every record: those on disk, then those the journal never got.
    assert [r["seq"] for r in log] == list(range(len(log))) and log[-1]["event"] == "end"
    assert log[:len(on_disk)] == as_json(on_disk) and len(log) > len(on_disk) + 500
    assert [r["global_step"] for r in log if r["event"] == "on_step_end"] == list(range(1, 401))
    warning = next(r for r in log if r["event"] == "warning")
    assert warning["lost_from"] == len(on_disk) and "File too large" in warning["journal_error"]
    assert json.loads((run_dir(out) / "run.json").read_text())["journal_error"]

    # A sink that comes later cannot have what was never written: it says how much is lost, exits 5.
    late = fg_sink(fg_home, "json", "--run", str(out), "--out", str(tmp_path / "late.jsonl"))
    assert late.wait(60) == 5
    late_err = late.stderr.read().decode()
    assert f"{len(log) - len(on_disk)} LOST (the trainer's journal failed)" in late_err, late_err
    assert lines(tmp_path / "late.jsonl") == as_json(on_disk)
