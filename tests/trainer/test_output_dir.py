"""Output directories shared by several runs: run markers and lineages, rotation that only deletes the
lineage being trained, which checkpoint `fg-train --resume` continues (the one saved last), and what
fg-train says at start (trainer/_output_dir.py). The e2e side: tests/e2e/test_resume_dirs.py."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from conftest import RegressionDataset, TinyRegression
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer import _checkpoint as ckpt
from trainer import _output_dir as od


def trainer_in(output_dir: Path, callbacks=(), **args) -> Trainer:
    defaults = dict(output_dir=str(output_dir), use_cpu=True, disable_tqdm=True, per_device_train_batch_size=2,
                    logging_steps=1, save_steps=1)
    return Trainer(TinyRegression(), TrainingArguments(**{**defaults, **args}), train_dataset=RegressionDataset(16),
                   eval_dataset=RegressionDataset(4, seed=1), callbacks=list(callbacks))


def names(output_dir: Path) -> list[str]:
    return [p.name for p in ckpt.sorted_checkpoints(output_dir)]


def lineages(output_dir: Path) -> dict[str, str | None]:
    return {p.name: ckpt.checkpoint_lineage(p) for p in ckpt.sorted_checkpoints(output_dir)}


def fake_checkpoint(output_dir: Path, step: int, *, lineage: str | None = None, run: str | None = None,
                    saved_at: float | None = None, max_steps: int = 100) -> Path:
    """A hand-made checkpoint-N: trainer_state.json, and a run marker unless lineage is None (then
    trainer_state.json's mtime is `saved_at`)."""
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / ckpt.TRAINER_STATE_NAME).write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    if lineage is not None:
        ckpt.write_run_marker(path, lineage, run, step, max_steps)
        if saved_at is not None:
            marker = json.loads((path / ckpt.RUN_MARKER_NAME).read_text())
            (path / ckpt.RUN_MARKER_NAME).write_text(json.dumps({**marker, "saved_at": saved_at}))
    elif saved_at is not None:
        os.utime(path / ckpt.TRAINER_STATE_NAME, (saved_at, saved_at))
    return path


# -- markers and lineages --------------------------------------------------------------------------------

def test_every_checkpoint_is_marked_with_the_runs_lineage_and_a_resume_carries_it_on(tmp_path):
    first = trainer_in(tmp_path, max_steps=2)
    first.train()
    marker = ckpt.read_run_marker(tmp_path / "checkpoint-2")
    assert marker["lineage"] == first.checkpoint_lineage and marker["global_step"] == 2 and marker["max_steps"] == 2
    assert marker["run"] is None and isinstance(marker["saved_at"], float)  # no bus: no run id
    # the marker is a file of its own: trainer_state.json keeps transformers' keys only
    assert "lineage" not in json.loads((tmp_path / "checkpoint-2" / ckpt.TRAINER_STATE_NAME).read_text())
    assert ckpt.verify_checksums(tmp_path / "checkpoint-2")  # and it is covered by the checksums

    resumed = trainer_in(tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert set(lineages(tmp_path).values()) == {first.checkpoint_lineage}

    fresh = trainer_in(tmp_path / "other", max_steps=1)
    fresh.train()
    assert fresh.checkpoint_lineage != first.checkpoint_lineage


def test_a_resume_from_a_checkpoint_without_a_marker_starts_a_lineage_of_its_own(tmp_path):
    trainer_in(tmp_path, max_steps=2).train()
    (tmp_path / "checkpoint-2" / ckpt.RUN_MARKER_NAME).unlink()  # as transformers (or an older version) saved it
    (tmp_path / "checkpoint-2" / ckpt.CHECKSUMS_NAME).unlink()
    resumed = trainer_in(tmp_path, max_steps=4, save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert lineages(tmp_path) == {"checkpoint-1": lineages(tmp_path)["checkpoint-1"], "checkpoint-2": None,
                                  "checkpoint-4": resumed.checkpoint_lineage}


# -- rotation ----------------------------------------------------------------------------------------

def test_rotation_never_deletes_another_runs_checkpoints_nor_the_new_runs_in_their_favour(tmp_path):
    a = trainer_in(tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    a.train()
    assert names(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    unmarked = fake_checkpoint(tmp_path, 100)  # transformers' or an older fg-train's: no lineage

    b = trainer_in(tmp_path, max_steps=3, save_total_limit=1)  # saves 1, 2, 3
    b.train()
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-4", "checkpoint-6", "checkpoint-100"]
    assert lineages(tmp_path) == {"checkpoint-3": b.checkpoint_lineage, "checkpoint-4": a.checkpoint_lineage,
                                  "checkpoint-6": a.checkpoint_lineage, "checkpoint-100": None}
    assert unmarked.is_dir()


def test_rotation_counts_a_resumed_runs_older_checkpoints_as_its_own(tmp_path):
    trainer_in(tmp_path, max_steps=4, save_steps=2, save_total_limit=2).train()
    other = fake_checkpoint(tmp_path, 3, lineage="someone-else")
    trainer_in(tmp_path, max_steps=8, save_steps=2, save_total_limit=2).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert other.is_dir()


def test_the_end_of_training_clean_up_keeps_other_runs_checkpoints(tmp_path):
    class RisingLoss(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = float(state.global_step)

    foreign = fake_checkpoint(tmp_path, 50, lineage="older-run")
    t = trainer_in(tmp_path, [RisingLoss()], max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                   save_total_limit=1, metric_for_best_model="eval_loss")
    t.train()
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-50"] and foreign.is_dir()  # the best, and the other's


def test_a_damaged_marker_counts_as_another_runs_checkpoint(tmp_path):
    t = trainer_in(tmp_path, max_steps=2, save_total_limit=1)
    t.train()
    (tmp_path / "checkpoint-2" / ckpt.RUN_MARKER_NAME).write_text("{not json")
    assert ckpt.read_run_marker(tmp_path / "checkpoint-2") is None
    trainer_in(tmp_path, max_steps=1, save_total_limit=1).train()
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]


def test_train_resume_true_keeps_transformers_rule_the_highest_step(tmp_path):
    fake = fake_checkpoint(tmp_path, 9, lineage="old", saved_at=1.0)  # oldest, but the highest step
    trainer_in(tmp_path, max_steps=2).train()
    t = trainer_in(tmp_path, max_steps=4)
    assert t._resolve_checkpoint(True) == fake and t.checkpoint_lineage == "old"


# -- which checkpoint fg-train --resume continues ---------------------------------------------------------

ARGV = ["my config.yaml", "--max-steps", "200", "--output-dir", "out", "--resume"]


def test_resume_picks_the_checkpoint_saved_last_and_names_a_higher_step_of_another_run(tmp_path):
    fake_checkpoint(tmp_path, 434, lineage="run-a", run="chargpt-20261201-085816-3f18", saved_at=1000.0,
                    max_steps=600)
    fake_checkpoint(tmp_path, 100, lineage="run-b", run="chargpt-20261201-090000-aaaa", saved_at=2000.0,
                    max_steps=150)
    fake_checkpoint(tmp_path, 150, lineage="run-b", run="chargpt-20261201-090000-aaaa", saved_at=1500.0,
                    max_steps=150)
    plan = od.plan_resume(tmp_path, True, ARGV, max_steps=200)
    assert plan.error is None and plan.checkpoint.path == tmp_path / "checkpoint-100" and plan.lineage == "run-b"
    text = "\n".join(plan.notes)
    assert "checkpoint-100 (run chargpt-20261201-090000-aaaa, step 100 of 150" in text
    assert "checkpoint-434 (run chargpt-20261201-085816-3f18, step 434 of 600) is another run's" in text
    command = shlex.split(text.splitlines()[-1])
    assert command == ["fg-train", "my config.yaml", "--max-steps", "200", "--output-dir", "out", "--resume",
                       str(tmp_path / "checkpoint-434")]
    assert od.resume_target(tmp_path) == tmp_path / "checkpoint-100"


def test_the_resume_command_of_a_rank_under_nproc_per_node_is_the_users_command(tmp_path, monkeypatch):
    monkeypatch.setenv(od.ARGV_ENV, shlex.join(["c.yaml", "--nproc-per-node", "2", "--resume"]))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert shlex.split(od.resume_command(["c.yaml", "--output-dir", "o"], "o", Path("o/checkpoint-5"))) == [
        "fg-train", "c.yaml", "--nproc-per-node", "2", "--output-dir", "o", "--resume", "o/checkpoint-5"]


def test_resume_falls_back_on_trainer_state_mtime_for_checkpoints_without_a_marker(tmp_path):
    fake_checkpoint(tmp_path, 30, saved_at=3000.0)  # unmarked, saved last
    fake_checkpoint(tmp_path, 40, lineage="x", saved_at=2000.0)
    (tmp_path / "checkpoint-50").mkdir()  # no trainer_state.json: not a checkpoint to resume
    plan = od.plan_resume(tmp_path, True, ARGV, max_steps=200)
    assert plan.checkpoint.path == tmp_path / "checkpoint-30" and plan.lineage is None
    assert od.NO_MARKER in plan.notes[0] and "checkpoint-40" in plan.notes[1]


def test_resume_of_a_checkpoint_with_nothing_left_to_train_is_refused_naming_what_to_do(tmp_path):
    fake_checkpoint(tmp_path, 50, lineage="b", run="run-b", saved_at=1000.0, max_steps=150)
    fake_checkpoint(tmp_path, 434, lineage="a", run="run-a", saved_at=2000.0, max_steps=600)
    plan = od.plan_resume(tmp_path, True, ARGV, max_steps=150)
    assert plan.checkpoint.path == tmp_path / "checkpoint-434"
    assert "is at step 434, and this run trains to step 150 (max_steps); the run that saved it trained to 600" \
        in plan.error
    assert "nothing is left to train. Raise --max-steps above 434" in plan.error
    assert f"--resume {tmp_path / 'checkpoint-50'}" in plan.error  # the other one, with its command
    explicit = od.plan_resume(tmp_path, str(tmp_path / "checkpoint-434"), ARGV, max_steps=434)
    assert "nothing is left to train" in explicit.error
    assert od.plan_resume(tmp_path, str(tmp_path / "checkpoint-434"), ARGV, max_steps=None).error is None


def test_resume_errors_for_no_checkpoint_and_a_path_that_is_not_one(tmp_path):
    assert "no checkpoint-* directory in" in od.plan_resume(tmp_path, True, ARGV, 10).error
    assert "not a checkpoint directory" in od.plan_resume(tmp_path, str(tmp_path / "nope"), ARGV, 10).error
    assert od.plan_resume(tmp_path, None, ARGV, 10) == od.ResumePlan()


# -- what fg-train says at start -------------------------------------------------------------------------

def args_for(**kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir="x", use_cpu=True, **kwargs)


def test_planned_saves_follow_the_save_strategy():
    assert od.planned_saves(args_for(save_steps=10), 0, 35) == {10, 20, 30, 35}
    assert od.planned_saves(args_for(save_steps=10), 20, 40) == {30, 40}
    assert od.planned_saves(args_for(save_steps=0.25), 0, 8) == {2, 4, 6, 8}
    assert od.planned_saves(args_for(save_strategy="no"), 0, 8) == set()
    assert od.planned_saves(args_for(save_strategy="epoch"), 0, 8) is None
    assert od.planned_saves(args_for(save_steps=10), 0, None) is None


def test_start_notes_list_other_runs_checkpoints_and_those_this_run_overwrites(tmp_path):
    fake_checkpoint(tmp_path, 30, lineage="a", run="run-a", saved_at=1000.0, max_steps=40)
    fake_checkpoint(tmp_path, 40, lineage="a", run="run-a", saved_at=1100.0, max_steps=40)
    fake_checkpoint(tmp_path, 7, saved_at=900.0)
    own = fake_checkpoint(tmp_path, 20, lineage="b", run="run-b", saved_at=1200.0, max_steps=20)
    (tmp_path / ckpt.TRAINER_STATE_NAME).write_text("{}")  # an earlier run's final model

    fresh = od.start_notes(tmp_path, od.ResumePlan(), args_for(save_steps=10), 30)
    assert "already holds checkpoints of other runs; they are kept" in fresh[0]
    assert fresh[1].strip() == f"checkpoint-7: {od.NO_MARKER}, to step 100, last saved 1970-01-01 00:15:00 UTC"
    assert fresh[2].strip().startswith("checkpoint-30, checkpoint-40: run run-a, to step 40")
    assert fresh[3].strip().startswith("checkpoint-20: run run-b")
    assert "warning" in fresh[4] and "checkpoint-20 (run run-b), checkpoint-30 (run run-a)" in fresh[4]
    assert "final model" in fresh[5] and len(fresh) == 6

    resumed = od.start_notes(tmp_path, od.ResumePlan(od.checkpoint_info(own)), args_for(save_steps=10), 40)
    text = "\n".join(resumed)
    assert "checkpoint-20" not in text and "run-b" not in text  # this run's own: not listed
    assert "checkpoint-30 (run run-a), checkpoint-40 (run run-a)" in text and "final model" not in text
    assert od.start_notes(tmp_path / "empty", od.ResumePlan(), args_for(), 10) == []


@pytest.mark.parametrize("strategy", ["epoch", "best"])
def test_start_notes_say_may_overwrite_when_the_save_steps_are_not_known(tmp_path, strategy):
    fake_checkpoint(tmp_path, 5, lineage="a")
    fake_checkpoint(tmp_path, 50, lineage="a")
    args = args_for(save_strategy=strategy, **({"metric_for_best_model": "loss", "eval_strategy": "steps"}
                                               if strategy == "best" else {}))
    lines = od.start_notes(tmp_path, od.ResumePlan(), args, 10)
    assert lines[-1].startswith("fg-train: warning: this run may replace checkpoint-5")


def test_a_run_by_epochs_is_refused_after_the_build_when_its_checkpoint_is_at_the_end(tmp_path, capsys):
    from trainer import _command, cli

    done = fake_checkpoint(tmp_path, 8, lineage="a", run="run-a", max_steps=8)
    t = trainer_in(tmp_path, num_train_epochs=1)  # 16 examples, 2 a batch: 8 steps
    assert od.planned_max_steps(t) == 8
    plan = od.plan_resume(tmp_path, str(done), ARGV, max_steps=None)
    assert plan.error is None
    assert _command._check_output_dir(t, plan, ARGV, rank=0) == cli.EXIT_USAGE
    assert "is at step 8, and this run trains to step 8 (max_steps): nothing is left to train" in capsys.readouterr().err
