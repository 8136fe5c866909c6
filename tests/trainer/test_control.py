"""Control flags raised by callbacks take effect where transformers' Trainer honours them."""

from __future__ import annotations

import logging

from conftest import EventRecorder, RegressionDataset
from trainer import Trainer, TrainerCallback, TrainerControl, TrainingArguments


def make_trainer(tiny_model, tmp_path, callbacks, n_train=8, **kwargs):
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, per_device_train_batch_size=2,
                    num_train_epochs=2, logging_strategy="no", save_strategy="no")
    args = TrainingArguments(**{**defaults, **kwargs})
    return Trainer(tiny_model, args, train_dataset=RegressionDataset(n_train),
                   eval_dataset=RegressionDataset(2, seed=1), callbacks=callbacks)


class At(TrainerCallback):
    """Sets one control flag on on_step_end at the given global step."""

    def __init__(self, step, flag, event="on_step_end"):
        self.step, self.flag = step, flag
        setattr(self, event, self._set)

    def _set(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            setattr(control, self.flag, True)


def test_should_training_stop_ends_training_after_that_step(tiny_model, tmp_path):
    recorder = EventRecorder()
    trainer = make_trainer(tiny_model, tmp_path, [At(3, "should_training_stop"), recorder])
    trainer.train()
    assert trainer.state.global_step == 3
    # The epoch still ends (on_epoch_end), then the summary log and on_train_end.
    assert recorder.names()[-4:] == ["on_step_end", "on_epoch_end", "on_log", "on_train_end"]


def test_should_epoch_stop_skips_to_the_next_epoch(tiny_model, tmp_path):
    recorder = EventRecorder()
    trainer = make_trainer(tiny_model, tmp_path, [At(1, "should_epoch_stop"), recorder])
    trainer.train()
    # Epoch 0 stops after step 1; epoch 1 runs its four steps (4 batches of 2 per epoch).
    assert trainer.state.global_step == 5
    assert [s for e, s, *_ in recorder.events if e == "on_epoch_end"] == [1, 5]


def test_should_save_evaluate_and_log_are_acted_on_and_reset(tiny_model, tmp_path):
    recorder = EventRecorder()
    callbacks = [At(2, "should_save"), At(3, "should_evaluate"), At(4, "should_log"), recorder]
    trainer = make_trainer(tiny_model, tmp_path, callbacks, num_train_epochs=1)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [s for e, s, *_ in recorder.events if e == "on_evaluate"] == [3]
    assert [s for e, s, *_ in recorder.events if e == "on_log"] == [3, 4, 4]  # eval log, step log, summary
    assert not (trainer.control.should_save or trainer.control.should_evaluate or trainer.control.should_log)


def test_flags_are_reset_before_each_step_begins(tiny_model, tmp_path):
    seen = []

    class Peek(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((control.should_log, control.should_evaluate, control.should_save))

        def on_epoch_begin(self, args, state, control, **kwargs):
            control.should_log = control.should_evaluate = control.should_save = True

    make_trainer(tiny_model, tmp_path, [Peek()], num_train_epochs=1).train()
    assert seen and all(flags == (False, False, False) for flags in seen)


def test_a_returned_control_replaces_it_and_the_last_return_wins(tiny_model, tmp_path):
    class ReturnsNew(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            return TrainerControl(should_training_stop=state.global_step >= 2)

    class ReturnsNone(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.got = control  # sees the replacement made by the callback before it

    none = ReturnsNone()
    trainer = make_trainer(tiny_model, tmp_path, [ReturnsNew(), none])
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.control is none.got


def test_control_set_in_on_log_stops_training(tiny_model, tmp_path):
    class StopOnLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs and state.global_step >= 3:
                control.should_training_stop = True

    trainer = make_trainer(tiny_model, tmp_path, [StopOnLoss()], logging_strategy="steps", logging_steps=1,
                           num_train_epochs=5)
    trainer.train()
    assert trainer.state.global_step == 3


def test_best_metric_is_updated_after_on_evaluate(tiny_model, tmp_path):
    seen = []

    class Watch(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append((state.best_metric, metrics["eval_loss"]))

    trainer = make_trainer(tiny_model, tmp_path, [Watch()], eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, metric_for_best_model="eval_loss",
                           learning_rate=0.05, num_train_epochs=1)
    trainer.train()
    assert seen[0][0] is None  # on_evaluate runs before the first best is recorded
    losses = [loss for _, loss in seen]
    assert trainer.state.best_metric == min(losses)
    best_step = 2 * (losses.index(min(losses)) + 1)
    assert trainer.state.best_global_step == best_step
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")


def test_eval_strategy_without_eval_dataset_is_refused(tiny_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=1)
    try:
        Trainer(tiny_model, args, train_dataset=RegressionDataset(4))
    except ValueError as e:
        assert "eval_strategy" in str(e) and "eval_dataset" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_missing_default_flow_callback_warns(caplog):
    from trainer import CallbackHandler

    with caplog.at_level(logging.WARNING, logger="trainer.callbacks"):
        CallbackHandler([EventRecorder()], None, None, None, None)
    assert "DefaultFlowCallback" in caplog.text
