"""Control agreement under torchrun without a wait per step (trainer/distributed.py `agree_on_step`): the
step schedule's flags act at once on every rank; a flag one rank raises (a callback's stop, a `fg-bus ctl`
save or stop, a signal) is all-reduced while the next steps train and acts on every rank K to 2K-1 steps
later (one step later with FG_CONTROL_VOTE_EVERY=1, which the first scenarios use); an evaluation's votes
(early stopping) act at its step. Two real gloo ranks (torch.multiprocessing), our
Trainer on the CPU, every scenario in one process group; each rank reports what it did."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenarios(rank: int, out: Path, fg_home: str) -> dict:
    """Runs each scenario on this rank; returns {scenario: what this rank did}."""
    import trainer as fg
    from conftest import RegressionDataset, TinyRegression
    from trainer import distributed

    class Votes(fg.TrainerCallback):
        """Records the steps of every save / evaluation / log / step end; raises `vote` on `on_rank` at `step`."""

        def __init__(self, on_rank=None, step=None, vote=None, at="on_step_end"):
            self.on_rank, self.step, self.vote, self.at = on_rank, step, vote, at
            self.saves, self.evaluations, self.logs, self.step_ends = [], [], [], []
            self.bus = None

        def _maybe_vote(self, event, state, control):
            if event == self.at and rank == self.on_rank and state.global_step == self.step:
                if self.vote == "ctl-save-and-stop":  # as `fg-bus ctl` or a signal: through the bus's inbox
                    self.bus.publisher.request_control("save-and-stop", "signal SIGTERM")
                else:
                    setattr(control, self.vote, True)

        def on_step_begin(self, args, state, control, **kwargs):
            self._maybe_vote("on_step_begin", state, control)

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(state.global_step)
            self._maybe_vote("on_step_end", state, control)

        def on_evaluate(self, args, state, control, **kwargs):
            self.evaluations.append(state.global_step)
            self._maybe_vote("on_evaluate", state, control)

        def on_save(self, args, state, control, **kwargs):
            self.saves.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logs.append(state.global_step)

    scenarios = {
        # the step schedule alone: saves, evaluations and logs where they were, no vote
        "schedule": dict(),
        "stop_on_rank_1": dict(on_rank=1, step=3, vote="should_training_stop"),
        "save_on_rank_0": dict(on_rank=0, step=2, vote="should_save"),
        "ctl_on_rank_0": dict(on_rank=0, step=5, vote="ctl-save-and-stop", at="on_step_begin"),
        "early_stop_on_rank_1": dict(on_rank=1, step=4, vote="should_training_stop", at="on_evaluate"),
        # an abort voted at a step that evaluates and saves: agreed after the evaluation, before the save
        "abort_at_an_eval_step": dict(on_rank=1, step=4, vote="should_abort"),
        # the votes agreed every K steps (FG_CONTROL_VOTE_EVERY; auto: about 100 ms of steps), no evaluation
        "stop_every_4": dict(on_rank=1, step=3, vote="should_training_stop", every="4"),
        "save_every_4": dict(on_rank=0, step=7, vote="should_save", every="4"),
        "stop_auto": dict(on_rank=0, step=3, vote="should_training_stop", every="auto"),
    }
    report = {}
    for name, vote in scenarios.items():
        torch.manual_seed(0)
        os.environ["FG_CONTROL_VOTE_EVERY"] = vote.pop("every", "1")  # read as the Trainer joins
        callback = Votes(**vote)
        schedule = (dict(max_steps=10, logging_steps=3, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                         save_steps=4) if os.environ["FG_CONTROL_VOTE_EVERY"] == "1" else
                    dict(max_steps=300, logging_steps=100, eval_strategy="no", save_strategy="no"))
        args = fg.TrainingArguments(output_dir=str(out / name), use_cpu=True, disable_tqdm=True,
                                    per_device_train_batch_size=2, report_to="none", **schedule)
        bus = fg.BusCallback(system_interval=0) if vote.get("vote") == "ctl-save-and-stop" else None
        callback.bus = bus
        trainer = fg.Trainer(TinyRegression(), args, train_dataset=RegressionDataset(n=64),
                             eval_dataset=RegressionDataset(n=8), callbacks=[callback], event_bus=bus)
        trainer.train()
        if bus is not None:
            bus.close()
        report[name] = {"step": trainer.state.global_step, "saves": callback.saves, "every": distributed._every,
                        "evaluations": callback.evaluations, "logs": callback.logs, "step_ends": callback.step_ends}
    return report


def _worker(rank: int, port: int, out: str, fg_home: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), FG_HOME=fg_home)
    from trainer import distributed

    try:
        report = _scenarios(rank, Path(out), fg_home)
    finally:
        distributed.teardown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    fg_home = str(tmp_path_factory.mktemp("fg-home"))
    mp.spawn(_worker, args=(_free_port(), str(out), fg_home), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def both(reports, scenario: str) -> dict:
    """What both ranks did in `scenario`, checked to be the same on each."""
    first, second = (r[scenario] for r in reports)
    assert first == second, (scenario, first, second)
    return first


def test_the_step_schedule_acts_at_its_step_on_every_rank_with_no_vote(reports):
    did = both(reports, "schedule")
    assert did == {"step": 10, "saves": [4, 8, 10], "evaluations": [4, 8, 10], "logs": [3, 6, 9], "every": 1,
                   "step_ends": list(range(1, 11))}


def test_a_stop_raised_on_one_rank_stops_both_one_step_later(reports):
    did = both(reports, "stop_on_rank_1")
    assert did["step"] == 4 and did["step_ends"] == [1, 2, 3, 4]  # raised at step 3, acted at step 4
    assert did["saves"] == [4] and did["evaluations"] == [4]  # the schedule's step 4 happened as ever


def test_a_save_raised_on_one_rank_saves_on_both_one_step_later(reports):
    did = both(reports, "save_on_rank_0")
    assert did["saves"] == [3, 4, 8, 10] and did["step"] == 10


def test_a_ctl_save_and_stop_on_one_rank_saves_and_stops_both_one_step_later(reports):
    did = both(reports, "ctl_on_rank_0")
    # requested as step 6 begins (global_step 5), taken by the bus at its end, acted on at step 7
    assert did["step"] == 7 and did["step_ends"] == list(range(1, 8))
    assert did["saves"] == [4, 7]


def test_an_early_stop_voted_in_on_evaluate_on_one_rank_stops_both_at_the_evaluation(reports):
    did = both(reports, "early_stop_on_rank_1")
    assert did["step"] == 4 and did["evaluations"] == [4] and did["saves"] == [4]


def test_an_abort_agreed_after_an_evaluation_stops_both_ranks_there_saving_nothing(reports):
    did = both(reports, "abort_at_an_eval_step")
    assert did["step"] == 4 and did["evaluations"] == [4] and did["saves"] == []


def test_votes_agreed_every_4_steps_act_4_to_7_steps_after_they_were_raised(reports):
    # FG_CONTROL_VOTE_EVERY=4: an all-reduce issued at step 1 (due at 2, K not agreed yet), then at 2, 6,
    # 10, ...; each waited for 4 steps later. A stop raised at step 3 goes out at 6 and acts at 10.
    did = both(reports, "stop_every_4")
    assert did["step"] == 10 and did["step_ends"] == list(range(1, 11)) and did["every"] == 4
    # a save raised at step 7 goes out at 10 and is done at 14, the run going on to its end
    did = both(reports, "save_every_4")
    assert did["saves"] == [14] and did["step"] == 300


def test_votes_agreed_auto_act_at_the_same_step_on_both_ranks_within_2k_steps(reports):
    did = both(reports, "stop_auto")
    assert did["every"] in (1, 2, 4, 8, 16, 32, 64)  # K, as both ranks agreed it last
    # raised at step 3, acted on by the vote (not max_steps) within 2K-1 steps, K at most 64, or at the
    # epoch's end (step 16: 64 examples shared by 2 ranks in batches of 2), where the ranks agree at once
    assert 4 <= did["step"] <= min(3 + 2 * 64 - 1, 16) and did["step_ends"] == list(range(1, did["step"] + 1))


@pytest.mark.parametrize("value, every", [("auto", 0), ("", 0), ("1", 1), ("8", 8), ("64", 64)])
def test_fg_control_vote_every_takes_auto_or_a_power_of_two(monkeypatch, value, every):
    from trainer import distributed
    monkeypatch.setenv("FG_CONTROL_VOTE_EVERY", value)
    assert distributed.vote_every_from_env() == every


@pytest.mark.parametrize("value", ["3", "0", "128", "-4", "often"])
def test_fg_train_refuses_a_bad_fg_control_vote_every_before_starting_any_rank(monkeypatch, capsys, tmp_path, value):
    from trainer import cli
    monkeypatch.setenv("FG_CONTROL_VOTE_EVERY", value)
    assert cli.main(["--nproc-per-node", "2", "--device", "cpu", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"FG_CONTROL_VOTE_EVERY={value!r}" in err and "a power of two from 1 to 64" in err
    assert not (tmp_path / "run").exists()


def test_settle_waits_until_nothing_but_python_holds_the_tensors_it_all_reduced(monkeypatch):
    """At exit (atexit), `settle` waits for gloo's worker threads to drop the tensors of the last all-reduces:
    a worker that does it while the interpreter finalizes aborts the process (SIGABRT after a good run)."""
    import collections
    import threading

    from trainer import distributed
    monkeypatch.setattr(distributed, "_recent", collections.deque(maxlen=16))
    held = torch.ones(1, requires_grad=True)
    graph = [held * held]  # the autograd graph holds `held` from C++, as a gloo worker holds a collective's
    assert held._use_count() > 1
    distributed._recent.append(held)
    threading.Timer(0.2, graph.clear).start()  # the "worker" lets go later, while settle waits
    distributed.settle(timeout_s=120)
    assert held._use_count() == 1 and not distributed._recent


def test_settle_gives_up_after_its_timeout_with_a_warning(monkeypatch, caplog):
    import collections

    from trainer import distributed
    monkeypatch.setattr(distributed, "_recent", collections.deque(maxlen=16))
    held = torch.ones(1, requires_grad=True)
    graph = held * held  # held for good
    distributed._recent.append(held)
    distributed.settle(timeout_s=0.05)
    assert held._use_count() > 1 and not distributed._recent  # returned all the same
    assert "1 tensors of the last all-reduces are still held" in caplog.text
    del graph
