"""Checkpoints and the best model, side by side with transformers' Trainer (issue 12).

Which checkpoint is the best (NaN metrics, a metric named without `eval_`), which checkpoint directories
rotation keeps at each save and at the end, the files of a checkpoint, and resuming each trainer from the
other's checkpoint with the same losses afterwards.
"""

from __future__ import annotations

import math
import os
import pickle
import time

import pytest
import torch

import trainer as fg
from conftest import RegressionDataset, TinyRegression
from side_by_side import assert_logs_equal, make_pair, run_both
from trainer import _checkpoint as ckpt

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


def _callback(base, **methods):
    """The same callback for both trainers: a subclass of `base` (ours or transformers' TrainerCallback)."""
    return type("Scripted", (base,), methods)()


def scripted_metric(key: str, values: dict):
    """on_evaluate sets metrics[key] = values[global_step]: both trainers hand this dict to
    `_determine_best_metric` after on_evaluate."""
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics[key] = values[state.global_step]
    return {"on_evaluate": on_evaluate}


def kept_at_each_save():
    """on_save records the checkpoint directories left after that save's rotation."""
    def on_save(self, args, state, control, **kwargs):
        self.seen.append(sorted(p.name for p in ckpt.sorted_checkpoints(args.output_dir)))
    return {"on_save": on_save, "seen": None}


def pair_with_callbacks(tmp_path, methods: dict, args: dict, train_n: int = 8, eval_n: int = 4, **kwargs):
    ours_cb, hf_cb = _callback(fg.TrainerCallback, **methods), _callback(transformers.TrainerCallback, **methods)
    for cb in (ours_cb, hf_cb):
        if "seen" in methods:
            cb.seen = []
    args = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "logging_steps": 1, **args}
    ours, hf = make_pair(tmp_path, TinyRegression, RegressionDataset(train_n), RegressionDataset(eval_n, seed=1), args,
                         ours_kwargs={"callbacks": [ours_cb]}, hf_kwargs={"callbacks": [hf_cb]}, **kwargs)
    return ours, hf, ours_cb, hf_cb


def best_of(trainer) -> tuple:
    best = trainer.state.best_model_checkpoint
    return trainer.state.best_metric, trainer.state.best_global_step, best and os.path.basename(best)


def checkpoint_names(trainer) -> list[str]:
    return sorted(p.name for p in ckpt.sorted_checkpoints(trainer.args.output_dir))


# -- the best model --------------------------------------------------------------------------------------

EVERY_STEP = dict(max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=1)


@pytest.mark.parametrize("name, greater, values, expected", [
    # NaN first: transformers' -inf/+inf starting point is kept as best_metric, and NaN never wins.
    ("eval_loss", False, {1: math.nan, 2: 3.0, 3: math.nan, 4: 5.0}, (3.0, 2, "checkpoint-2")),
    ("eval_loss", False, {1: math.nan, 2: math.nan, 3: math.nan, 4: math.nan}, (math.inf, None, None)),
    ("score", True, {1: math.nan, 2: math.nan, 3: 0.5, 4: 0.25}, (0.5, 3, "checkpoint-3")),
    ("score", True, {1: math.nan, 2: math.nan, 3: math.nan, 4: math.nan}, (-math.inf, None, None)),
])
def test_best_model_with_nan_metrics_as_transformers(tmp_path, name, greater, values, expected):
    key = name if name.startswith("eval_") else f"eval_{name}"
    ours, hf, *_ = pair_with_callbacks(tmp_path, scripted_metric(key, values),
                                       dict(EVERY_STEP, metric_for_best_model=name, load_best_model_at_end=True))
    assert ours.args.greater_is_better is hf.args.greater_is_better is greater
    ours.train()
    hf.train()
    assert best_of(ours) == best_of(hf) == expected
    assert checkpoint_names(ours) == checkpoint_names(hf)


@pytest.mark.parametrize("name", ["score", "eval_score"])
def test_a_metric_named_with_or_without_eval_prefix_picks_the_same_best(tmp_path, name):
    values = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.9}  # greater is better for "score": the first 0.9 stays the best
    ours, hf, *_ = pair_with_callbacks(tmp_path, scripted_metric("eval_score", values),
                                       dict(EVERY_STEP, metric_for_best_model=name))
    ours.train()
    hf.train()
    assert best_of(ours) == best_of(hf) == (0.9, 2, "checkpoint-2")
    assert ours.state.best_model_checkpoint == os.path.join(ours.args.output_dir, "checkpoint-2")


def _mae(prediction) -> dict:
    import numpy as np

    return {"mae": float(np.abs(prediction.predictions - prediction.label_ids).mean())}


def test_best_model_on_a_compute_metrics_metric_as_transformers(tmp_path):
    """metric_for_best_model names a compute_metrics key without its eval_ prefix. "mae" does not end in
    "loss", so greater is better by transformers' default: the worst (first) evaluation is the best, and
    save_total_limit=1 leaves only its checkpoint at the end."""
    args = dict(EVERY_STEP, max_steps=6, save_steps=2, eval_steps=2, learning_rate=0.3, metric_for_best_model="mae",
                load_best_model_at_end=True, save_total_limit=1)
    ours, hf = run_both(tmp_path, TinyRegression, RegressionDataset(8), RegressionDataset(4, seed=1),
                        dict(args, per_device_train_batch_size=2, per_device_eval_batch_size=4, logging_steps=1),
                        compute_metrics=_mae)
    assert hf.args.greater_is_better is ours.args.greater_is_better is True
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert best_of(ours)[1:] == best_of(hf)[1:] == (2, "checkpoint-2")
    assert best_of(ours)[0] == pytest.approx(best_of(hf)[0], rel=1e-5)
    assert checkpoint_names(ours) == checkpoint_names(hf) == ["checkpoint-2"]


def test_an_unknown_metric_for_best_model_fails_in_both(tmp_path):
    ours, hf, *_ = pair_with_callbacks(tmp_path, {}, dict(EVERY_STEP, metric_for_best_model="accuracy"))
    for trainer in (ours, hf):
        with pytest.raises(KeyError, match="eval_accuracy"):
            trainer.train()


def test_load_best_model_at_end_loads_the_same_weights(tmp_path):
    values = {1: 4.0, 2: 1.0, 3: 2.0, 4: 3.0}
    ours, hf, *_ = pair_with_callbacks(tmp_path, scripted_metric("eval_loss", values),
                                       dict(EVERY_STEP, metric_for_best_model="loss", load_best_model_at_end=True))
    ours.train()
    hf.train()
    assert best_of(ours) == best_of(hf) == (1.0, 2, "checkpoint-2")
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), hf.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# -- rotation --------------------------------------------------------------------------------------------

# Eval losses that rise after step 2, so the best checkpoint is an old one that rotation must keep.
RISING = {step: float(step != 2) * step for step in range(1, 9)}


@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize("best", ["none", "load_best", "metric_only"])
def test_checkpoints_kept_at_each_save_and_at_the_end_as_transformers(tmp_path, limit, best):
    args = dict(max_steps=8, save_steps=2, save_total_limit=limit, eval_strategy="steps", eval_steps=2)
    if best != "none":
        args.update(metric_for_best_model="loss", load_best_model_at_end=best == "load_best")
    methods = {**scripted_metric("eval_loss", RISING), **kept_at_each_save()}
    ours, hf, ours_cb, hf_cb = pair_with_callbacks(tmp_path, methods, args)
    ours.train()
    hf.train()
    assert ours_cb.seen == hf_cb.seen and len(hf_cb.seen) == 4
    assert checkpoint_names(ours) == checkpoint_names(hf)
    expected_end = {("none", 1): ["checkpoint-8"], ("none", 2): ["checkpoint-6", "checkpoint-8"]}.get(
        (best, limit), ["checkpoint-2"] if limit == 1 else ["checkpoint-2", "checkpoint-8"])
    assert checkpoint_names(hf) == expected_end
    if best != "none":
        assert hf_cb.seen[-1] == ["checkpoint-2", "checkpoint-8"]  # a limit of 1 keeps two during training
        assert best_of(ours) == best_of(hf)


def test_rotation_orders_by_modification_time_as_transformers(tmp_path):
    """A stale checkpoint-100 (an hour old) is the newest by step but the oldest by mtime: transformers
    rotates by mtime, so it is the first to go. Ours as well, the stale one being of the run's own lineage
    (its run marker); one without a marker is another run's and is kept (tests/trainer/test_output_dir.py)."""
    ours, hf, *_ = pair_with_callbacks(tmp_path, {}, dict(max_steps=6, save_steps=2, save_total_limit=2))
    an_hour_ago = time.time() - 3600
    for trainer in (ours, hf):
        stale = os.path.join(trainer.args.output_dir, "checkpoint-100")
        os.makedirs(stale)
        if trainer is ours:
            ckpt.write_run_marker(stale, ours.checkpoint_lineage, None, 100, 100)
        os.utime(stale, (an_hour_ago, an_hour_ago))
    ours.train()
    hf.train()
    assert checkpoint_names(ours) == checkpoint_names(hf) == ["checkpoint-4", "checkpoint-6"]


# -- the files of a checkpoint ---------------------------------------------------------------------------

def _tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 8):
        self.ids = torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def files_in(trainer, step: int) -> set[str]:
    return set(os.listdir(os.path.join(trainer.args.output_dir, f"checkpoint-{step}")))


@pytest.mark.parametrize("model", ["plain", "gpt2"])
def test_checkpoint_files_are_transformers_files_plus_our_extras(tmp_path, model):
    factory, data = (TinyRegression, RegressionDataset(8)) if model == "plain" else (_tiny_gpt2, TokenDataset())
    ours, hf = run_both(tmp_path, factory, data, args=dict(max_steps=2, save_steps=2, per_device_train_batch_size=4))
    ours_files, hf_files = files_in(ours, 2), files_in(hf, 2)
    assert ours_files - ckpt.OUR_EXTRA_FILES == hf_files
    assert ckpt.OUR_EXTRA_FILES <= ours_files
    assert {"model.safetensors", "training_args.bin", "rng_state.pth", "optimizer.pt", "scheduler.pt"} <= hf_files
    # Our loader takes transformers' files (for gpt2, save_pretrained stored the tied lm_head once).
    torch.manual_seed(5)
    fresh = factory()
    ckpt.load_model_weights(fresh, os.path.join(hf.args.output_dir, "checkpoint-2"))
    for (name, a), b in zip(fresh.state_dict().items(), hf.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # training_args.bin: the args object itself, as transformers writes it (a pickle: not weights_only).
    saved = torch.load(os.path.join(ours.args.output_dir, "checkpoint-2", "training_args.bin"), weights_only=False)
    assert isinstance(saved, fg.TrainingArguments) and saved == ours.args


def test_rng_state_file_has_transformers_keys_and_types(tmp_path):
    ours, hf = run_both(tmp_path, TinyRegression, RegressionDataset(8),
                        args=dict(max_steps=2, save_steps=2, per_device_train_batch_size=4))
    from transformers.trainer_pt_utils import safe_globals

    def load(trainer):
        with safe_globals():  # how transformers reads it: weights_only with its numpy allowlist
            return torch.load(os.path.join(trainer.args.output_dir, "checkpoint-2", "rng_state.pth"), weights_only=True)

    ours_state, hf_state = load(ours), load(hf)
    assert ours_state.keys() == hf_state.keys()
    for key in hf_state:
        assert type(ours_state[key]) is type(hf_state[key]), key
    assert type(ours_state["numpy"][1]) is type(hf_state["numpy"][1])  # the key array: an ndarray


def test_an_rng_file_holding_anything_but_rng_states_is_refused(tmp_path):
    """The RNG file is read with weights_only=True and only numpy's array classes allowed."""
    torch.save({"python": pickle.loads, "numpy": None, "cpu": None}, tmp_path / "rng_state.pth")
    with pytest.raises(ckpt.CheckpointError, match="rng_state.pth"):
        ckpt.load_rng_state(tmp_path)


def test_an_rng_file_in_our_earlier_format_still_loads(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, np_gauss = np.random.get_state()
    torch.save({"python": [version, list(state), gauss],
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, np_gauss],
                "cpu": torch.get_rng_state()}, tmp_path / "rng_state.pth")
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.load_rng_state(tmp_path)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_tied_weights_of_a_plain_module_are_saved_and_restored_by_both_trainers(tmp_path):
    """transformers' own save refuses shared tensors of a module that is not a PreTrainedModel, and its
    loader fails on a file missing one of its keys: we store each name (a copy for the second), and both
    trainers' loaders keep the tie."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4)
            self.head = torch.nn.Linear(4, 8, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    ckpt.save_model_weights(model, tmp_path)
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == ["emb.weight", "head.weight"]
    torch.manual_seed(1)
    fresh = Tied()
    ckpt.load_model_weights(fresh, tmp_path)
    assert fresh.head.weight is fresh.emb.weight
    torch.testing.assert_close(fresh.emb.weight, model.emb.weight)
    torch.manual_seed(2)
    theirs = Tied()
    hf = transformers.Trainer(model=theirs, args=transformers.TrainingArguments(output_dir=str(tmp_path / "hf"),
                                                                                use_cpu=True, report_to="none"))
    hf._load_from_checkpoint(str(tmp_path))  # what transformers runs on resume_from_checkpoint
    assert theirs.head.weight is theirs.emb.weight
    torch.testing.assert_close(theirs.emb.weight, model.emb.weight)


# -- each trainer resumes from the other's checkpoint ----------------------------------------------------

def losses(trainer) -> list[tuple]:
    return [(h["step"], h["loss"], h["learning_rate"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def resume_pair(tmp_path, factory, train_n: int, args: dict, step: int):
    """Both trainers train without interruption; then each resumes from the other's checkpoint-`step` in a
    fresh output_dir. Returns {"ours", "hf", "ours<-hf", "hf<-ours"} trainers."""
    args = dict(logging_steps=1, **args)
    data = RegressionDataset(train_n)
    ours, hf = run_both(tmp_path / "full", factory, data, args=args)
    ours_resumed, hf_resumed = make_pair(tmp_path / "resumed", factory, data, args=args)
    ours_resumed.train(resume_from_checkpoint=os.path.join(hf.args.output_dir, f"checkpoint-{step}"))
    hf_resumed.train(resume_from_checkpoint=os.path.join(ours.args.output_dir, f"checkpoint-{step}"))
    return {"ours": ours, "hf": hf, "ours<-hf": ours_resumed, "hf<-ours": hf_resumed}


def test_each_trainer_resumes_the_others_checkpoint_across_epochs(tmp_path):
    """6 batches an epoch, 3 updates (accumulation 2); checkpoint-4 is one update into the second epoch.
    Our side finds no data_position.json in transformers' checkpoint and works the position out from the
    step, as transformers does."""
    runs = resume_pair(tmp_path, TinyRegression, 12, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                          max_steps=8, save_steps=4, learning_rate=0.05), step=4)
    assert not os.path.exists(os.path.join(runs["hf"].args.output_dir, "checkpoint-4", ckpt.DATA_POSITION_NAME))
    assert_logs_equal(runs["ours"].state.log_history, runs["hf"].state.log_history)
    expected = losses(runs["hf"])
    assert [s for s, *_ in losses(runs["ours<-hf"])] == [s for s, *_ in expected] == list(range(1, 9))
    for side in ("ours<-hf", "hf<-ours"):
        for got, want in zip(losses(runs[side]), expected):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), side
        for p, q in zip(runs[side].model.parameters(), runs["hf"].model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_each_trainer_restores_the_others_rng_state(tmp_path):
    """Dropout draws from the global RNG: after a resume mid-epoch, the steps left in that epoch see the
    dropout masks of the trainer that wrote the checkpoint only if its RNG file was read right. (The two
    trainers draw differently at an epoch start, so this stays within one epoch: see the README.)"""
    runs = resume_pair(tmp_path, lambda: TinyRegression(dropout=0.5), 16,
                       dict(per_device_train_batch_size=2, max_steps=8, save_steps=3, learning_rate=0.05), step=3)
    for resumed, source in (("ours<-hf", "hf"), ("hf<-ours", "ours")):
        got, want = losses(runs[resumed]), losses(runs[source])
        assert [s for s, *_ in got] == list(range(1, 9))
        for a, b in zip(got[3:], want[3:]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), resumed
