"""Compatibility with HuggingFace transformers (5.x), proved with real (tiny, CPU) training runs.

* transformers' own callbacks (EarlyStoppingCallback, PrinterCallback, ProgressCallback) and a user's
  subclass of `transformers.TrainerCallback` work unchanged inside our `trainer.Trainer`;
* a subclass of our `trainer.TrainerCallback` works unchanged inside `transformers.Trainer`;
* both trainers fire the same callback events, at the same global steps, with the same logs/metrics keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file

import trainer as fg
from conftest import EventRecorder, RegressionDataset, TinyRegression
from trainer._throughput import FG_ONLY_LOG_KEYS

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

TRAIN_KWARGS = ("model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")


def _model(seed: int = 0) -> TinyRegression:
    torch.manual_seed(seed)
    return TinyRegression()


def _our_trainer(tmp_path, callbacks=(), train_n=16, eval_n=8, processing_class=None, **args) -> fg.Trainer:
    args.setdefault("report_to", "none")
    return fg.Trainer(
        model=_model(),
        args=fg.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **args),
        train_dataset=RegressionDataset(train_n),
        eval_dataset=RegressionDataset(eval_n, seed=1),
        processing_class=processing_class,
        callbacks=list(callbacks),
    )


def _hf_trainer(tmp_path, callbacks=(), train_n=16, eval_n=8, **args):
    return transformers.Trainer(
        model=_model(),
        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args),
        train_dataset=RegressionDataset(train_n),
        eval_dataset=RegressionDataset(eval_n, seed=1),
        callbacks=list(callbacks),
    )


class CorruptWeights(transformers.TrainerCallback):
    """Adds `amount` to every parameter after each optimizer step: the eval loss rises at every evaluation."""

    def __init__(self, amount: float = 10.0):
        self.amount = amount

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(self.amount)


def _eval_losses(state) -> list[tuple[int, float]]:
    return [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]


# -- transformers' EarlyStoppingCallback in our Trainer ---------------------------------------------------

EARLY_STOP_ARGS = dict(
    max_steps=20, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
    metric_for_best_model="eval_loss", load_best_model_at_end=True, disable_tqdm=True,
)


@pytest.fixture
def early_stopped_run(tmp_path):
    """Our Trainer with transformers.EarlyStoppingCallback(patience=2); the eval loss rises at every step."""
    out = tmp_path / "run"
    early = transformers.EarlyStoppingCallback(early_stopping_patience=2)
    trainer = _our_trainer(out, callbacks=[CorruptWeights(), early], **EARLY_STOP_ARGS)
    result = trainer.train()
    return out, trainer, early, result


def test_hf_early_stopping_stops_our_trainer_early(early_stopped_run):
    out, trainer, early, result = early_stopped_run
    assert isinstance(early, transformers.EarlyStoppingCallback)
    losses = _eval_losses(trainer.state)
    assert [step for step, _ in losses] == [1, 2, 3]
    assert losses[0][1] < losses[1][1] < losses[2][1], losses  # the eval loss really went up
    # Best at step 1; steps 2 and 3 did not improve -> patience 2 exhausted -> stop at 3, long before 20.
    assert result.global_step == trainer.state.global_step == 3 < trainer.state.max_steps == 20
    assert early.early_stopping_patience_counter == 2
    assert trainer.state.best_metric == pytest.approx(losses[0][1])
    assert trainer.state.best_global_step == 1
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    # load_best_model_at_end: the weights in memory are checkpoint-1's, not the (corrupted) last ones.
    best = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    last = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[name]), name
        assert not torch.equal(value, last[name]), name


def test_hf_early_stopping_state_is_saved_in_our_checkpoints(early_stopped_run):
    out, trainer, early, _ = early_stopped_run
    for step, counter in ((1, 0), (2, 1), (3, 2)):
        path = out / f"checkpoint-{step}" / "trainer_state.json"
        saved = json.loads(path.read_text())["stateful_callbacks"]
        assert saved["EarlyStoppingCallback"] == {
            "args": {"early_stopping_patience": 2, "early_stopping_threshold": 0.0},
            "attributes": {"early_stopping_patience_counter": counter},
        }
        assert "TrainerControl" in saved
        # transformers reads our trainer_state.json (and the callback state in it) too.
        hf_state = transformers.TrainerState.load_from_json(str(path))
        assert hf_state.global_step == step
        assert hf_state.stateful_callbacks["EarlyStoppingCallback"]["attributes"] == {
            "early_stopping_patience_counter": counter}


def _resume_from_checkpoint_2(tmp_path, src, name, early, restore: bool) -> tuple[fg.Trainer, object]:
    out = tmp_path / name
    shutil.copytree(src, out)
    trainer = _our_trainer(out, callbacks=[CorruptWeights(), early],
                           restore_callback_states_from_checkpoint=restore, **EARLY_STOP_ARGS)
    result = trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    return trainer, result


def test_hf_early_stopping_state_round_trips_on_resume(early_stopped_run, tmp_path):
    src = early_stopped_run[0]
    # Restored: the checkpoint's args (patience 2, not this fresh instance's 5) and its counter (1), so the
    # next evaluation without improvement (step 3) stops training.
    fresh = transformers.EarlyStoppingCallback(early_stopping_patience=5)
    trainer, result = _resume_from_checkpoint_2(tmp_path, src, "restored", fresh, restore=True)
    restored = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, transformers.EarlyStoppingCallback)]
    assert len(restored) == 1
    assert type(restored[0]) is transformers.EarlyStoppingCallback
    assert restored[0] is not fresh
    assert restored[0].early_stopping_patience == 2
    assert restored[0].early_stopping_patience_counter == 2
    assert result.global_step == 3

    # Not restored: a fresh counter needs two more evaluations without improvement (steps 3 and 4).
    trainer, result = _resume_from_checkpoint_2(
        tmp_path, src, "not-restored", transformers.EarlyStoppingCallback(early_stopping_patience=2), restore=False)
    assert result.global_step == 4
    assert [s for s, _ in _eval_losses(trainer.state)] == [1, 2, 3, 4]  # history carried over from the checkpoint


# -- transformers' PrinterCallback and ProgressCallback in our Trainer -------------------------------------

def _expected_printed(log_history) -> list[dict]:
    """What transformers' PrinterCallback / ProgressCallback print for each log: floats as .4g, no total_flos."""
    return [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in entry.items()
             if k not in ("step", "total_flos")} for entry in log_history]


def _printed_dicts(text: str) -> list[dict]:
    return [ast.literal_eval(line) for line in text.splitlines() if line.startswith("{")]


def test_hf_printer_callback_prints_our_logs(tmp_path, capsys):
    trainer = _our_trainer(tmp_path, callbacks=[transformers.PrinterCallback], max_steps=6,
                           per_device_train_batch_size=4, logging_steps=2, eval_strategy="steps", eval_steps=3,
                           save_strategy="no", disable_tqdm=True)
    assert trainer.pop_callback(fg.PrinterCallback) is not None  # only transformers' printer is left
    trainer.pop_callback(fg.InfoCallback)
    capsys.readouterr()
    trainer.train()
    printed = _printed_dicts(capsys.readouterr().out)
    history = trainer.state.log_history
    assert len(history) == 3 + 2 + 1  # logs at 2, 4, 6; evaluations at 3, 6; the final train metrics
    assert printed == _expected_printed(history)
    assert {"loss", "grad_norm", "learning_rate", "epoch"} <= set(printed[0])
    assert "eval_loss" in printed[1] and "train_loss" in printed[-1]


def test_hf_progress_callback_drives_a_bar_in_our_trainer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transformers.utils.logging, "_tqdm_active", True)  # whatever HF_HUB_DISABLE_PROGRESS_BARS says
    progress = transformers.ProgressCallback()
    trainer = _our_trainer(tmp_path, callbacks=[progress], max_steps=7, per_device_train_batch_size=4,
                           logging_steps=3, eval_strategy="steps", eval_steps=4, save_strategy="no",
                           disable_tqdm=False)
    assert trainer.pop_callback(fg.ProgressCallback) is not None  # only transformers' bar is left
    trainer.pop_callback(fg.InfoCallback)
    capsys.readouterr()
    trainer.train()
    captured = capsys.readouterr()
    assert "7/7" in captured.err  # the training bar reached max_steps
    assert progress.current_step == 7
    assert progress.training_bar is None and progress.prediction_bar is None  # both closed
    assert _printed_dicts(captured.out) == _expected_printed(trainer.state.log_history)
    assert any("eval_loss" in d for d in _printed_dicts(captured.out))


# -- a user's transformers.TrainerCallback in our Trainer -------------------------------------------------

class UserHFCallback(transformers.TrainerCallback):
    """Written against transformers' API: records what it receives and steers the loop."""

    def __init__(self):
        self.calls: list[tuple[str, int, dict]] = []
        self.replacement = None

    def on_step_end(self, args, state, control, **kwargs):
        self.calls.append(("on_step_end", state.global_step, kwargs))
        if state.global_step == 2:
            control.should_save = True  # off the save cadence (save_steps=500)
        if state.global_step == 4:
            # A returned control replaces the trainer's (transformers' contract).
            self.replacement = transformers.TrainerControl(**dataclasses.asdict(control))
            self.replacement.should_training_stop = True
            return self.replacement
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append(("on_log", state.global_step, {**kwargs, "logs": dict(logs)}))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.calls.append(("on_evaluate", state.global_step, {**kwargs, "metrics": dict(metrics)}))


def test_user_hf_callback_gets_the_kwargs_and_steers_our_trainer(tmp_path):
    tokenizer = types.SimpleNamespace(name="a processing class")
    user = UserHFCallback()
    trainer = _our_trainer(tmp_path, callbacks=[user], processing_class=tokenizer, max_steps=10,
                           per_device_train_batch_size=4, logging_steps=1, eval_strategy="steps", eval_steps=3,
                           save_strategy="steps", save_steps=500, disable_tqdm=True)
    result = trainer.train()

    # should_training_stop set (through a returned transformers.TrainerControl) at step 4 of 10.
    assert result.global_step == trainer.state.global_step == 4
    assert trainer.control is user.replacement
    # should_save set at step 2 (never on the cadence, and the run stopped before the final save).
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [s for e, s, _ in user.calls if e == "on_step_end"] == [1, 2, 3, 4]
    assert [s for e, s, _ in user.calls if e == "on_evaluate"] == [3]

    evaluated = False
    for event, step, kwargs in user.calls:
        assert set(TRAIN_KWARGS) <= set(kwargs), (event, sorted(kwargs))
        assert kwargs["model"] is trainer.model
        assert kwargs["processing_class"] is tokenizer
        assert isinstance(kwargs["optimizer"], torch.optim.Optimizer) and kwargs["optimizer"] is trainer.optimizer
        assert kwargs["lr_scheduler"] is trainer.lr_scheduler and kwargs["lr_scheduler"] is not None
        assert kwargs["train_dataloader"].dataset is trainer.train_dataset
        evaluated = evaluated or event == "on_evaluate" or "eval_loss" in kwargs.get("logs", {})
        if not evaluated:
            assert kwargs["eval_dataloader"] is None  # no evaluation has run yet
        else:
            assert kwargs["eval_dataloader"].dataset is trainer.eval_dataset
    logs = [kw["logs"] for e, _, kw in user.calls if e == "on_log"]
    assert {"loss", "grad_norm", "learning_rate", "epoch"} <= set(logs[0])
    assert [s for e, s, kw in user.calls if e == "on_log" and "loss" in kw["logs"]] == [1, 2, 3, 4]
    assert "train_loss" in logs[-1]
    metrics = next(kw["metrics"] for e, _, kw in user.calls if e == "on_evaluate")
    assert metrics["eval_loss"] > 0 and "eval_runtime" in metrics


# -- our TrainerCallback subclasses in transformers.Trainer -----------------------------------------------

class StopAtThree(fg.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_training_stop = True


def test_our_callbacks_work_in_hf_trainer(tmp_path):
    recorder, stop = EventRecorder(), StopAtThree()
    hf = _hf_trainer(tmp_path, callbacks=[recorder, stop], max_steps=10, per_device_train_batch_size=4,
                     logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", disable_tqdm=True)
    hf.train()
    assert hf.state.global_step == 3
    assert [s for e, s, *_ in recorder.events if e == "on_step_end"] == [1, 2, 3]
    assert recorder.names()[0] == "on_init_end" and recorder.names()[-1] == "on_train_end"
    assert [s for e, s, *_ in recorder.events if e == "on_evaluate"] == [2]
    for event in ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_train_end"):
        assert set(TRAIN_KWARGS) <= recorder.kwargs_seen[event], event
    assert "logs" in recorder.kwargs_seen["on_log"] and "metrics" in recorder.kwargs_seen["on_evaluate"]


class CorruptWeightsOurs(fg.TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(10.0)


def test_our_early_stopping_callback_stops_hf_trainer(tmp_path):
    early = fg.EarlyStoppingCallback(early_stopping_patience=2)
    hf = _hf_trainer(tmp_path, callbacks=[CorruptWeightsOurs(), early], max_steps=20, per_device_train_batch_size=4,
                     per_device_eval_batch_size=4, logging_steps=1, eval_strategy="steps", eval_steps=1,
                     save_strategy="steps", save_steps=1, metric_for_best_model="eval_loss",
                     load_best_model_at_end=True, disable_tqdm=True)
    hf.train()
    assert hf.state.global_step == 3
    assert early.early_stopping_patience_counter == 2


# -- event-sequence parity with transformers.Trainer -----------------------------------------------------

# (train examples, eval examples, TrainingArguments) -- the same arguments for both trainers.
PARITY_CONFIGS = {
    "gas1-steps-2-epochs": (16, 6, dict(
        per_device_train_batch_size=4, num_train_epochs=2, logging_steps=2,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=5)),
    "gas2-ragged-steps": (10, 6, dict(  # 3 batches an epoch (4, 4, 2): updates of 2 + 1 micro-batches
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=1,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=3)),
    "gas2-ragged-epoch": (13, 5, dict(  # 4 batches an epoch (4, 4, 4, 1)
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
        logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch")),
    "gas3-max-steps-first-step": (7, 4, dict(  # 4 batches an epoch: updates of 3 + 1; 5 steps over 3 epochs
        per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=5, logging_first_step=True,
        logging_steps=2, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=2)),
    "gas1-fractional-epochs-mixed": (9, 5, dict(  # 5 batches (2, 2, 2, 2, 1); 1.5 epochs = 8 steps
        per_device_train_batch_size=2, num_train_epochs=1.5, logging_strategy="steps", logging_steps=3,
        eval_strategy="epoch", save_strategy="no")),
    "gas2-best-model-ratio-steps": (12, 6, dict(  # 3 batches (5, 5, 2); 6 steps; ratios: log 2, eval/save 3
        per_device_train_batch_size=5, gradient_accumulation_steps=2, num_train_epochs=3, logging_steps=0.25,
        eval_strategy="steps", eval_steps=0.5, save_strategy="steps", save_steps=0.5,
        metric_for_best_model="eval_loss", load_best_model_at_end=True, save_total_limit=1)),
}


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """Run a config in both trainers once (module-wide cache): {name: (ours, hf)} of (events, log_history)."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            train_n, eval_n, args = PARITY_CONFIGS[name]
            args = dict(per_device_eval_batch_size=4, disable_tqdm=True, **args)
            ours_rec, hf_rec = EventRecorder(), EventRecorder()
            ours = _our_trainer(tmp_path_factory.mktemp(f"ours-{name}"), [ours_rec], train_n, eval_n, **args)
            ours.train()
            hf = _hf_trainer(tmp_path_factory.mktemp(f"hf-{name}"), [hf_rec], train_n, eval_n, **args)
            hf.train()
            # Our throughput keys that transformers never logs are left out; every key it logs is compared.
            drop = FG_ONLY_LOG_KEYS - {k for h in hf.state.log_history for k in h}
            ours_events = [e[:2] + (tuple(k for k in e[2] if k not in drop),) if e[0] == "on_log" else e
                           for e in ours_rec.events]
            ours_history = [{k: v for k, v in h.items() if k not in drop} for h in ours.state.log_history]
            cache[name] = ((ours_events, ours_history), (hf_rec.events, hf.state.log_history))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_event_sequence_matches_transformers(parity_runs, name):
    (ours, _), (hf, _) = parity_runs(name)
    assert len(hf) > 10 and hf[0][0] == "on_init_end" and hf[-1][0] == "on_train_end"
    diff = "\n".join(difflib.unified_diff([repr(e) for e in hf], [repr(e) for e in ours],
                                         "transformers.Trainer", "trainer.Trainer", lineterm=""))
    assert ours == hf, f"event sequences differ:\n{diff}"


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_log_history_matches_transformers(parity_runs, name):
    """Same data order, loss, gradient norm, learning rate and epoch at every log (timings excluded)."""
    (_, ours), (_, hf) = parity_runs(name)
    compared = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "train_loss")

    def values(history):
        return [{k: v for k, v in h.items() if k in compared} for h in history]

    assert [sorted(h) for h in ours] == [sorted(h) for h in hf]
    assert values(ours) == [{k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in h.items()} for h in values(hf)]
