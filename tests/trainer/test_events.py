"""The exact event sequence of a run, written out by hand for small cases (see test_hf_compat.py for the
same sequences checked against transformers' own Trainer)."""

from __future__ import annotations

import pytest

from conftest import EventRecorder, RegressionDataset
from trainer import EVENTS, Trainer, TrainingArguments

EVAL_KEYS = ("epoch", "eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# transformers' keys, and this trainer's throughput keys (a batch without input_ids: no token keys)
TRAIN_LOG_KEYS = ("data_time", "epoch", "grad_norm", "learning_rate", "loss", "samples_per_second", "step_time",
                  "steps_per_second")
SUMMARY_KEYS = ("epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
                "train_steps_per_second")


def run(tiny_model, tmp_path, n_train, n_eval=2, **kwargs):
    recorder = EventRecorder()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, **kwargs)
    trainer = Trainer(tiny_model, args, train_dataset=RegressionDataset(n_train),
                      eval_dataset=RegressionDataset(n_eval, seed=1) if n_eval else None, callbacks=[recorder])
    trainer.train()
    return recorder, trainer


def step(gs, substeps=0):
    """One optimizer step ending at global_step gs, after `substeps` non-final micro-batches."""
    return ([("on_step_begin", gs - 1)] + [("on_substep_end", gs - 1)] * substeps
            + [("on_pre_optimizer_step", gs - 1), ("on_optimizer_step", gs - 1), ("on_step_end", gs)])


def evaluation(gs, batches=1):
    return [("on_prediction_step", gs)] * batches + [("on_log", gs, EVAL_KEYS), ("on_evaluate", gs, EVAL_KEYS)]


def test_steps_cadence_without_accumulation(tiny_model, tmp_path):
    recorder, _ = run(tiny_model, tmp_path, n_train=4, per_device_train_batch_size=2, num_train_epochs=1,
                      logging_steps=1, eval_strategy="steps", eval_steps=2, save_steps=2)
    assert recorder.events == [
        ("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
        *step(1), ("on_log", 1, TRAIN_LOG_KEYS),
        *step(2), ("on_log", 2, TRAIN_LOG_KEYS), *evaluation(2), ("on_save", 2),
        ("on_epoch_end", 2),
        ("on_log", 2, SUMMARY_KEYS), ("on_train_end", 2),
    ]


def test_epoch_cadence_with_accumulation_and_a_short_last_step(tiny_model, tmp_path):
    # 5 batches of 1, accumulating 2: steps of 2, 2 and 1 micro-batches (no substep in the last).
    recorder, trainer = run(tiny_model, tmp_path, n_train=5, per_device_train_batch_size=1,
                            gradient_accumulation_steps=2, num_train_epochs=1, logging_strategy="epoch",
                            eval_strategy="epoch", save_strategy="epoch")
    assert recorder.events == [
        ("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
        *step(1, substeps=1), *step(2, substeps=1), *step(3, substeps=0),
        ("on_epoch_end", 3), ("on_log", 3, TRAIN_LOG_KEYS), *evaluation(3, batches=1), ("on_save", 3),
        ("on_log", 3, SUMMARY_KEYS), ("on_train_end", 3),
    ]
    assert trainer.state.epoch == pytest.approx(1.0)
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file()


def test_two_epochs_with_logging_first_step_and_final_off_cadence_eval_and_save(tiny_model, tmp_path):
    # 3 steps per epoch, 2 epochs = 6 steps; eval every 4 steps, so step 6 is evaluated and saved only
    # because it is the last one (DefaultFlowCallback's end-of-training rule).
    recorder, _ = run(tiny_model, tmp_path, n_train=6, per_device_train_batch_size=2, num_train_epochs=2,
                      logging_steps=4, logging_first_step=True, eval_strategy="steps", eval_steps=4,
                      save_steps=4, per_device_eval_batch_size=1)
    assert recorder.events == [
        ("on_init_end", 0), ("on_train_begin", 0),
        ("on_epoch_begin", 0), *step(1), ("on_log", 1, TRAIN_LOG_KEYS), *step(2), *step(3), ("on_epoch_end", 3),
        ("on_epoch_begin", 3), *step(4), ("on_log", 4, TRAIN_LOG_KEYS), *evaluation(4, batches=2), ("on_save", 4),
        *step(5), *step(6), *evaluation(6, batches=2), ("on_save", 6), ("on_epoch_end", 6),
        ("on_log", 6, SUMMARY_KEYS), ("on_train_end", 6),
    ]


def test_every_event_receives_the_trainer_objects(tiny_model, tmp_path):
    recorder, trainer = run(tiny_model, tmp_path, n_train=4, per_device_train_batch_size=1,
                            gradient_accumulation_steps=2, num_train_epochs=1, logging_steps=1,
                            eval_strategy="steps", eval_steps=2, save_steps=2)
    expected = {"model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"}
    fired = set(recorder.kwargs_seen) | {"on_predict"}
    trainer.predict(RegressionDataset(3, seed=2))
    fired |= set(recorder.kwargs_seen)
    assert fired == set(EVENTS)
    for event, seen in recorder.kwargs_seen.items():
        assert expected <= seen, event
    assert "logs" in recorder.kwargs_seen["on_log"]
    assert "metrics" in recorder.kwargs_seen["on_evaluate"] and "metrics" in recorder.kwargs_seen["on_predict"]


def test_max_steps_overrides_epochs_and_log_history_has_steps(tiny_model, tmp_path):
    recorder, trainer = run(tiny_model, tmp_path, n_train=4, per_device_train_batch_size=2, num_train_epochs=100,
                            max_steps=5, logging_steps=2, save_strategy="no", n_eval=0)
    assert trainer.state.global_step == 5
    assert trainer.state.num_train_epochs == 3  # ceil(5 steps / 2 steps per epoch)
    assert [h["step"] for h in trainer.state.log_history] == [2, 4, 5]
    for entry in trainer.state.log_history[:-1]:
        assert all(isinstance(entry[k], float) for k in ("loss", "grad_norm", "learning_rate", "epoch"))
    assert not list(tmp_path.glob("checkpoint-*"))
    assert recorder.names().count("on_epoch_begin") == 3


def test_logged_loss_is_the_mean_since_the_last_log(tiny_model, tmp_path):
    class StepLosses(EventRecorder):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_step_end(self, args, state, control, **kwargs):
            self.losses.append(self.trainer.step_loss.item())

    cb = StepLosses()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, max_steps=6,
                             logging_steps=3, per_device_train_batch_size=2, save_strategy="no")
    trainer = Trainer(tiny_model, args, train_dataset=RegressionDataset(16), callbacks=[cb])
    cb.trainer = trainer
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([sum(cb.losses[:3]) / 3, sum(cb.losses[3:]) / 3], rel=1e-6)
