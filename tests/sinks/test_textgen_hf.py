"""The textgen sink on a transformers causal LM (a tiny GPT-2 with a tokenizer trained here) and on the
built-in char GPT, driven directly with records: the run's `on_train_begin` meta, built by the same helpers
`BusCallback` uses, and `snapshot` records pointing at saved state dicts. The run is over, so the sink
prints its samples instead of sending them back into the run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from fg_bus import read_journal, records, registry
from fg_bus.registry import RunInfo
from sinks.textgen_sink import TextgenSink, build_model, build_tokenizer
from trainer.bus_callback import _config_of, _describe_tokenizer, _factory_of

SAMPLE = re.compile(r"^\[step (\d+)\] (.+) -> (.+)$")
SENTENCES = ["hello world", "hello there my friend", "the world is big and round",
             "a small model says hello to the world", "my friend says the model is small"]


def ended_run(tmp_path: Path) -> RunInfo:
    return RunInfo(tmp_path, {"run_id": "textgen-test", "status": registry.COMPLETED})


def train_begin(model, tokenizer) -> dict:
    """The on_train_begin record's meta as BusCallback builds it (model and tokenizer parts)."""
    meta = {"name": "t", "model": {"factory": _factory_of(model), "config": _config_of(model)},
            "tokenizer": _describe_tokenizer(tokenizer),
            "num_parameters": sum(p.numel() for p in model.parameters())}
    return {"event": "on_train_begin", "global_step": 0, "epoch": 0.0, "meta": meta}


def snapshot(model, path: Path, step: int) -> dict:
    torch.save(model.state_dict(), path)
    return {"event": "snapshot", "global_step": step, "epoch": 0.5, "path": str(path)}


def samples(text: str) -> list[tuple[int, str, str]]:
    out = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            out.append((int(match[1]), ast.literal_eval(match[2]), ast.literal_eval(match[3])))
    return out


# -- a transformers causal LM ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]",
                                                unk_token="[UNK]")
    directory = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(directory)
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    assert loaded.name_or_path == str(directory)
    return loaded


def tiny_gpt2(tokenizer, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    # No eos: every generation runs the full max_new_tokens.
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer), n_positions=64,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.hf
def test_the_meta_rebuilds_an_equivalent_transformers_model_and_tokenizer(hf_tokenizer):
    model = tiny_gpt2(hf_tokenizer)
    meta = train_begin(model, hf_tokenizer)["meta"]
    assert meta["model"]["factory"] == "transformers.models.gpt2.modeling_gpt2:GPT2LMHeadModel"
    assert meta["tokenizer"]["name_or_path"] == hf_tokenizer.name_or_path
    rebuilt = build_model(meta["model"]["factory"], meta["model"]["config"])
    assert type(rebuilt) is type(model)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert all(rebuilt.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())
    tokenizer = build_tokenizer(meta["tokenizer"])
    for text in ["hello world", "my friend says hello", "unknown words here"]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.decode(hf_tokenizer.encode("hello world")) == "hello world"


@pytest.mark.hf
def test_the_meta_of_a_transformers_model_is_a_valid_record(hf_tokenizer):
    """BusCallback publishes this meta in its on_train_begin record: it must encode (and decode to a config
    the sink can still build the model from)."""
    model = tiny_gpt2(hf_tokenizer)
    record = {"v": 1, "run": "r", "rank": 0, "seq": 0, "timestamp": "2026-01-01T00:00:00+00:00",
              **train_begin(model, hf_tokenizer)}
    decoded = records.decode(records.encode(record))
    rebuilt = build_model(decoded["meta"]["model"]["factory"], decoded["meta"]["model"]["config"])
    assert rebuilt.config.n_embd == 16 and rebuilt.config.vocab_size == len(hf_tokenizer)


@pytest.mark.hf
def test_bus_callback_publishes_a_run_of_a_transformers_model(hf_tokenizer, tmp_path):
    """Our Trainer with a transformers causal LM and the bus: the journal holds the whole run, and its
    on_train_begin meta and a snapshot of the trained weights are enough for the textgen sink."""
    from trainer import BusCallback, Trainer, TrainingArguments

    model = tiny_gpt2(hf_tokenizer)
    ids = torch.tensor(hf_tokenizer.encode(" ".join(SENTENCES)))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids) - 8

        def __getitem__(self, i):
            return {"input_ids": ids[i:i + 8], "labels": ids[i:i + 8]}

    bus = BusCallback()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, disable_tqdm=True, max_steps=3,
                             save_strategy="no", per_device_train_batch_size=2)
    Trainer(model, args, train_dataset=Blocks(), processing_class=hf_tokenizer, event_bus=bus).train()
    bus.close()
    journal = list(read_journal(registry.resolve(bus.run_id).journal_path()))
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "completed"
    begin = next(r for r in journal if r["event"] == "on_train_begin")
    sink = TextgenSink(prompts=["hello"], max_new_tokens=4, do_sample=False)
    sink.open_run(ended_run(tmp_path))
    sink.handle(begin)
    sink.handle(snapshot(model, tmp_path / "step-3.pt", 3))
    assert sink.samples == 1
    assert all(torch.equal(sink.model.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.hf
def test_textgen_samples_from_a_transformers_causal_lm(hf_tokenizer, tmp_path, capsys):
    model = tiny_gpt2(hf_tokenizer, seed=1)
    sink = TextgenSink(prompts=["hello"], max_new_tokens=5)
    assert sink.open_run(ended_run(tmp_path)) is None
    sink.handle(train_begin(model, hf_tokenizer))
    sink.handle(snapshot(model, tmp_path / "step-7.pt", 7))
    sink.close()
    got = samples(capsys.readouterr().out)
    assert len(got) == 1 and sink.samples == 1
    step, prompt, text = got[0]
    assert (step, prompt) == (7, "hello")
    # Five new word-level tokens (each decodes to one word, special tokens included).
    assert len(text.split()) == 5, text
    # The sink's model holds the snapshot's weights, not its own initialisation.
    assert all(torch.equal(sink.model.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.hf
def test_greedy_textgen_matches_the_model_itself(hf_tokenizer, tmp_path, capsys):
    model = tiny_gpt2(hf_tokenizer, seed=2)
    sink = TextgenSink(prompts=["hello world", "my friend"], max_new_tokens=5, do_sample=False)
    sink.open_run(ended_run(tmp_path))
    sink.handle(train_begin(model, hf_tokenizer))
    sink.handle(snapshot(model, tmp_path / "step-3.pt", 3))
    got = samples(capsys.readouterr().out)
    expected = []
    for prompt in ["hello world", "my friend"]:
        ids = torch.tensor([hf_tokenizer.encode(prompt)])
        out = model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=hf_tokenizer.pad_token_id)
        expected.append((3, prompt, hf_tokenizer.decode(out[0, ids.shape[1]:].tolist())))
    assert got == expected


# -- the built-in char GPT -----------------------------------------------------------------------------------

def char_gpt(seed: int = 0):
    from trainer.chargpt import CharGPT, CharGPTConfig
    from trainer.data import CharTokenizer

    tokenizer = CharTokenizer.from_text("the quick brown fox jumps over the lazy dog. HELLO!")
    torch.manual_seed(seed)
    model = CharGPT(CharGPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return model.eval(), tokenizer


def test_the_meta_rebuilds_an_equivalent_char_gpt_and_tokenizer():
    model, tokenizer = char_gpt()
    meta = train_begin(model, tokenizer)["meta"]
    assert meta["model"]["factory"] == "trainer.chargpt:CharGPT"
    assert meta["tokenizer"]["factory"] == "trainer.data:CharTokenizer"
    # The meta is a valid record as it is.
    records.encode({"v": 1, "run": "r", "rank": 0, "seq": 0, "timestamp": "t", "event": "on_train_begin",
                    "meta": meta})
    rebuilt = build_model(meta["model"]["factory"], meta["model"]["config"])
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    rebuilt_tokenizer = build_tokenizer(meta["tokenizer"])
    assert rebuilt_tokenizer.itos == tokenizer.itos
    for text in ["hello the fox", "HELLO!", "unseen: ~~"]:
        assert rebuilt_tokenizer.encode(text) == tokenizer.encode(text)


def test_textgen_samples_from_the_char_gpt(tmp_path, capsys):
    model, tokenizer = char_gpt(seed=3)
    sink = TextgenSink(prompts=["the ", "fox"], max_new_tokens=5)
    sink.open_run(ended_run(tmp_path))
    sink.handle(train_begin(model, tokenizer))
    for step in (10, 20):
        sink.handle(snapshot(model, tmp_path / f"step-{step}.pt", step))
    sink.close()
    got = samples(capsys.readouterr().out)
    assert [(s, p) for s, p, _ in got] == [(10, "the "), (10, "fox"), (20, "the "), (20, "fox")]
    assert all(len(text) == 5 and set(text) <= set(tokenizer.itos) for _, _, text in got)
    assert all(torch.equal(sink.model.state_dict()[k], v) for k, v in model.state_dict().items())

    # The sampling is seeded by the step: a second sink writes the same samples.
    again = TextgenSink(prompts=["the ", "fox"], max_new_tokens=5)
    again.open_run(ended_run(tmp_path))
    again.handle(train_begin(model, tokenizer))
    for step in (10, 20):
        again.handle({"event": "snapshot", "global_step": step, "epoch": 0.5, "path": str(tmp_path / f"step-{step}.pt")})
    assert samples(capsys.readouterr().out) == got


def test_greedy_textgen_matches_the_char_gpt_itself(tmp_path, capsys):
    model, tokenizer = char_gpt(seed=4)
    sink = TextgenSink(prompts=["the quick"], max_new_tokens=6, do_sample=False)
    sink.open_run(ended_run(tmp_path))
    sink.handle(train_begin(model, tokenizer))
    sink.handle(snapshot(model, tmp_path / "step-5.pt", 5))
    ids = torch.tensor([tokenizer.encode("the quick")])
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:])
    assert samples(capsys.readouterr().out) == [(5, "the quick", expected)]


def test_a_rotated_snapshot_is_skipped(tmp_path, capsys):
    model, tokenizer = char_gpt()
    sink = TextgenSink(prompts=["the "], max_new_tokens=3)
    sink.open_run(ended_run(tmp_path))
    sink.handle(train_begin(model, tokenizer))
    sink.handle({"event": "snapshot", "global_step": 1, "epoch": 0.1, "path": str(tmp_path / "gone.pt")})
    out = capsys.readouterr().out
    assert sink.samples == 0
    # One line per prompt says it was skipped (in a live run: a textgen record with text None), so nothing
    # waits for samples that will not come.
    assert out.strip() == "[step 1] 'the ' -> skipped (the snapshot was rotated away before generation)"


def test_a_snapshot_before_train_begin_is_an_error(tmp_path):
    model, _ = char_gpt()
    sink = TextgenSink()
    sink.open_run(ended_run(tmp_path))
    with pytest.raises(ValueError, match="on_train_begin"):
        sink.handle(snapshot(model, tmp_path / "s.pt", 1))
