"""torchrun ranks on one bus, as users launch them: `fg-train --nproc-per-node 2`, two torchrun "nodes" on
loopback, resume at another world size. Gloo on the CPU; every process is real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import read_journal, registry

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
TINY, RANKS = HERE / "tiny.yaml", HERE / "ranks.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # torchrun start-up on a loaded 2-core machine takes minutes


def env(fg_home: Path) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}


def fg_train(fg_home: Path, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "fg-train"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env(fg_home))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_of(out: Path) -> registry.RunInfo:
    runs = list((out / "fg-bus").glob("*/run.json"))
    assert len(runs) == 1, runs
    return registry.load_run(runs[0].parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_sinks_attached_log_both_streams_and_rank0_loss(fg_home, tmp_path):
    out = tmp_path / "run"
    proc = fg_train(fg_home, str(TINY), "--nproc-per-node", "2", "--device", "cpu", "--output-dir", str(out),
                    "--max-steps", "40", "--sinks", "tb,json")
    info = run_of(out)
    assert info.world_size == 2 and set(info.ranks) == {"0", "1"}
    journals = {r: list(read_journal(info.journal_path(r))) for r in (0, 1)}
    for rank, journal in journals.items():
        assert [r["seq"] for r in journal] == list(range(len(journal))) and journal[-1]["event"] == "end"
        assert journal[-1]["status"] == "completed" and {r["rank"] for r in journal} == {rank}
        assert [r["global_step"] for r in journal if r["event"] == "on_step_end"] == list(range(1, 41))

    log = [json.loads(line) for line in (out / "logs" / f"{info.run_id}.jsonl").read_text().splitlines()]
    for rank, journal in journals.items():  # every rank's stream, complete and in order, in the one file
        assert [r for r in log if r["rank"] == rank] == [json.loads(json.dumps(r)) for r in journal]

    # The logged loss is the mean over ranks: both ranks log the same value at every logging step.
    losses = {r: [x["metrics"]["loss"] for x in j if x["event"] == "on_log" and "loss" in x["metrics"]]
              for r, j in journals.items()}
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    ea = EventAccumulator(str(out / "tb" / info.run_id), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == \
        [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(range(5, 41, 5), losses[0])]
    assert not (out / "tb" / info.run_id / "rank1").exists()  # rank 0's figures only, by default
    assert "Done: 40 steps" in proc.stdout and proc.stdout.count("Done:") == 1  # the summary from rank 0 only
    checkpoint = out / "checkpoint-40"  # written once (rank 0), with each rank's RNG state
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_a_stop_raised_on_rank_1_only_stops_both_ranks_at_the_same_step(fg_home, tmp_path):
    out = tmp_path / "run"
    fg_train(fg_home, str(RANKS), "--nproc-per-node", "2", "--device", "cpu", "--output-dir", str(out),
             "--max-steps", "600", "--var", "stop_rank=1", "--var", "stop_step=7")
    info = run_of(out)
    last = {}
    for rank in (0, 1):
        journal = list(read_journal(info.journal_path(rank)))
        steps = [r["global_step"] for r in journal if r["event"] == "on_step_end"]
        last[rank] = steps[-1]
        # raised at step 7 on rank 1, acted on by both at the same later step: the ranks agree on votes
        # every K steps (about 100 ms of steps, K at most 64), so it acts K to 2K-1 steps later
        # (trainer/distributed.py agree_on_step), or at the epoch's end if that comes first
        assert steps == list(range(1, last[rank] + 1)) and 8 <= last[rank] <= 7 + 127, (rank, steps)
        # the run's end says who stopped it: the callback on rank 1; rank 0 followed the ranks' agreement
        end = journal[-1]
        assert end["status"] == "stopped" and end["reason"]["by"] == ("callback" if rank else "rank"), end
        if rank:
            assert end["reason"]["callback"] == "StopOnOneRank" and end["reason"]["step"] == last[rank]
    assert last[0] == last[1]
    assert info.status == "stopped" and "another rank asked to stop" in info.end_reason["text"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == last[0]


def test_two_nodes_on_loopback_are_followed_by_one_tail(fg_home, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = []
    for node in (0, 1):
        home = fg_home if node == 0 else tmp_path / "node1-home"  # the second "host" has its own FG_HOME
        home.mkdir(exist_ok=True)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "trainer", str(TINY), "--device", "cpu", "--output-dir", str(out), "--max-steps", "30",
             "--bus-tcp", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(home)))
    tail = subprocess.Popen([str(BIN / "fg-sink"), "tail", "--ranks", "all", "--wait", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(fg_home))
    for node in nodes:
        assert node.wait(180) == 0, node.stderr.read().decode()[-3000:]
    stdout, stderr = tail.communicate(timeout=60)
    assert tail.returncode == 0, stderr
    info = run_of(out)
    assert all(e.startswith("tcp://127.0.0.1:") for r in ("0", "1") for e in
               (info.ranks[r]["pub"], info.ranks[r]["replay"], info.ranks[r]["inbox"]))
    for rank in (0, 1):
        assert f"[rank {rank} | step 30] end: completed" in stdout, stdout[-2000:]
        assert f"[rank {rank} | step 5 |" in stdout
    assert "completed (rank 0 completed, rank 1 completed)" in stderr


def test_resume_at_another_world_size_continues_the_epoch_where_it_stopped(fg_home, tmp_path):
    out = tmp_path / "run"
    fg_train(fg_home, str(TINY), "--nproc-per-node", "2", "--device", "cpu", "--output-dir", str(out),
             "--max-steps", "20")
    position = json.loads((out / "checkpoint-20" / "data_position.json").read_text())
    assert position == {"epoch": 0, "samples_seen_in_epoch": 20 * 4 * 2, "world_size": 2}
    # One rank now, from the 2-rank checkpoint: the model, optimizer and step carry over.
    proc = fg_train(fg_home, str(TINY), "--device", "cpu", "--output-dir", str(out), "--max-steps", "30",
                    "--resume", str(out / "checkpoint-20"))
    assert "rng_state.pth" in proc.stderr  # the per-rank RNG files do not fit one rank: said, not hidden
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    position = json.loads((out / "checkpoint-30" / "data_position.json").read_text())
    assert position == {"epoch": 0, "samples_seen_in_epoch": 20 * 4 * 2 + 10 * 4, "world_size": 1}
    runs = sorted((out / "fg-bus").glob("*/run.json"), key=lambda p: json.loads(p.read_text())["started"])
    resumed = list(read_journal(runs[-1].parent / "journal.rank0.jsonl"))
    assert [r["global_step"] for r in resumed if r["event"] == "on_step_end"] == list(range(21, 31))


def test_fg_bus_ctl_stop_sent_to_rank_1_stops_both_ranks_at_the_same_step(fg_home, tmp_path):
    out = tmp_path / "run"
    train = subprocess.Popen([str(BIN / "fg-train"), str(TINY), "--nproc-per-node", "2", "--device", "cpu",
                              "--output-dir", str(out), "--max-steps", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(fg_home))
    try:
        journal1 = None
        deadline = time.monotonic() + 300  # two ranks starting on a loaded 2-core machine: minutes, not seconds
        while time.monotonic() < deadline:  # until rank 1 is publishing steps
            found = list((out / "fg-bus").glob("*/journal.rank1.jsonl")) if (out / "fg-bus").exists() else []
            if found and found[0].read_bytes().count(b'"on_step_end"') > 20:
                journal1 = found[0]
                break
            time.sleep(0.1)
        assert journal1 is not None, "rank 1 never published 20 steps"
        ctl = subprocess.run([str(BIN / "fg-bus"), "ctl", str(out), "stop", "--rank", "1", "--timeout", "30"],
                             capture_output=True, text=True, timeout=60, env=env(fg_home))
        assert ctl.returncode == 0, ctl.stderr
        assert train.wait(120) == 0, train.stderr.read().decode()[-3000:]
    finally:
        train.kill()
    info = run_of(out)
    last_steps = {}
    for rank in (0, 1):
        journal = list(read_journal(info.journal_path(rank)))
        last_steps[rank] = [r["global_step"] for r in journal if r["event"] == "on_step_end"][-1]
        assert journal[-1]["event"] == "end"
    assert last_steps[0] == last_steps[1] < 100000
    applied = [r for r in read_journal(info.journal_path(1)) if r["event"] == "control" and r.get("applied")]
    # taken at a step's end on rank 1, acted on by both ranks at the same later step: K to 2K-1 steps later,
    # K at most 64 (trainer/distributed.py agree_on_step; the same step, at an epoch's end)
    assert [r["cmd"] for r in applied] == ["stop"] and last_steps[1] - 127 <= applied[0]["global_step"] <= last_steps[1]
    assert (out / f"checkpoint-{last_steps[0]}").is_dir()  # stop saves, as for one process


def test_nproc_per_node_keeps_the_output_dir_a_config_names(fg_home, tmp_path):
    out = tmp_path / "from-config"
    config = tmp_path / "named.yaml"
    config.write_text(TINY.read_text() + f"    output_dir: {out}\n")  # under `args:`, the file's last block
    fg_train(fg_home, str(config), "--nproc-per-node", "2", "--device", "cpu", "--max-steps", "4")
    assert run_of(out).world_size == 2  # both ranks wrote there, not to a fg-runs/ default
