"""The throughput keys of training logs (trainer/_throughput.py), in real in-process runs on tiny models:
present with sane values at every training log and only there, each switch turns its keys off, the token
count is exact (and transformers' own when include_num_input_tokens_seen is set), MFU follows its formula,
evaluation time is left out of the rates, and nothing is read from a device between logging steps.
"""

from __future__ import annotations

import traceback
import types

import pytest
import torch

import trainer as fg
import trainer._throughput as throughput
from trainer._throughput import FG_ONLY_LOG_KEYS, ThroughputMeter, matmul_parameters, peak_tflops_of
from trainer.chargpt import CharGPT, CharGPTConfig

VOCAB, SEQ, BATCH = 32, 8, 4
RATE_KEYS = {"samples_per_second", "steps_per_second", "step_time", "data_time"}
TOKEN_KEYS = {"tokens_per_second", "num_input_tokens_seen"}


class Padded(torch.utils.data.Dataset):
    """input_ids of SEQ tokens, the last (i % SEQ) of them padding (id 0, attention_mask 0)."""

    def __init__(self, n: int = 32, mask: bool = True):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.mask = mask
        for i in range(n):
            if i % SEQ:
                self.ids[i, -(i % SEQ):] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "labels": self.ids[i]}
        if self.mask:
            item["attention_mask"] = (self.ids[i] != 0).long()
        return item


def char_gpt():
    torch.manual_seed(0)
    return CharGPT(CharGPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=1, n_head=2, n_embd=16))


def train(tmp_path, model=None, dataset=None, callbacks=(), processing_class=None, **kwargs):
    args = dict(output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, max_steps=6, logging_steps=2,
                per_device_train_batch_size=BATCH, save_strategy="no", report_to="none")
    args.update(kwargs)
    trainer = fg.Trainer(model if model is not None else char_gpt(), fg.TrainingArguments(**args),
                         train_dataset=dataset if dataset is not None else Padded(),
                         eval_dataset=Padded(8), processing_class=processing_class, callbacks=list(callbacks))
    trainer.train()
    return trainer


def training_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_every_training_log_carries_rates_and_tokens_with_sane_values(tmp_path):
    trainer = train(tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3)
    logs = training_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4, 6]
    for h in logs:
        assert RATE_KEYS | TOKEN_KEYS <= h.keys()
        assert h["steps_per_second"] > 0 and h["step_time"] > 0
        assert h["steps_per_second"] * h["step_time"] == pytest.approx(1, rel=1e-2)
        assert 0 <= h["data_time"] <= h["step_time"] + 1e-6  # the wait for batches is part of the step
        # Two steps of 2 micro-batches of BATCH examples in every interval, SEQ tokens each.
        assert h["samples_per_second"] == pytest.approx(h["steps_per_second"] * 2 * BATCH, rel=1e-2)
        assert h["tokens_per_second"] == pytest.approx(h["samples_per_second"] * SEQ, rel=1e-3)
        assert h["num_input_tokens_seen"] == h["step"] * 2 * BATCH * SEQ  # padding included ("all")
    assert trainer.state.num_input_tokens_seen == 6 * 2 * BATCH * SEQ
    # CPU: no peak memory; no device peak FLOPs known and none given: no mfu.
    assert not any({"peak_memory_mb", "mfu"} & h.keys() for h in logs)
    # Evaluation logs and the final train summary carry none of them.
    others = [h for h in trainer.state.log_history if "loss" not in h]
    assert len(others) == 3 and not any(FG_ONLY_LOG_KEYS & h.keys() for h in others)


@pytest.mark.parametrize("switch, gone", [
    ("log_throughput", RATE_KEYS), ("log_tokens", TOKEN_KEYS), ("log_mfu", {"mfu"}),
])
def test_each_switch_turns_its_keys_off(tmp_path, switch, gone):
    logs = training_logs(train(tmp_path, mfu_peak_tflops=1.0, **{switch: False}))
    present = RATE_KEYS | TOKEN_KEYS | {"mfu"}
    for h in logs:
        assert not gone & h.keys()
        assert present - gone <= h.keys()


def test_all_switches_off_counts_nothing(tmp_path, monkeypatch):
    trainer = train(tmp_path, log_throughput=False, log_tokens=False, log_peak_memory=False, log_mfu=False)
    assert not trainer._throughput.counting
    assert not any(FG_ONLY_LOG_KEYS & h.keys() for h in trainer.state.log_history)
    assert trainer.state.num_input_tokens_seen == 0  # as transformers' state with its count off


def test_a_batch_without_input_ids_has_rates_but_no_tokens(tmp_path):
    from conftest import RegressionDataset, TinyRegression

    logs = training_logs(train(tmp_path, model=TinyRegression(), dataset=RegressionDataset(16)))
    for h in logs:
        assert RATE_KEYS <= h.keys() and not TOKEN_KEYS & h.keys()
        assert h["samples_per_second"] == pytest.approx(h["steps_per_second"] * BATCH, rel=1e-2)


# -- MFU --------------------------------------------------------------------------------------------------

def test_mfu_of_char_gpt_follows_the_formula(tmp_path):
    model = char_gpt()
    cfg = model.config
    # N: every parameter but the position embedding (the token embedding is also the tied output head).
    n = sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.n_embd
    assert matmul_parameters(model) == n
    flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_embd * SEQ
    peak = 0.001  # TFLOP/s
    for h in training_logs(train(tmp_path, model=model, mfu_peak_tflops=peak)):
        assert 0 < h["mfu"]
        assert h["mfu"] == pytest.approx(h["tokens_per_second"] * flops_per_token / (peak * 1e12), rel=1e-3)


def test_matmul_parameters_of_transformers_models():
    """A tied output head counts (its matmul is real work); an untied one is in num_parameters already."""
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                                n_positions=32))
    assert matmul_parameters(gpt2) == gpt2.num_parameters(exclude_embeddings=True) + VOCAB * 16
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    assert matmul_parameters(llama) == llama.num_parameters(exclude_embeddings=True)


def test_mfu_of_a_transformers_model_uses_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=32))
    flops_per_token = 6 * matmul_parameters(model) + 12 * 2 * 16 * SEQ
    for h in training_logs(train(tmp_path, model=model, mfu_peak_tflops=0.001)):
        assert h["mfu"] == pytest.approx(h["tokens_per_second"] * flops_per_token / 1e9, rel=1e-3)


def test_a_model_may_give_its_own_flops_per_token(tmp_path):
    model = char_gpt()
    model.flops_per_token = lambda seq_len: 1e6 * seq_len
    for h in training_logs(train(tmp_path, model=model, mfu_peak_tflops=0.001)):
        assert h["mfu"] == pytest.approx(h["tokens_per_second"] * 1e6 * SEQ / 1e9, rel=1e-3)


def test_peak_table():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756
    assert peak_tflops_of("NVIDIA H200") == 989
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_of("NVIDIA A10") == 125
    assert peak_tflops_of("NVIDIA L40S") == 362 and peak_tflops_of("NVIDIA L4") == 121
    assert peak_tflops_of("Tesla T4") == 65
    assert peak_tflops_of("NVIDIA GeForce GTX 1080") is None


# -- the token count, as transformers counts it -----------------------------------------------------------

@pytest.mark.parametrize("mode", [True, "all", "non_padding"])
def test_include_num_input_tokens_seen_logs_as_transformers_does(tmp_path, mode):
    """With transformers' own switch, every log (training, evaluation, the final one) carries its
    num_input_tokens_seen, and the training logs train_tokens_per_second, as in transformers' Trainer: the
    histories are equal, that key included, and so is the count in the checkpoint's trainer_state.json."""
    transformers = pytest.importorskip("transformers")
    import json

    from side_by_side import assert_logs_equal, make_pair
    from test_parity_loss import in_order

    def gpt2():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))

    args = dict(max_steps=4, logging_steps=2, per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
                include_num_input_tokens_seen=mode, eval_strategy="steps", eval_steps=3, save_strategy="steps",
                save_steps=3)
    # Both read the examples in order, so each log's count is of the same examples (the shuffles differ).
    ours, hf = in_order(*make_pair(tmp_path, gpt2, Padded(32), Padded(8), args))
    ours.train()
    hf.train()
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert all("num_input_tokens_seen" in h for h in ours.state.log_history)
    assert all("train_tokens_per_second" in h for h in training_logs(ours))
    # The true count: 4 steps x 2 micro-batches x 4 examples are the 32 examples, each once.
    dataset = Padded(32)
    expected = 32 * SEQ if mode != "non_padding" else int(sum((dataset.ids != 0).sum(1)))
    assert ours.state.num_input_tokens_seen == hf.state.num_input_tokens_seen == expected
    for side in ("ours", "hf"):
        saved = json.loads((tmp_path / side / "checkpoint-3" / "trainer_state.json").read_text())
        assert saved["num_input_tokens_seen"] == (ours if side == "ours" else hf).state.log_history[1][
            "num_input_tokens_seen"]


def test_non_padding_without_a_mask_counts_ids_that_are_not_the_pad_token(tmp_path):
    trainer = train(tmp_path, dataset=Padded(24, mask=False), processing_class=types.SimpleNamespace(pad_token_id=0),
                    include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    assert trainer.state.num_input_tokens_seen == int((Padded(24).ids != 0).sum())


def test_the_count_goes_on_from_a_checkpoint(tmp_path):
    train(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    resumed = fg.Trainer(char_gpt(), fg.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, max_steps=4, logging_steps=2,
        per_device_train_batch_size=BATCH, save_strategy="no"), train_dataset=Padded())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    # The checkpoint's history (step 2), then the resumed run's log at step 4, which counts all 4 steps.
    assert [(h["step"], h["num_input_tokens_seen"]) for h in training_logs(resumed)] == \
        [(2, 2 * BATCH * SEQ), (4, 4 * BATCH * SEQ)]


def test_include_num_input_tokens_seen_is_checked():
    assert fg.TrainingArguments(include_num_input_tokens_seen=False).include_num_input_tokens_seen == "no"
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        fg.TrainingArguments(include_num_input_tokens_seen="some")
    with pytest.raises(ValueError, match="mfu_peak_tflops"):
        fg.TrainingArguments(mfu_peak_tflops=0)
    with pytest.raises(ValueError, match="log_tokens"):
        fg.TrainingArguments(log_tokens="yes")


# -- time: evaluation is left out; no device read between logging steps ----------------------------------

class Clock:
    """A fake perf_counter: one second per optimizer step, 100 s per evaluation."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class Tick(fg.TrainerCallback):
    def __init__(self, clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.now += 1.0

    def on_evaluate(self, args, state, control, **kwargs):
        self.clock.now += 100.0


def test_rates_are_over_the_interval_and_leave_evaluation_and_saves_out(tmp_path, monkeypatch):
    import trainer.trainer as loop

    clock = Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter, time=__import__("time").time)
    monkeypatch.setattr(throughput, "time", fake_time)
    monkeypatch.setattr(loop, "time", fake_time)
    logs = training_logs(train(tmp_path, callbacks=[Tick(clock)], max_steps=9, logging_steps=3,
                               eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=4))
    assert [h["step"] for h in logs] == [3, 6, 9]
    for h in logs:
        assert (h["step_time"], h["steps_per_second"], h["samples_per_second"]) == (1.0, 1.0, BATCH)
        assert h["tokens_per_second"] == BATCH * SEQ


class SlowCollator:
    """The default collator, `seconds` slower per batch: as a slow data loader (or, with a clock, `advance`
    moves a fake clock instead of sleeping)."""

    def __init__(self, seconds: float = 0.0, clock: Clock | None = None, advance: float = 0.0):
        self.seconds, self.clock, self.advance = seconds, clock, advance

    def __call__(self, features):
        from trainer.data import default_data_collator

        if self.seconds:
            __import__("time").sleep(self.seconds)
        if self.clock is not None:
            self.clock.now += self.advance
        return default_data_collator(features)


def test_data_time_is_the_wait_for_the_steps_batches_summed_over_its_micro_batches(tmp_path, monkeypatch):
    """A fake clock: the collator takes 0.25 s per micro-batch, 2 micro-batches per step, and the rest of
    the step 1 s: data_time 0.5 exactly, and step_time 1.5 (the wait is part of the step)."""
    import trainer.trainer as loop

    clock = Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter, time=__import__("time").time)
    monkeypatch.setattr(throughput, "time", fake_time)
    monkeypatch.setattr(loop, "time", fake_time)
    args = fg.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, max_steps=6,
                                logging_steps=3, per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
                                save_strategy="no", report_to="none")
    trainer = fg.Trainer(char_gpt(), args, train_dataset=Padded(),
                         data_collator=SlowCollator(clock=clock, advance=0.25), callbacks=[Tick(clock)])
    trainer.train()
    logs = training_logs(trainer)
    assert [(h["step"], h["data_time"], h["step_time"]) for h in logs] == [(3, 0.5, 1.5), (6, 0.5, 1.5)]
    assert trainer.step_data_time == 0.5


def test_a_slow_collator_shows_in_data_time_of_each_step_end_record_and_log(tmp_path):
    """Real runs with a bus: every on_step_end record carries this rank's data_time, and a collator that
    sleeps 30 ms per batch makes it (and the logged mean) at least that."""
    from fg_bus import read_journal, registry

    def journal_of(collator):
        bus = fg.BusCallback(system_interval=0)
        args = fg.TrainingArguments(output_dir=str(tmp_path / str(id(collator))), use_cpu=True, disable_tqdm=True,
                                    max_steps=6, logging_steps=3, per_device_train_batch_size=BATCH,
                                    save_strategy="no", report_to="none")
        fg.Trainer(char_gpt(), args, train_dataset=Padded(), data_collator=collator, event_bus=bus).train()
        bus.close()
        return list(read_journal(registry.resolve(bus.run_id).journal_path()))

    for sleep, journal in ((0.0, journal_of(SlowCollator())), (0.03, journal_of(SlowCollator(0.03)))):
        ends = [r["metrics"] for r in journal if r["event"] == "on_step_end"]
        assert len(ends) == 6 and all({"loss", "grad_norm", "data_time"} <= m.keys() for m in ends)
        assert all(m["data_time"] >= sleep for m in ends)
        logged = [r["metrics"] for r in journal if r["event"] == "on_log" and "loss" in r["metrics"]]
        assert len(logged) == 2 and all(sleep <= m["data_time"] <= m["step_time"] + 1e-6 for m in logged)


class CountReads(fg.TrainerCallback):
    """Every read of a tensor's value into Python during training, with the step it happened at."""

    READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.state = None
        self.reads: list[tuple[int, str]] = []
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            if self.state is not None:
                stack = traceback.extract_stack()
                if not any("torch/utils/data/" in f.filename for f in stack):
                    self.reads.append((self.state.global_step, f"{stack[-2].filename}:{stack[-2].name}"))
            return original(tensor, *args, **kwargs)
        return read

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def on_train_end(self, args, state, control, **kwargs):
        self.state = None


class TokenTensorProbe(fg.TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.kinds: dict[int, str] = {}

    def on_step_end(self, args, state, control, **kwargs):
        pending = self.trainer._throughput._tokens_tensor
        self.kinds[state.global_step] = type(pending).__name__


def test_the_count_stays_a_tensor_and_is_read_at_logging_steps_only(tmp_path, monkeypatch):
    """include_num_input_tokens_seen='non_padding': a running tensor sum between logs, read by one .item()
    in the meter's _read at each logging step (and at the end); no other read in the meter."""
    counter, probe = CountReads(monkeypatch), TokenTensorProbe()
    meter_reads, counts = [], []
    original_read, original_count = ThroughputMeter._read, ThroughputMeter.count

    def read(self):
        meter_reads.append(probe.trainer.state.global_step)
        return original_read(self)

    def count(self, inputs):
        counts.append(1)
        return original_count(self, inputs)

    monkeypatch.setattr(ThroughputMeter, "_read", read)
    monkeypatch.setattr(ThroughputMeter, "count", count)
    args = fg.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=True, max_steps=10,
                                logging_steps=4, per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
                                save_strategy="no", include_num_input_tokens_seen="non_padding",
                                remove_unused_columns=False,
                                optim="adamw_torch_fused")  # the plain AdamW reads its step count each step
    trainer = fg.Trainer(char_gpt(), args, train_dataset=Padded(), callbacks=[counter, probe])
    probe.trainer = trainer
    trainer.train()
    assert meter_reads == [4, 8, 10]  # two logging steps, and the end of training (steps 9-10)
    assert len(counts) == 10 * 2  # one count per micro-batch
    assert all(probe.kinds[s] == "Tensor" for s in range(1, 11) if s % 4), probe.kinds
    in_meter = [(step, where) for step, where in counter.reads if "_throughput.py" in where]
    assert in_meter == [(4, in_meter[0][1]), (8, in_meter[0][1]), (10, in_meter[0][1])]
    assert in_meter[0][1].endswith(":_read")
    assert {step for step, _ in counter.reads} <= {4, 8, 10}  # the loop itself reads at those steps only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak_memory_mb and the device's peak FLOPs need CUDA")
def test_peak_memory_and_mfu_on_cuda(tmp_path):
    logs = training_logs(train(tmp_path, use_cpu=False))
    name = torch.cuda.get_device_name(0)
    for h in logs:
        assert 0 < h["peak_memory_mb"] <= torch.cuda.get_device_properties(0).total_memory / 2**20
        if peak_tflops_of(name) is not None:
            assert 0 < h["mfu"] < 1
    assert [h["peak_memory_mb"] for h in logs] == sorted(h["peak_memory_mb"] for h in logs)  # a high-water mark
