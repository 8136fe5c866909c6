"""Side by side with transformers.Trainer: the loss, its normalisation over accumulated micro-batches
(`num_items_in_batch`), gradient norms, weights, optimizer groups and state, total_flos, and train() called
twice. Tiny Llama / GPT-2 models from configs, a few steps each.

Both trainers read the examples in dataset order (`in_order`), so every step sees the same micro-batches:
their shuffles are different by design (ours can resume mid-epoch at another world size).
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch

import trainer as fg
from trainer.chargpt import CharGPT
from side_by_side import assert_logs_equal, make_pair

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

VOCAB, SEQ = 64, 12


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class PaddedLM(torch.utils.data.Dataset):
    """Token sequences whose labels end in -100 padding of a different length for each example: 1 to 9 real
    labels, so two micro-batches of one optimizer step hold different numbers of labelled tokens."""

    def __init__(self, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.keep = [1 + (7 * i + 3) % 9 for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[self.keep[i]:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def in_order(ours, hf):
    """Both trainers sample the training set sequentially."""
    hf.args.train_sampling_strategy = "sequential"
    make_loader = ours.get_train_dataloader

    def sequential():
        loader = make_loader()
        loader.sampler.shuffle = False
        return loader

    ours.get_train_dataloader = sequential
    return ours, hf


def train_both(ours, hf):
    in_order(ours, hf)
    ours.train()
    hf.train()
    return ours, hf


def assert_weights_equal(ours, hf, rel=1e-5, abs_=1e-6):
    theirs = dict(hf.model.named_parameters())
    for name, p in ours.model.named_parameters():
        torch.testing.assert_close(p.detach(), theirs[name].detach(), rtol=rel, atol=abs_, msg=name)


def assert_optimizer_state_equal(ours, hf):
    a, b = ours.optimizer.state_dict(), hf.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["state"][index][key], rtol=1e-5, atol=1e-7, msg=f"{index}.{key}")


ARGS = dict(max_steps=3, per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-2, weight_decay=0.1,
            save_strategy="no", lr_scheduler_type="linear", warmup_steps=1)


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("factory", [llama, gpt2])
def test_causal_lm_losses_grad_norms_and_weights_equal_transformers(tmp_path, factory, ga):
    """Every log (loss, grad_norm, learning_rate, the final train_loss and total_flos), the final weights
    and the AdamW state equal transformers'. With GA 2 the loss is normalised by the labelled tokens of
    both micro-batches (count over labels[..., 1:]), not averaged per micro-batch."""
    ours, hf = train_both(*make_pair(tmp_path, factory, PaddedLM(), args=dict(ARGS, gradient_accumulation_steps=ga)))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert ours.state.log_history[-1]["total_flos"] > 0
    assert_weights_equal(ours, hf)
    assert_optimizer_state_equal(ours, hf)


def _num_items(trainer) -> list:
    return [None if n is None else float(n) for n in trainer.model.seen]


class NumItemsModel(torch.nn.Module):
    """A regression whose forward names `num_items_in_batch` (no **kwargs): transformers passes it only when
    the model says `accepts_loss_kwargs = True`. Records what it receives."""

    def __init__(self, accepts: bool | None):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.seen = []
        if accepts is not None:
            self.accepts_loss_kwargs = accepts

    def forward(self, x, labels=None, num_items_in_batch=None):
        self.seen.append(num_items_in_batch)
        pred = self.linear(x).squeeze(-1)
        mask = labels != -100
        error = torch.where(mask, pred - labels.float(), torch.zeros_like(pred)) ** 2
        loss = error.sum() / (num_items_in_batch if num_items_in_batch is not None else mask.sum())
        return {"loss": loss, "logits": pred}


class MaskedRegression(torch.utils.data.Dataset):
    """x in R^4, a target, or -100 (ignored) for every third example."""

    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(-1) * 10).round()
        self.y[::3] = -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("accepts", [True, None, False])
def test_num_items_in_batch_reaches_forward_as_in_transformers(tmp_path, accepts):
    """accepts_loss_kwargs=True: forward gets the step's count (same value per micro-batch as transformers,
    and the loss is not divided again by GA). Unset (no **kwargs) or False: forward gets None."""
    args = dict(ARGS, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ours, hf = train_both(*make_pair(tmp_path, lambda: NumItemsModel(accepts), MaskedRegression(), args=args))
    assert _num_items(ours) == _num_items(hf)
    assert (None in _num_items(ours)) == (accepts is not True)
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert_weights_equal(ours, hf)


def test_compute_loss_func_gets_transformers_num_items_in_batch(tmp_path):
    """A compute_loss_func receives the labels and num_items_in_batch of the whole optimizer step, the same
    value and dtype at every call as transformers gives it; its loss is not divided by GA."""
    received = {"ours": [], "hf": []}

    def loss_func(side):
        def compute(outputs, labels, num_items_in_batch=None):
            received[side].append((num_items_in_batch.item(), num_items_in_batch.dtype, labels.shape))
            logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
            return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100,
                                                     reduction="sum") / num_items_in_batch
        return compute

    ours, hf = make_pair(tmp_path, gpt2, PaddedLM(), args=dict(ARGS, gradient_accumulation_steps=2),
                         ours_kwargs={"compute_loss_func": loss_func("ours")},
                         hf_kwargs={"compute_loss_func": loss_func("hf")})
    train_both(ours, hf)
    assert len(received["ours"]) == 6
    assert received["ours"] == received["hf"]
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert_weights_equal(ours, hf)


def test_total_flos_in_state_final_log_and_checkpoint(tmp_path):
    """transformers' 6 x tokens x non-embedding parameters, summed per micro-batch: in state, the final
    log and each checkpoint's trainer_state.json."""
    args = dict(ARGS, max_steps=4, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
    ours, hf = train_both(*make_pair(tmp_path, gpt2, PaddedLM(16), args=args))
    model = ours.model
    expected = 4 * 2 * 6 * (2 * SEQ) * model.num_parameters(exclude_embeddings=True)
    assert ours.state.total_flos == hf.state.total_flos == expected
    assert ours.state.log_history[-1]["total_flos"] == hf.state.log_history[-1]["total_flos"]
    for step in (2, 4):
        mine = json.loads((tmp_path / "ours" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        theirs = json.loads((tmp_path / "hf" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert mine["total_flos"] == theirs["total_flos"] == expected * step / 4


def _second_run(log_history):
    return [{k: v for k, v in h.items() if not k.endswith(("_runtime", "_per_second"))} for h in log_history]


@pytest.mark.parametrize("who_builds", ["trainer", "optimizer_cls_and_kwargs", "user_optimizer",
                                        "user_optimizer_and_schedule"])
def test_train_called_twice_matches_transformers(tmp_path, who_builds):
    """A second train(): the schedule the trainer built is built again (not left at lr 0), the optimizer
    is kept with its moments; a schedule passed by the user is kept as it is, as transformers does.
    optimizer_cls_and_kwargs: that class, over the same two parameter groups."""
    sgd = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})
    ours, hf = make_pair(tmp_path, gpt2, PaddedLM(), args=dict(ARGS, max_steps=2),
                         **({"optimizer_cls_and_kwargs": sgd} if who_builds == "optimizer_cls_and_kwargs" else {}))
    in_order(ours, hf)
    if who_builds.startswith("user"):
        for trainer in (ours, hf):
            trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.05)
            if who_builds == "user_optimizer_and_schedule":
                trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1 / (s + 1))
    runs = []
    for _ in range(2):
        ours.train()
        hf.train()
        assert_logs_equal(ours.state.log_history, hf.state.log_history)  # each train() starts a new state
        runs.append([h["learning_rate"] for h in ours.state.log_history if "learning_rate" in h])
    if who_builds == "user_optimizer_and_schedule":  # the user's schedule goes on where it was
        assert runs == [[0.05, 0.025], [0.05 / 3, 0.05 / 4]]
    else:  # the schedule starts again: warm-up from 0, then the peak
        assert runs[1] == runs[0] and max(runs[1]) > 0
    assert_weights_equal(ours, hf)
    assert_optimizer_state_equal(ours, hf)
    if who_builds == "optimizer_cls_and_kwargs":
        assert type(ours.optimizer) is torch.optim.SGD and len(ours.optimizer.param_groups) == 2
        assert sgd[1] == {"lr": 0.05, "momentum": 0.9}


def test_model_init_gives_each_train_call_a_new_model(tmp_path):
    """With model_init, each train() seeds, builds a new model, optimizer and schedule (as transformers):
    the second run repeats the first."""
    trainers = [module.Trainer(model_init=gpt2, train_dataset=PaddedLM(), args=module.TrainingArguments(
        output_dir=str(tmp_path / name), use_cpu=True, report_to="none", disable_tqdm=True, **dict(ARGS, max_steps=2)))
        for name, module in (("ours", fg), ("hf", transformers))]
    ours, hf = in_order(*trainers)
    runs = []
    for _ in range(2):
        ours.train()
        hf.train()
        assert_logs_equal(ours.state.log_history, hf.state.log_history)
        runs.append([h.get("loss") for h in ours.state.log_history[:-1]])
    assert runs[0] == runs[1]
    assert_weights_equal(ours, hf)


class WithNorms(torch.nn.Module):
    """Names that test each of transformers' no-decay patterns and the LayerNorm type rule."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)            # by type: both parameters
        self.rms = torch.nn.RMSNorm(4)             # not a LayerNorm, no pattern: decayed, as in transformers
        self.q_norm = torch.nn.RMSNorm(4)          # "_norm"
        self.norm = torch.nn.RMSNorm(4)            # "(^|.)norm($|.)"
        self.layernorm_scale = torch.nn.Parameter(torch.ones(4))  # "layernorm"
        self.normalizer = torch.nn.Linear(4, 4, bias=False)      # "norm" inside a word: decayed
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x, labels=None):
        return {"loss": self.proj(self.embed(x)).sum()}


@pytest.mark.parametrize("factory", [llama, gpt2, WithNorms, lambda: CharGPT(vocab_size=16, n_layer=1, n_embd=8,
                                                                                  n_head=2, block_size=8)])
def test_weight_decay_groups_equal_transformers(tmp_path, factory):
    ours, hf = make_pair(tmp_path, factory, args=dict(weight_decay=0.1))
    names = {id(p): n for n, p in ours.model.named_parameters()}
    hf_names = {id(p): n for n, p in hf.model.named_parameters()}
    assert ours.get_decay_parameter_names(ours.model) == hf.get_decay_parameter_names(hf.model)
    mine = [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in ours.create_optimizer().param_groups]
    theirs = [([hf_names[id(p)] for p in g["params"]], g["weight_decay"]) for g in hf.create_optimizer().param_groups]
    assert mine == theirs
    assert ([{k: v for k, v in g.items() if k != "params"} for g in ours.optimizer.param_groups] ==
            [{k: v for k, v in g.items() if k != "params"} for g in hf.optimizer.param_groups])


# -- no device sync in the training step -----------------------------------------------------------------

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class CountReads(fg.TrainerCallback):
    """Counts every read of a tensor's value into Python from on_train_begin to on_train_end, by patching
    the Tensor methods that do one (on a GPU each is a device sync). Reads inside torch.utils.data are left
    out: the sampler and the loader work on host tensors before a batch goes to the device."""

    def __init__(self, monkeypatch):
        self.active = False
        self.reads: list[str] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.active and not any("torch/utils/data/" in f.filename for f in traceback.extract_stack()):
                self.reads.append(f"{name} at {traceback.extract_stack()[-2].filename}:"
                                  f"{traceback.extract_stack()[-2].lineno}")
            return original(tensor, *args, **kwargs)
        return read

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False


@pytest.mark.parametrize("loss", ["model", "compute_loss_func"])
def test_training_steps_read_no_device_value(tmp_path, monkeypatch, loss):
    """GA 2, padded labels, num_items_in_batch counted, gradient clipping, the NaN/inf filter: between
    on_train_begin and on_train_end the only read is the end-of-training sync point (the loss since the
    last log). A .item() on the token count, the loss or the grad norm in a step would add one per step."""
    counter = CountReads(monkeypatch)
    counter.active = True
    torch.ones(()).item()  # the patch does see a read
    assert len(counter.reads) == 1
    counter.reads.clear()
    counter.active = False

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum") / \
            num_items_in_batch

    torch.manual_seed(0)
    trainer = fg.Trainer(model=llama() if loss == "model" else gpt2(), train_dataset=PaddedLM(), callbacks=[counter],
                         compute_loss_func=loss_func if loss == "compute_loss_func" else None,
                         args=fg.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=3,
                                                   per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                   logging_strategy="no", save_strategy="no", disable_tqdm=True,
                                                   # the default on CUDA; the plain AdamW reads its step count,
                                                   # a host tensor on every device, with .item()
                                                   optim="adamw_torch_fused"))
    trainer.train()
    assert len(counter.reads) == 1, counter.reads
    assert "trainer/trainer.py" in counter.reads[0]


# -- average_tokens_across_devices under torchrun --------------------------------------------------------

# A torch-only model and data (the rank processes start faster without transformers): a forward that takes
# **kwargs, so num_items_in_batch reaches it, and labels with a different -100 padding in each example.
TINY_LM = """
import torch

class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 64)

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), reduction="sum")
        return {"loss": loss / num_items_in_batch, "logits": logits}

def examples(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 6), generator=g)
    labels = [torch.where(torch.arange(6) < 1 + (5 * i) % 6, row, -100) for i, row in enumerate(ids)]
    return [{"input_ids": row, "labels": lab} for row, lab in zip(ids, labels)]

def run(trainer_module, out, batch_size):
    torch.manual_seed(0)
    t = trainer_module.Trainer(model=TinyLM(), train_dataset=examples(), args=trainer_module.TrainingArguments(
        output_dir=out, use_cpu=True, max_steps=2, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-1))
    t.train()
    return t
"""

RANK_SCRIPT = TINY_LM + """
import json, os, sys
sys.path.insert(0, REPO)
import trainer
t = run(trainer, OUT, 2)
if t.args.process_index == 0:
    os.makedirs(OUT, exist_ok=True)
    json.dump(t.state.log_history, open(OUT + "/logs.json", "w"))
    torch.save(t.model.state_dict(), OUT + "/weights.pt")
torch.distributed.destroy_process_group()
"""


def test_two_ranks_train_as_one_process_with_their_batches_together(tmp_path):
    """Under torchrun the token count is summed over ranks (an all-reduce on the device) and the loss
    multiplied by the world size, so 2 ranks x 2 examples train exactly as 1 process x 4 examples: same
    logged losses, grad norms and weights. Each rank's micro-batches hold different numbers of labels, so
    a count left per rank, or a missing factor, changes every number."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "rank.py"
    script.write_text(f"REPO, OUT = {repo!r}, {str(tmp_path / 'ddp')!r}\n" + RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    namespace = {}
    exec(TINY_LM, namespace)
    single = namespace["run"](fg, str(tmp_path / "one"), 4)
    ddp_logs = json.loads((tmp_path / "ddp" / "logs.json").read_text())
    assert len(ddp_logs) == 3
    assert_logs_equal(ddp_logs[:-1], single.state.log_history[:-1])  # the final log's samples/s differ
    assert ddp_logs[-1]["train_loss"] == pytest.approx(single.state.log_history[-1]["train_loss"], rel=1e-5)
    weights = torch.load(tmp_path / "ddp" / "weights.pt")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
