"""Sinks following the ranks of a torchrun job: one publisher per rank (as each rank process has), one run
id, one bus directory. Which ranks each sink follows, per-rank resume, a rank that never came."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import Publisher, read_journal, registry
from sinks.json_sink import JsonSink
from sinks.runner import MISSING, _Stop, follow_run, ranks_to_follow
from sinks.tb_sink import TensorBoardSink


def two_rank_run(tmp_path, steps=(1, 2, 3), close=(0, 1)) -> tuple[registry.RunInfo, list[Publisher]]:
    bus_dir = tmp_path / "out" / "fg-bus" / "r"
    run_id = registry.new_run_id("ranks")
    pubs = [Publisher(bus_dir, run_id, rank=r, world_size=2).start() for r in (0, 1)]
    for step in steps:
        for rank, pub in enumerate(pubs):
            pub.publish("on_log", step, step / 10, metrics={"loss": 1.0 + rank + step / 100})
    for rank in close:
        pubs[rank].close()
    return registry.resolve(run_id), pubs


def test_json_follows_every_rank_and_tb_rank_0_unless_asked(tmp_path):
    info, _ = two_rank_run(tmp_path)
    json_sink = JsonSink(out=str(tmp_path / "log.jsonl"))
    summary = follow_run(json_sink, info, "start", _Stop(), dead_after=5)
    json_sink.close()
    assert summary.rank_status == {0: "completed", 1: "completed"} and summary.status == "completed"
    assert "(rank 0 completed, rank 1 completed)" in summary.line("json")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for rank in (0, 1):
        assert [r for r in log if r["rank"] == rank] == \
            [json.loads(json.dumps(r)) for r in read_journal(info.journal_path(rank))]

    for ranks, dirs in (("0", [""]), ("all", ["", "rank1"])):
        tb = TensorBoardSink(logdir=str(tmp_path / f"tb-{ranks}"), ranks=ranks)
        follow_run(tb, info, "start", _Stop(), dead_after=5)
        tb.close()
        run_dir = tmp_path / f"tb-{ranks}" / info.run_id
        assert sorted(str(p.parent.relative_to(run_dir)).replace(".", "") for p in run_dir.rglob("events.out.*")) == dirs
        for sub in dirs:
            ea = EventAccumulator(str(run_dir / sub), size_guidance={"scalars": 0})
            ea.Reload()
            rank = int(sub[4:] or 0)
            assert [round(e.value, 4) for e in ea.Scalars("train/loss")] == [1.0 + rank + s / 100 for s in (1, 2, 3)]


def test_a_restarted_json_sink_resumes_each_rank_after_its_own_last_line(tmp_path):
    info, _ = two_rank_run(tmp_path)
    path = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in read_journal(info.journal_path(0))][:2] + \
        [json.dumps(r) for r in read_journal(info.journal_path(1))][:3]
    path.write_text("\n".join(lines) + "\n" + '{"v":1,"run":"tor')  # killed mid-line
    sink = JsonSink(out=str(path))
    assert sink.open_run(info) == {0: 2, 1: 3}
    sink.close()
    sink = JsonSink(out=str(path))
    follow_run(sink, info, "start", _Stop(), dead_after=5)
    sink.close()
    log = [json.loads(line) for line in path.read_text().splitlines()]
    for rank in (0, 1):
        seqs = [r["seq"] for r in log if r["rank"] == rank]
        assert seqs == list(range(len(list(read_journal(info.journal_path(rank))))))


def test_a_rank_that_never_registers_makes_the_run_dead(tmp_path):
    bus_dir = tmp_path / "out" / "fg-bus" / "r"
    pub = Publisher(bus_dir, registry.new_run_id("lonely"), rank=0, world_size=2).start()
    pub.publish("on_log", 1, 0.1)
    pub.close()
    sink = JsonSink(out=str(tmp_path / "log.jsonl"))
    summary = follow_run(sink, registry.resolve(pub.run_id), "start", _Stop(), dead_after=5, rank_wait=0.5)
    sink.close()
    assert summary.rank_status == {0: "completed", 1: MISSING} and summary.status == registry.DEAD
    assert summary.dead_ranks == [1]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2  # rank 0's stream, whole


def test_ranks_beyond_the_world_size_are_refused_with_the_range(tmp_path):
    info, _ = two_rank_run(tmp_path, steps=(1,))
    assert ranks_to_follow("all", info) == [0, 1] and ranks_to_follow("1", info) == [1]
    with pytest.raises(ValueError, match=r"has ranks 0\.\.1"):
        ranks_to_follow("0,2", info)
    with pytest.raises(ValueError, match="expected 0, all"):
        ranks_to_follow("first", info)
