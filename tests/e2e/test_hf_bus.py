"""Following a `transformers.Trainer` run with fg-bus: `attach_bus(trainer)`, then `fg-sink json` and
`fg-sink tb` started as a user starts them. The stream stays open for `evaluate()` / `predict()` after
`train()` and ends at the script's exit; `on_step_end` carries the step's loss and grad norm; the textgen
sink samples with a tokenizer made in memory. Plus, in-process: the bus's place among the callbacks, the
taps under gradient accumulation, the exit status of a failed run, and a textgen sink that cannot build
its model or tokenizer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch

from fg_bus import Publisher, read_journal, registry

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

BIN = Path(sys.executable).parent
SENTENCES = ["hello world", "hello there my friend", "the world is big and round",
             "a small model says hello to the world", "my friend says the model is small"]

# A user's script: a tiny GPT-2 from a config, a word-level tokenizer trained in memory (it has no name or
# path to load it from), TextgenCallback given before the bus is attached, evaluate() and predict() after
# train(), and no close(): the stream ends at exit.
SCRIPT = '''
import sys
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from trainer import TextgenCallback, attach_bus

SENTENCES = %r
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]",
                                                 unk_token="[UNK]")
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer), n_positions=32,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
ids = torch.tensor(tokenizer.encode(" ".join(SENTENCES * 4)))
blocks = [{"input_ids": ids[i:i + 8], "labels": ids[i:i + 8]} for i in range(0, len(ids) - 8, 4)]
args = transformers.TrainingArguments(output_dir=sys.argv[1], max_steps=4, logging_steps=1, save_strategy="no",
                                      per_device_train_batch_size=2, max_grad_norm=0.5, use_cpu=True,
                                      report_to="none", disable_tqdm=True)
trainer = transformers.Trainer(
    model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=blocks, eval_dataset=blocks[:4],
    processing_class=tokenizer,
    callbacks=[TextgenCallback(prompts=["hello"], generation_steps=2, generation_config={"max_new_tokens": 3})])
bus = attach_bus(trainer, run_name="hf-bus")
trainer.train()
print("EVAL", trainer.evaluate()["eval_loss"], flush=True)
trainer.predict(blocks[:2])
''' % (SENTENCES,)


def fg_sink(fg_home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FG_HOME": str(fg_home)})


def tb_reader(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_a_transformers_run_is_followed_by_json_and_tb_through_evaluate_and_predict(fg_home, tmp_path):
    json_sink = fg_sink(fg_home, "json", "--out", str(tmp_path / "log.jsonl"), "--wait", "240")
    tb_sink = fg_sink(fg_home, "tb", "--logdir", str(tmp_path / "tb"), "--wait", "240")
    try:
        (tmp_path / "run.py").write_text(SCRIPT, encoding="utf-8")
        run = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "out")], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "FG_HOME": str(fg_home)})
        assert run.returncode == 0, run.stderr[-4000:]
        for sink in (json_sink, tb_sink):
            assert sink.wait(120) == 0, sink.stderr.read().decode()
    finally:
        for sink in (json_sink, tb_sink):
            if sink.poll() is None:
                sink.kill()
                sink.wait(10)
    log = [orjson.loads(line) for line in (tmp_path / "log.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in log] == list(range(len(log)))
    events = [r["event"] for r in log]
    # Ended by the script's exit (no close() in it), after everything that followed train().
    assert log[-1]["event"] == "end" and log[-1]["status"] == "completed"
    after = events[events.index("on_train_end"):]
    assert "on_evaluate" in after and "on_predict" in after, after
    evaluated = next(r for r in log if r["event"] == "on_evaluate")
    assert f"EVAL {evaluated['metrics']['eval_loss']}" in run.stdout
    assert "test_loss" in next(r for r in log if r["event"] == "on_predict")["metrics"]

    # Each on_step_end carries the step's loss and (pre-clip) grad norm: with logging_steps=1 they are
    # what transformers logs for that step.
    logged = {r["global_step"]: r["metrics"] for r in log if r["event"] == "on_log" and "loss" in r["metrics"]}
    steps = {r["global_step"]: r["metrics"] for r in log if r["event"] == "on_step_end"}
    assert sorted(steps) == sorted(logged) == [1, 2, 3, 4]
    for step, metrics in steps.items():
        assert metrics["loss"] == pytest.approx(logged[step]["loss"], rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(logged[step]["grad_norm"], rel=1e-6)
    assert any(m["grad_norm"] > 0.5 for m in steps.values())  # the norm before clipping, not after

    # Samples from the textgen sink, with the in-memory tokenizer saved beside the snapshots.
    begin = next(r for r in log if r["event"] == "on_train_begin")
    assert not begin["meta"]["tokenizer"].get("name_or_path")  # nothing the sink could load it from
    snapshots = [r for r in log if r["event"] == "snapshot"]
    assert [r["global_step"] for r in snapshots] == [2, 4]
    assert (Path(snapshots[0]["tokenizer"]["path"]) / "tokenizer.json").is_file()
    samples = [r for r in log if r["event"] == "textgen"]
    assert [(r["global_step"], r["prompt"], r["origin"]) for r in samples] == [(2, "hello", "sink"),
                                                                             (4, "hello", "sink")]
    vocabulary = {"[UNK]", "[PAD]", "[EOS]", *" ".join(SENTENCES).split()}
    assert all(r["text"] and set(r["text"].split()) <= vocabulary for r in samples), samples

    ea = tb_reader(tmp_path / "tb" / log[0]["run"])
    assert [(e.step, e.value) for e in ea.Scalars("eval/loss")] == [
        (4, pytest.approx(evaluated["metrics"]["eval_loss"], rel=1e-6))]
    assert [e.step for e in ea.Scalars("train/step_loss")] == [1, 2, 3, 4]
    assert [e.step for e in ea.Scalars("train/step_grad_norm")] == [1, 2, 3, 4]
    texts = [e.tensor_proto.string_val[0].decode() for e in ea.Tensors("textgen/sample_0")]
    assert texts == [f"```\nhello{r['text']}\n```" for r in samples]  # prompt and sample, verbatim


# -- in-process --------------------------------------------------------------------------------------------

def hf_trainer(tmp_path: Path, callbacks=(), **args):
    from conftest import RegressionDataset, TinyRegression

    torch.manual_seed(0)
    options = dict(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none", disable_tqdm=True,
                   save_strategy="no", per_device_train_batch_size=2, logging_steps=1, max_steps=3)
    return transformers.Trainer(model=TinyRegression(), args=transformers.TrainingArguments(**{**options, **args}),
                                train_dataset=RegressionDataset(8), callbacks=list(callbacks))


def journal_of(bus) -> list[dict]:
    return list(read_journal(registry.resolve(bus.run_id).journal_path()))


def test_attach_bus_puts_the_bus_first_once_and_taps_loss_and_grad_norm_under_accumulation(fg_home, tmp_path):
    from conftest import EventRecorder
    from trainer import BusCallback, attach_bus

    bus, recorder = BusCallback(), EventRecorder()
    trainer = hf_trainer(tmp_path, [recorder, bus], gradient_accumulation_steps=2, max_grad_norm=0)
    assert attach_bus(trainer, bus) is bus
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is bus and sum(cb is bus for cb in callbacks) == 1 and recorder in callbacks
    trainer.train()
    bus.close()
    journal = journal_of(bus)
    # Two micro-batches per step, no clipping (transformers then takes the norm with max_norm=inf): the taps
    # sum the micro-batches' losses, and the norm is the one transformers logs.
    logged = {r["global_step"]: r["metrics"] for r in journal if r["event"] == "on_log" and "loss" in r["metrics"]}
    steps = {r["global_step"]: r["metrics"] for r in journal if r["event"] == "on_step_end"}
    assert sorted(steps) == sorted(logged) == [1, 2, 3]
    for step, metrics in steps.items():
        assert metrics["loss"] == pytest.approx(logged[step]["loss"], rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(logged[step]["grad_norm"], rel=1e-6)
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "completed"


def test_a_sink_handle_placed_before_a_bus_added_later_still_starts_its_sink(fg_home, tmp_path):
    """`add_callback(BusCallback())` after __init__ appends the bus after the JsonLogger: the bus has not
    started at the logger's on_train_begin, so the logger starts its sink at the first step instead."""
    from trainer import BusCallback, JsonLogger

    out = tmp_path / "log.jsonl"
    trainer = hf_trainer(tmp_path, [JsonLogger(out=str(out))], max_steps=2)
    bus = BusCallback()
    trainer.add_callback(bus)
    trainer.train()
    bus.close()  # waits (bounded) for the json sink to finish the run
    log = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert log == [orjson.loads(orjson.dumps(r)) for r in journal_of(bus)]
    assert log[-1]["event"] == "end" and log[-1]["status"] == "completed"


def test_the_exit_of_a_process_whose_train_raised_ends_the_stream_as_failed(fg_home, tmp_path):
    from trainer import TrainerCallback, attach_bus

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("boom")

    trainer = hf_trainer(tmp_path, [Boom()])
    bus = attach_bus(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not bus.publisher.closed  # nothing closed it: the process's exit will
    bus._close_at_exit()  # what atexit calls
    journal = journal_of(bus)
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "failed"
    assert registry.resolve(bus.run_id).status == "failed"


def char_meta(tokenizer_description: dict | None) -> dict:
    from trainer.bus_callback import _config_of, _factory_of
    from trainer.chargpt import CharGPT, CharGPTConfig

    model = CharGPT(CharGPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    return {"model": {"factory": _factory_of(model), "config": _config_of(model)}, "tokenizer": tokenizer_description}


@pytest.mark.parametrize("meta, reason", [
    ({"model": {"factory": "__main__:DefinedInTheTrainingScript", "config": {}}, "tokenizer": None},
     "cannot build the model '__main__:DefinedInTheTrainingScript' from the run's meta: AttributeError"),
    (char_meta({"factory": "trainer.data:CharTokenizer"}),
     "cannot build the tokenizer described in the run's meta: ValueError"),
], ids=["model", "tokenizer"])
def test_a_textgen_sink_that_cannot_build_says_so_once_and_publishes_the_reason(fg_home, tmp_path, caplog, meta,
                                                                              reason):
    from sinks.textgen_sink import TextgenSink

    publisher = Publisher(tmp_path / "bus", "textgen-broken").start()
    try:
        sink = TextgenSink(prompts=["a", "b"])
        sink.open_run(registry.load_run(tmp_path / "bus"))
        sink.handle({"event": "on_train_begin", "global_step": 0, "epoch": 0.0, "meta": meta})
        with caplog.at_level(logging.ERROR, logger="sinks.textgen_sink"):
            for step in (1, 2):
                sink.handle({"event": "snapshot", "global_step": step, "epoch": 0.1, "path": str(tmp_path / "w.pt")})
        deadline = time.monotonic() + 30
        while publisher.received["textgen"] < 4:
            assert time.monotonic() < deadline, f"{publisher.received['textgen']} of 4 records arrived"
            time.sleep(0.02)
        sink.close()
    finally:
        publisher.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and reason in errors[0], errors
    journal = read_journal(registry.load_run(tmp_path / "bus").journal_path())
    answered = [r for r in journal if r["event"] == "textgen"]
    assert [(r["global_step"], r["prompt"], r["text"], r["origin"]) for r in answered] == [
        (1, "a", None, "sink"), (1, "b", None, "sink"), (2, "a", None, "sink"), (2, "b", None, "sink")]
    assert all(reason in r["skipped"] for r in answered)


def test_a_char_tokenizer_travels_with_the_snapshots(tmp_path):
    from sinks.textgen_sink import build_tokenizer
    from trainer import TextgenCallback
    from trainer.data import CharTokenizer

    tokenizer = CharTokenizer.from_text("made in memory")
    description = TextgenCallback()._save_tokenizer(tokenizer, tmp_path)
    assert description == {"factory": "trainer.data:CharTokenizer", "path": str(tmp_path / "tokenizer")}
    rebuilt = build_tokenizer(description)
    assert rebuilt.itos == tokenizer.itos and rebuilt.encode("memory?") == tokenizer.encode("memory?")


FAILING_SCRIPT = '''
import sys
import transformers
from trainer import TrainerCallback, attach_bus  # imported before tests/ is on the path (tests/trainer shadows it)
sys.path.append(sys.argv[2])  # tests/, for conftest's tiny model
from conftest import RegressionDataset, TinyRegression

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom at step 2")

args = transformers.TrainingArguments(output_dir=sys.argv[1], max_steps=5, use_cpu=True, report_to="none",
                                      disable_tqdm=True, save_strategy="no", per_device_train_batch_size=2)
trainer = transformers.Trainer(model=TinyRegression(), args=args, train_dataset=RegressionDataset(8),
                               callbacks=[Boom()])
attach_bus(trainer)
trainer.train()  # raises: nothing closes the bus but the process's exit
'''


def test_a_transformers_process_that_dies_of_an_exception_ends_the_run_failed_with_it(fg_home, tmp_path):
    (tmp_path / "run.py").write_text(FAILING_SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "out"),
                           str(Path(__file__).parents[1])], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "RuntimeError: boom at step 2" in proc.stderr, proc.stderr
    [run_file] = (tmp_path / "out" / "fg-bus").glob("*/run.json")
    info = registry.load_run(run_file.parent)
    end = list(read_journal(info.journal_path()))[-1]
    assert end["event"] == "end" and end["status"] == info.status == "failed"
    assert end["reason"] == info.end_reason and end["reason"]["text"] == "RuntimeError: boom at step 2"
    frames = end["reason"]["exception"]["traceback"]
    assert frames[-1]["function"] == "on_step_end" and frames[-1]["file"].endswith("run.py")
