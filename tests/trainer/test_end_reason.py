"""How a run ended, and why: the end record, run.json, `RunInfo` and `Subscriber` say completed (max_steps),
stopped (by `fg-bus ctl` over the real inbox socket, naming the command and who sent it; by a callback,
naming it), interrupted (a signal), or failed (the exception's type, message and innermost frames)."""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time

import pytest

from conftest import RegressionDataset, TinyRegression
from fg_bus import Subscriber, read_journal, registry
from fg_bus.control import send_control
from trainer import (BusCallback, DivergenceDetector, EarlyStoppingCallback, Trainer, TrainerCallback,
                     TrainingArguments)
from test_divergence import NaNAt


def train(tmp_path, callbacks=(), model=None, **kwargs):
    """Train in-process with a bus; returns (trainer, bus, raised exception or None)."""
    args = dict(output_dir=str(tmp_path / "run"), use_cpu=True, disable_tqdm=True, max_steps=12,
                per_device_train_batch_size=4, save_strategy="no", logging_steps=1, report_to="none")
    args.update(kwargs)
    bus = BusCallback()
    trainer = Trainer(model or TinyRegression(), TrainingArguments(**args), train_dataset=RegressionDataset(16),
                      eval_dataset=RegressionDataset(8), callbacks=list(callbacks), event_bus=bus)
    for cb in callbacks:
        cb.bus = bus
    error = None
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - the failing run's exception is what the test looks at
        error = e
    bus.close()  # after a failure train() closed it already: idempotent
    return trainer, bus, error


def ending(bus) -> tuple[dict, registry.RunInfo, Subscriber]:
    """The run's end record, its registry entry, and a Subscriber that read the stream to its end."""
    info = registry.resolve(bus.run_id)
    journal = list(read_journal(info.journal_path()))
    end = journal[-1]
    assert end["event"] == "end", journal[-3:]
    sub = Subscriber(bus.run_id)
    deadline = time.monotonic() + 60
    while not sub.finished and time.monotonic() < deadline:
        sub.poll(timeout=1.0)
    sub.close()
    assert sub.finished
    assert info.status == end["status"] == sub.status
    assert info.end_reason == end["reason"] == sub.end_reason
    return end, info, sub


def test_a_run_that_reaches_max_steps_is_completed(tmp_path):
    _, bus, error = train(tmp_path)
    assert error is None
    end, info, _ = ending(bus)
    assert end["status"] == "completed" and end["reason"]["text"] == "reached max_steps (12)"
    assert info.data["reason"]["step"] == 12


def test_a_callback_that_stops_training_is_named(tmp_path):
    early = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    _, bus, _ = train(tmp_path, [early], max_steps=40, eval_strategy="steps", eval_steps=2,
                      metric_for_best_model="eval_loss", load_best_model_at_end=True, save_strategy="steps",
                      save_steps=2)
    end, _, _ = ending(bus)
    assert end["status"] == "stopped", end
    reason = end["reason"]
    assert reason["by"] == "callback" and reason["callback"] == "EarlyStoppingCallback"
    assert reason["step"] == end["global_step"] < 40
    assert "EarlyStoppingCallback stopped training at step" in reason["text"]
    assert "eval_loss did not improve for 1 evaluations" in reason["text"]


def test_the_divergence_detector_names_what_it_saw(tmp_path):
    _, bus, _ = train(tmp_path, [DivergenceDetector(action="stop")], model=NaNAt(5), max_steps=40)
    end, _, _ = ending(bus)
    assert end["status"] == "stopped" and end["reason"]["callback"] == "DivergenceDetector"
    assert "non-finite" in end["reason"]["text"] and end["global_step"] == 5, end


class FailAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.explode(state.global_step)

    def explode(self, step):
        raise RuntimeError(f"the data went bad at step {step}")


def test_a_failed_run_carries_its_exception_and_innermost_frames(tmp_path):
    _, bus, error = train(tmp_path, [FailAt(3)])
    assert isinstance(error, RuntimeError)
    end, _, _ = ending(bus)
    assert end["status"] == "failed" and end["global_step"] == 3
    exc = end["reason"]["exception"]
    assert exc["type"] == "RuntimeError" and exc["message"] == "the data went bad at step 3"
    assert end["reason"]["text"] == "RuntimeError: the data went bad at step 3"
    frames = exc["traceback"]
    assert 2 <= len(frames) <= 8
    assert frames[-1]["function"] == "explode" and frames[-1]["file"] == __file__
    assert "raise RuntimeError" in frames[-1]["code"] and frames[-2]["function"] == "on_step_end"


class Slow(TrainerCallback):
    """Steps of ~10 ms, so a control request from another thread lands mid-run; `act` runs at step 3 in a
    thread (it may block on sockets) and training goes on until it has returned and the run stopped."""

    def __init__(self, act):
        self.act, self.thread, self.result = act, None, None

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.01)
        if state.global_step == 3:
            self.thread = threading.Thread(target=lambda: setattr(self, "result", self.act(self.bus)))
            self.thread.start()
        if self.thread is not None and not self.thread.is_alive() and state.global_step > 3 + 200:
            control.should_training_stop = True  # the request never applied: end the run (the test fails)


@pytest.mark.parametrize("cmd", ["stop", "abort"])
def test_fg_bus_ctl_stop_names_the_command_and_who_sent_it(tmp_path, cmd):
    slow = Slow(lambda bus: send_control(registry.resolve(bus.run_id), cmd, timeout=60, source="fg-bus ctl"))
    trainer, bus, error = train(tmp_path, [slow], max_steps=100_000)
    slow.thread.join(60)
    assert error is None and slow.result is not None and slow.result.ok, slow.result
    end, _, _ = ending(bus)
    reason = end["reason"]
    assert end["status"] == "stopped" and reason["by"] == "ctl" and reason["cmd"] == cmd, end
    assert reason["source"] == "fg-bus ctl" and reason["step"] == end["global_step"] < 100_000
    assert reason["origin"] == {"user": getpass.getuser(), "host": socket.gethostname(),
                                "pid": os.getpid()}
    assert reason["text"].startswith(f"`fg-bus ctl {cmd}` from {getpass.getuser()}@")


def test_a_signal_makes_it_interrupted_naming_the_signal(tmp_path):
    # fg-train's handler for SIGINT / SIGTERM queues exactly this request (trainer/_command.py _stop_on_signals)
    slow = Slow(lambda bus: bus.publisher.request_control("stop", source="signal SIGTERM"))
    _, bus, _ = train(tmp_path, [slow], max_steps=100_000)
    end, _, _ = ending(bus)
    assert end["status"] == "interrupted" and end["reason"]["signal"] == "SIGTERM", end
    assert end["reason"]["text"] == f"SIGTERM at step {end['global_step']}"


def test_a_second_ctrl_c_is_interrupted_mid_step(tmp_path):
    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    bus = BusCallback()
    trainer = Trainer(TinyRegression(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=9,
                                                          disable_tqdm=True, report_to="none"),
                      train_dataset=RegressionDataset(16), callbacks=[CtrlC()], event_bus=bus)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    end, _, _ = ending(bus)
    assert end["status"] == "interrupted" and end["reason"]["signal"] == "SIGINT"
    assert "second Ctrl-C" in end["reason"]["text"]
