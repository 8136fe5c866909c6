"""Checkpoints hold everything a resume needs, rotate, and a stopped-and-resumed run equals an
uninterrupted one step for step."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EventRecorder, RegressionDataset, TinyRegression
from trainer import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from trainer.chargpt import char_gpt_for
from trainer.data import CharCorpus

CORPUS_TEXT = "the quick brown fox jumps over the lazy dog. " * 40


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def char_trainer(output_dir, callbacks=(), **kwargs):
    # Dropout on, so the RNG state restored from the checkpoint matters.
    corpus = CharCorpus(block_size=16, text=CORPUS_TEXT, max_eval_blocks=4)
    torch.manual_seed(0)
    model = char_gpt_for(corpus.tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    defaults = dict(output_dir=str(output_dir), use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, num_train_epochs=3, learning_rate=3e-3, logging_steps=1,
                    save_steps=3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1)
    args = TrainingArguments(**{**defaults, **kwargs})
    return Trainer(model, args, train_dataset=corpus.train_dataset, eval_dataset=corpus.eval_dataset,
                   processing_class=corpus.tokenizer, callbacks=list(callbacks))


def losses(trainer):
    return [(h["step"], h["loss"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("stop_at", [5, 6])  # mid-epoch and at a save step that is not an epoch boundary
def test_resumed_run_equals_uninterrupted_run_step_for_step(tmp_path, stop_at):
    full = char_trainer(tmp_path / "full")
    full.train()

    interrupted = char_trainer(tmp_path / "split", callbacks=[StopAt(stop_at)])
    interrupted.train()
    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "split").glob("checkpoint-*"))
    assert last == 3 * (stop_at // 3)  # the checkpoint the resume starts from

    resumed = char_trainer(tmp_path / "split")
    resumed.train(resume_from_checkpoint=True)

    expected = losses(full)
    got = [entry for entry in losses(resumed)]
    assert [s for s, *_ in got] == [s for s, *_ in expected]  # state.log_history continues from the checkpoint
    for (step, loss, lr), (_, loss_ref, lr_ref) in zip(got, expected):
        assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6), f"step {step}"
        assert lr == pytest.approx(lr_ref, rel=1e-9)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_checkpoint_contents(tmp_path):
    trainer = char_trainer(tmp_path, max_steps=3)
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    # transformers' files (a model that is not a transformers model is saved as model.safetensors), plus ours.
    for name in ("model.safetensors", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json", "training_args.bin", "training_args.json", "data_position.json",
                 "checksums.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "TrainerControl" in state["stateful_callbacks"]
    assert not list(tmp_path.glob("*.tmp"))


def test_save_total_limit_rotates_oldest_first(tmp_path):
    trainer = char_trainer(tmp_path, max_steps=9, save_steps=2, save_total_limit=2)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-8", "checkpoint-9"]


def test_save_total_limit_keeps_the_best_checkpoint(tmp_path):
    class WorseEachTime(TrainerCallback):
        """Feeds rising eval losses so the first evaluation stays the best."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = float(state.global_step)

    trainer = char_trainer(tmp_path, callbacks=[WorseEachTime()], max_steps=8, save_steps=2, eval_strategy="steps",
                           eval_steps=2, save_total_limit=1, metric_for_best_model="eval_loss")
    trainer.train()
    assert trainer.state.best_global_step == 2
    # transformers' rule: at the end of training, save_total_limit=1 with a best checkpoint keeps only the best.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


class RisingEvalLoss(TrainerCallback):
    """Makes every evaluation worse than the one before (eval_loss = global_step)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = float(state.global_step)


@pytest.mark.parametrize("restore", [True, False])
def test_stateful_callbacks_are_restored_only_when_asked(tmp_path, restore):
    common = dict(eval_strategy="steps", eval_steps=1, save_steps=4, metric_for_best_model="eval_loss")
    first = char_trainer(tmp_path, callbacks=[RisingEvalLoss(), EarlyStoppingCallback(early_stopping_patience=50)],
                         max_steps=4, **common)
    first.train()
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    # The first evaluation sets the best; the next three do not improve on it.
    assert saved["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": 3}

    resumed = char_trainer(tmp_path, callbacks=[RisingEvalLoss(), EarlyStoppingCallback(early_stopping_patience=50)],
                           max_steps=6, restore_callback_states_from_checkpoint=restore, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    early = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback))
    assert early.early_stopping_patience_counter == (3 + 2 if restore else 2)


def test_resume_errors_name_the_problem(tmp_path):
    trainer = Trainer(TinyRegression(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                      train_dataset=RegressionDataset(4))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_a_checkpoint_at_an_epoch_boundary_resumes_at_the_next_epoch(tmp_path):
    """13 optimizer steps make an epoch here (26 micro-batches, accumulation 2)."""
    full = char_trainer(tmp_path / "full", save_steps=13)
    full.train()
    interrupted = char_trainer(tmp_path / "split", callbacks=[StopAt(13)], save_steps=13)
    interrupted.train()
    position = json.loads((tmp_path / "split" / "checkpoint-13" / "data_position.json").read_text())
    assert position == {"epoch": 1, "samples_seen_in_epoch": 0, "world_size": 1}
    recorder = EventRecorder()
    resumed = char_trainer(tmp_path / "split", callbacks=[recorder], save_steps=13)
    resumed.train(resume_from_checkpoint=True)
    # Epochs 2 and 3 only: the finished first epoch is not begun (or ended) again.
    assert [e for e in recorder.events if e[0].startswith("on_epoch")] == \
        [("on_epoch_begin", 13), ("on_epoch_end", 26), ("on_epoch_begin", 26), ("on_epoch_end", 39)]
    assert [s for s, *_ in losses(resumed)] == [s for s, *_ in losses(full)]
    for (_, loss, _), (_, loss_ref, _) in zip(losses(resumed), losses(full)):
        assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
