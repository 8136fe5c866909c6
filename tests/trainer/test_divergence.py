"""`DivergenceDetector`: a run made to diverge (a huge learning rate) and a NaN injected into the loss are
caught, warmup and patience hold, its state survives a resume, `abort` saves nothing and `save-and-stop`
saves, and a YAML config with it stops an `fg-train` run early with an `alert` record in the journal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RegressionDataset, TinyRegression
from fg_bus import read_journal, registry
from trainer import BusCallback, DivergenceDetector, Trainer, TrainerCallback, TrainerControl, TrainingArguments

BIN = Path(sys.executable).parent
DIVERGE_YAML = Path(__file__).with_name("diverge.yaml")


class NaNAt(torch.nn.Module):
    """TinyRegression whose loss is NaN at the `at`-th training forward (the optimizer step `at`, without
    gradient accumulation)."""

    def __init__(self, at: int):
        super().__init__()
        self.inner = TinyRegression()
        self.at = at
        self.calls = 0

    def forward(self, x, labels=None):
        out = self.inner(x, labels)
        if self.training and labels is not None:
            self.calls += 1
            if self.calls == self.at:
                out["loss"] = out["loss"] * float("nan")
        return out


def run(tmp_path, detector, model=None, bus=True, resume=None, callbacks=(), **kwargs):
    """Train in-process (CPU, a bus unless bus=False); returns (trainer, journal records)."""
    args = dict(output_dir=str(tmp_path / "run"), use_cpu=True, disable_tqdm=True, max_steps=40,
                per_device_train_batch_size=4, save_strategy="no", logging_steps=1, report_to="none")
    args.update(kwargs)
    event_bus = BusCallback() if bus else None
    trainer = Trainer(model if model is not None else TinyRegression(), TrainingArguments(**args),
                      train_dataset=RegressionDataset(16), callbacks=[detector, *callbacks], event_bus=event_bus)
    for cb in callbacks:
        cb.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    if event_bus is None:
        return trainer, []
    event_bus.close()
    return trainer, list(read_journal(registry.resolve(event_bus.run_id).journal_path()))


def alerts(journal):
    return [r for r in journal if r["event"] == "alert"]


def detector_of(trainer) -> DivergenceDetector:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DivergenceDetector))


def checkpoints(trainer) -> list[str]:
    return sorted(p.name for p in Path(trainer.args.output_dir).glob("checkpoint-*"))


# -- real runs --------------------------------------------------------------------------------------------

def test_a_huge_learning_rate_is_caught_and_stops_the_run(tmp_path, caplog):
    torch.manual_seed(0)
    detector = DivergenceDetector(action="stop", warmup=2, patience=2, rel_threshold=0.5)
    with caplog.at_level(logging.WARNING, logger="trainer.divergence"):
        trainer, journal = run(tmp_path, detector, learning_rate=50.0, max_grad_norm=0, lr_scheduler_type="constant")
    assert trainer.state.global_step < 40, "the run went to max_steps"
    [alert] = alerts(journal)
    assert alert["kind"] == "divergence" and alert["action"] == "stop" and alert["metric"] == "loss"
    assert alert["global_step"] == trainer.state.global_step
    assert alert["ema"] > 1.5 * alert["best_ema"] and "over its best" in alert["message"]
    assert any("DivergenceDetector: divergence" in r.getMessage() for r in caplog.records)
    assert checkpoints(trainer) == []  # stop: no checkpoint of the diverged weights


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_nan_loss_is_caught_at_once(tmp_path, nan_filter):
    """With transformers' logging_nan_inf_filter the logged loss stays finite; the gradient norm does not."""
    torch.manual_seed(0)
    detector = DivergenceDetector(action="stop", warmup=1000)  # warmup does not delay a non-finite value
    trainer, journal = run(tmp_path, detector, model=NaNAt(5), logging_nan_inf_filter=nan_filter)
    assert trainer.state.global_step == 5
    [alert] = alerts(journal)
    assert alert["kind"] == "non-finite" and alert["global_step"] == 5
    assert alert["metric"] == ("grad_norm" if nan_filter else "loss")
    assert "nan" in alert["message"]


@pytest.mark.parametrize("save_strategy", ["steps", "epoch"])
def test_abort_saves_nothing_more(tmp_path, save_strategy):
    """A checkpoint at every step (or epoch) is due when the NaN comes at step 3: abort writes none."""
    torch.manual_seed(0)
    detector = DivergenceDetector(action="abort")
    trainer, journal = run(tmp_path, detector, model=NaNAt(3), save_strategy=save_strategy, save_steps=1,
                           eval_strategy="no")
    assert trainer.state.global_step == 3 and detector.aborted and trainer.control.should_abort
    assert checkpoints(trainer) == (["checkpoint-1", "checkpoint-2"] if save_strategy == "steps" else [])
    assert alerts(journal)[0]["action"] == "abort"


def test_save_and_stop_saves_the_step(tmp_path):
    torch.manual_seed(0)
    detector = DivergenceDetector(action="save-and-stop")
    trainer, _ = run(tmp_path, detector, model=NaNAt(3), save_strategy="steps", save_steps=100)
    assert trainer.state.global_step == 3 and checkpoints(trainer) == ["checkpoint-3"]
    saved = json.loads((Path(trainer.args.output_dir) / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["DivergenceDetector"]["attributes"]["triggered"] == "non-finite"
    # resumed from it, still NaN (the weights are): stopped again at the first check, with a new alert
    again = DivergenceDetector(action="save-and-stop")
    resumed, journal = run(tmp_path, again, model=NaNAt(3), save_strategy="steps", save_steps=100,
                           resume=str(Path(trainer.args.output_dir) / "checkpoint-3"))
    assert resumed.state.global_step == 4 and again.alerts == 2 and len(alerts(journal)) == 1


class SeeDetectorAtBegin(TrainerCallback):
    """The detector's state as on_train_begin leaves it (placed after it; `trainer` set by run())."""

    trainer = None
    seen = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = detector_of(self.trainer).state()


@pytest.mark.parametrize("restore_flag", [False, True])
def test_state_survives_resume(tmp_path, restore_flag):
    def make():
        return DivergenceDetector(action="warn", warmup=0, patience=2, ema_decay=0.8)

    common = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=0.3, lr_scheduler_type="constant",
                  restore_callback_states_from_checkpoint=restore_flag)
    torch.manual_seed(0)
    whole, _ = run(tmp_path / "a", make(), bus=False, **common)
    at_4 = json.loads((tmp_path / "a" / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    saved = at_4["stateful_callbacks"]["DivergenceDetector"]
    assert saved["attributes"]["last_step"] == 4 and saved["attributes"]["ema"] is not None

    torch.manual_seed(0)
    see = SeeDetectorAtBegin()
    resumed, _ = run(tmp_path / "b", make(), bus=False, callbacks=[see],
                     resume=str(tmp_path / "a" / "run" / "checkpoint-4"), **common)
    assert see.seen == saved  # restored before the first check of the resumed run
    end_whole, end_resumed = detector_of(whole).state(), detector_of(resumed).state()
    assert end_resumed["args"] == end_whole["args"]
    assert end_resumed["attributes"].keys() == end_whole["attributes"].keys()
    for key, value in end_whole["attributes"].items():  # the resumed run ends where the whole one did
        assert end_resumed["attributes"][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                                                  else value), key


# -- the checks, fed logs ------------------------------------------------------------------------------------

def feed(detector, losses, start=1, **extra):
    """Check one training log per loss (steps start, start+1, ...); returns {step: kind} of the alerts."""
    out = {}
    for step, loss in enumerate(losses, start):
        kind = detector.check({"loss": loss, **extra}, step, TrainerControl(), publish=False)
        if kind:
            out[step] = kind
    return out


def test_warmup_ignores_spikes_but_not_nan():
    detector = DivergenceDetector(action="warn", warmup=5, patience=1, rel_threshold=0.5, ema_decay=0.0)
    assert feed(detector, [1.0, 9.0, 9.0, 9.0, 9.0]) == {}  # steps 1-5: within warmup
    assert feed(detector, [9.0], start=6) == {6: "divergence"}
    warm = DivergenceDetector(warmup=100)
    assert feed(warm, [1.0, float("inf")]) == {2: "non-finite"}
    assert feed(DivergenceDetector(warmup=100), [1.0], grad_norm=float("nan")) == {1: "non-finite"}


def test_patience_counts_checks_in_a_row():
    detector = DivergenceDetector(action="warn", warmup=0, patience=3, rel_threshold=None, abs_threshold=1.0,
                                  ema_decay=0.0)
    # over, over, under: the count starts again; then three in a row alert once, however long it stays over
    assert feed(detector, [1.0, 3.0, 3.0, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0]) == {7: "divergence"}
    assert detector.over_count == 5 and detector.alerts == 1
    # back under threshold, then over again for `patience` checks: a second alert
    assert feed(detector, [1.0, 5.0, 5.0, 5.0], start=10) == {13: "divergence"}
    assert detector.best_ema == 1.0


def test_thresholds_absolute_and_relative():
    rel = DivergenceDetector(warmup=0, patience=1, rel_threshold=0.5, ema_decay=0.0)
    assert feed(rel, [2.0, 2.9]) == {} and feed(rel, [3.1], start=3) == {3: "divergence"}
    absolute = DivergenceDetector(warmup=0, patience=1, rel_threshold=None, abs_threshold=0.2, ema_decay=0.0)
    assert feed(absolute, [2.0, 2.15]) == {} and feed(absolute, [2.3], start=3) == {3: "divergence"}
    either = DivergenceDetector(warmup=0, patience=1, rel_threshold=10.0, abs_threshold=0.2, ema_decay=0.0)
    assert feed(either, [2.0, 2.3]) == {2: "divergence"}
    # the EMA smooths a single spike away
    smooth = DivergenceDetector(warmup=0, patience=1, rel_threshold=0.5, ema_decay=0.9)
    assert feed(smooth, [2.0, 2.0, 6.0, 2.0]) == {}


def test_actions_set_the_control():
    for action, stop, save in [("warn", False, False), ("stop", True, False), ("save-and-stop", True, True),
                               ("abort", True, False)]:
        detector = DivergenceDetector(action=action)
        control = TrainerControl()
        detector.check({"loss": float("nan")}, 1, control, publish=False)
        assert (control.should_training_stop, control.should_save) == (stop, save), action
    aborted = DivergenceDetector(action="abort")
    control = TrainerControl(should_save=True, should_evaluate=True)
    aborted.check({"loss": float("nan")}, 1, control, publish=False)
    assert not control.should_save and not control.should_evaluate and aborted.aborted


def test_eval_and_summary_logs_are_not_checked(tmp_path):
    detector = DivergenceDetector(warmup=0)
    control = TrainerControl()

    class S:
        global_step, epoch, is_world_process_zero = 3, 0.5, True

    detector.on_log(None, S, control, logs={"eval_loss": float("nan")})
    detector.on_log(None, S, control, logs={"train_loss": float("nan"), "train_runtime": 1.0})
    assert detector.last_step is None and not control.should_training_stop


def test_without_a_bus_it_logs_a_warning(caplog):
    detector = DivergenceDetector(action="warn")
    with caplog.at_level(logging.WARNING, logger="trainer.divergence"):
        assert detector.check({"loss": float("nan")}, 7, TrainerControl()) == "non-finite"
    [record] = [r for r in caplog.records if r.name == "trainer.divergence"]
    assert "non-finite: loss is nan at step 7; training goes on" in record.getMessage()


@pytest.mark.parametrize("kwargs, field", [
    (dict(action="halt"), "action"), (dict(patience=0), "patience"), (dict(warmup=-1), "warmup"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(rel_threshold=-1), "rel_threshold"),
    (dict(abs_threshold=float("nan")), "abs_threshold"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DivergenceDetector(**kwargs)


# -- YAML, through fg-train -----------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["stop", "abort"])
def test_fg_train_with_the_detector_in_yaml_stops_early_with_an_alert(tmp_path, fg_home, action):
    config = tmp_path / "diverge.yaml"
    config.write_text(DIVERGE_YAML.read_text().replace("action: stop", f"action: {action}"))
    out = tmp_path / "out"
    env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "fg-train"), str(config), "--device", "cpu", "--output-dir", str(out),
                           "--sinks", "alert"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=300)
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, output
    assert "DivergenceDetector: divergence" in output or "DivergenceDetector: non-finite" in output, output
    [run_dir] = [p.parent for p in (out / "fg-bus").glob("*/run.json")]
    journal = list(read_journal(registry.load_run(run_dir).journal_path()))
    [alert] = alerts(journal)
    assert alert["kind"] in ("divergence", "non-finite") and alert["action"] == action
    assert journal[-1]["event"] == "end" and journal[-1]["global_step"] == alert["global_step"] < 400
    # --sinks alert: the alert sink raised it on this terminal, kept it, and the closing lines say where
    assert f"ALERT [trainer-alert] run {journal[0]['run']} step {alert['global_step']}" in output, output
    kept = [json.loads(line) for line in (out / "alerts" / f"{journal[0]['run']}.jsonl").read_text().splitlines()]
    assert "trainer-alert" in [a["rule"] for a in kept]
    assert f"  alerts:      {out / 'alerts' / journal[0]['run']}.jsonl\n" in output, output
    assert "  ended:       stopped: DivergenceDetector stopped training at step" in output, output
    # stop: fg-train saves the final model as after any stop; abort: nothing at all
    assert (out / "model.safetensors").exists() == (action == "stop"), sorted(p.name for p in out.iterdir())
