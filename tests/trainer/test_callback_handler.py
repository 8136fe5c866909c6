"""Adding, popping and removing callbacks; order; dispatch robust to changes mid-event; typo warnings."""

from __future__ import annotations

import logging

import pytest

from conftest import EventRecorder, RegressionDataset
from trainer import (CallbackHandler, DefaultFlowCallback, InfoCallback, PrinterCallback, ProgressCallback,
                     Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments)


class A(TrainerCallback):
    pass


class B(TrainerCallback):
    pass


@pytest.fixture
def trainer(tiny_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    return Trainer(tiny_model, args, train_dataset=RegressionDataset(4), callbacks=[A()])


def classes(trainer):
    return [type(cb) for cb in trainer.callback_handler.callbacks]


def test_default_list_order(trainer):
    assert classes(trainer) == [DefaultFlowCallback, A, ProgressCallback, InfoCallback]


def test_disable_tqdm_uses_the_printer(tiny_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True)
    t = Trainer(tiny_model, args, train_dataset=RegressionDataset(4))
    assert classes(t) == [DefaultFlowCallback, PrinterCallback, InfoCallback]


def test_add_class_or_instance_and_duplicate_warns(trainer, caplog):
    trainer.add_callback(B)
    instance = B()
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks"):
        trainer.add_callback(instance)
    assert "second B" in caplog.text
    assert classes(trainer)[-2:] == [B, B]
    assert trainer.callback_handler.callbacks[-1] is instance


def test_pop_by_class_and_by_instance(trainer):
    b1, b2 = B(), B()
    trainer.add_callback(b1)
    trainer.add_callback(b2)
    assert trainer.pop_callback(B) is b1  # the first one of that class
    assert trainer.pop_callback(b2) is b2
    assert trainer.pop_callback(B) is None
    assert trainer.pop_callback(B()) is None  # an equal-looking but different instance is not removed
    assert B not in classes(trainer)


def test_remove_callback_returns_nothing_and_tolerates_absence(trainer):
    assert trainer.remove_callback(A) is None
    assert A not in classes(trainer)
    trainer.remove_callback(A)  # absent: no error
    trainer.remove_callback(ProgressCallback)
    assert classes(trainer) == [DefaultFlowCallback, InfoCallback]


def test_callbacks_run_in_the_order_added():
    order = []

    def make(name):
        class Named(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                order.append(name)
        return Named()

    handler = CallbackHandler([DefaultFlowCallback(), make("first"), make("second")], None, None, None, None)
    handler.add_callback(make("third"))
    args = TrainingArguments(output_dir="unused")
    handler.on_step_end(args, TrainerState(max_steps=10, global_step=1), TrainerControl())
    assert order == ["first", "second", "third"]


def test_adding_and_removing_during_an_event_does_not_corrupt_dispatch():
    calls = []

    class Late(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            calls.append("late")

    class Mutator(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            calls.append("mutator")
            handler.remove_callback(self)  # removes itself mid-dispatch
            handler.add_callback(Late())  # added now: runs from the next event on

    class After(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            calls.append("after")

    handler = CallbackHandler([DefaultFlowCallback(), Mutator(), After()], None, None, None, None)
    args = TrainingArguments(output_dir="unused")
    handler.on_log(args, TrainerState(), TrainerControl(), logs={})
    assert calls == ["mutator", "after"]
    handler.on_log(args, TrainerState(), TrainerControl(), logs={})
    assert calls == ["mutator", "after", "after", "late"]


def test_a_method_that_looks_like_an_event_but_is_not_warns(caplog):
    class Typo(TrainerCallback):
        def on_step_ends(self, args, state, control, **kwargs):
            pass

        def on_push_begin(self, args, state, control, **kwargs):  # a real transformers event: no warning
            pass

    with caplog.at_level(logging.WARNING, logger="trainer.callbacks"):
        CallbackHandler([DefaultFlowCallback(), Typo()], None, None, None, None)
    assert "Typo.on_step_ends" in caplog.text
    assert "on_push_begin" not in caplog.text.split("the events are")[0]


def test_recorder_in_a_real_run_sees_callbacks_added_by_a_callback(tiny_model, tmp_path):
    recorder = EventRecorder()

    class AddsRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer.add_callback(recorder)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, max_steps=2,
                             save_strategy="no")
    trainer = Trainer(tiny_model, args, train_dataset=RegressionDataset(4), callbacks=[AddsRecorder()])
    trainer.train()
    assert recorder.names()[0] == "on_epoch_begin"  # not on_train_begin: added during it
    assert recorder.names()[-1] == "on_train_end"
