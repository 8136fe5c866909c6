"""`GradLogger` in real in-process runs: the `grad_stats` records it publishes carry the norms of the
gradients as they are when the optimizer is about to step, and a vanishing or exploding total norm
becomes a `warning` record.

The reference norms are taken by our own callback, placed before GradLogger in the callback list, at the
same event (`on_pre_optimizer_step`), from each parameter's `p.grad.norm()` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import RegressionDataset, TinyRegression
from fg_bus import read_journal, registry
from trainer import BusCallback, GradLogger, Trainer, TrainerCallback, TrainingArguments

REL = 1e-5


class GradCapture(TrainerCallback):
    """Per-parameter gradient norms at every optimizer step, keyed by the step the update completes."""

    def __init__(self):
        self.norms: dict[int, dict[str, float]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms[state.global_step + 1] = {
            name: p.grad.detach().double().norm().item()
            for name, p in model.named_parameters() if p.grad is not None
        }


def expected_stats(norms: dict[str, float]) -> dict[str, float]:
    values = list(norms.values())
    return {
        "grad_norm_total": math.sqrt(sum(v * v for v in values)),
        "grad_norm_max": max(values),
        "grad_norm_min": min(values),
        "grad_norm_mean": sum(values) / len(values),
    }


def train(tmp_path, model=None, dataset=None, grad_logger=None, **kwargs):
    """Train with a BusCallback, a GradCapture and then the GradLogger; return (journal, capture, trainer)."""
    args = dict(output_dir=str(tmp_path / "run"), use_cpu=True, disable_tqdm=True, max_steps=6, max_grad_norm=0,
                per_device_train_batch_size=4, save_strategy="no", logging_steps=2)
    compute_loss_func = kwargs.pop("compute_loss_func", None)
    args.update(kwargs)
    capture = GradCapture()
    bus = BusCallback()
    grad_logger = grad_logger or GradLogger(log_frequency=2, track_layers=["linear.weight"])
    trainer = Trainer(model if model is not None else TinyRegression(), TrainingArguments(**args),
                      train_dataset=dataset if dataset is not None else RegressionDataset(16),
                      compute_loss_func=compute_loss_func, callbacks=[capture, grad_logger], event_bus=bus)
    trainer.train()
    bus.close()
    journal = list(read_journal(registry.resolve(bus.run_id).journal_path()))
    assert journal[-1]["event"] == "end" and journal[-1]["status"] == "completed"
    return journal, capture, trainer


def of(journal, event):
    return [r for r in journal if r["event"] == event]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grad_stats_match_the_gradients_at_the_optimizer_step(tmp_path, accumulation):
    torch.manual_seed(0)
    journal, capture, _ = train(tmp_path, gradient_accumulation_steps=accumulation,
                                per_device_train_batch_size=4 // accumulation)
    stats = of(journal, "grad_stats")
    assert [r["global_step"] for r in stats] == [2, 4, 6]
    assert sorted(capture.norms) == [1, 2, 3, 4, 5, 6]
    for record in stats:
        norms = capture.norms[record["global_step"]]
        assert set(norms) == {"linear.weight", "linear.bias"}
        metrics = record["metrics"]
        for key, value in expected_stats(norms).items():
            assert metrics[key] == pytest.approx(value, rel=REL), (record["global_step"], key)
        assert metrics["layer/linear.weight"] == pytest.approx(norms["linear.weight"], rel=REL)
        # Only the tracked parameter has its own entry.
        assert "layer/linear.bias" not in metrics
        assert set(metrics) == {"grad_norm_total", "grad_norm_max", "grad_norm_min", "grad_norm_mean",
                                "layer/linear.weight"}
        assert record["epoch"] is not None
    # The values are not all the same (each record is its own step's gradients).
    assert len({r["metrics"]["grad_norm_total"] for r in stats}) == 3
    # With unclipped gradients the total is the trainer's own grad norm for the step (on_step_end's).
    step_norms = {r["global_step"]: r["metrics"]["grad_norm"] for r in of(journal, "on_step_end")}
    for record in stats:
        assert record["metrics"]["grad_norm_total"] == pytest.approx(step_norms[record["global_step"]], rel=REL)
    # Normal gradients: nothing to warn about.
    assert of(journal, "warning") == []


def test_grad_stats_are_published_while_the_gradients_exist(tmp_path):
    """Right after the bus's on_pre_optimizer_step record of the same step (before the update and zero_grad)."""
    torch.manual_seed(0)
    journal, _, _ = train(tmp_path)
    for record in of(journal, "grad_stats"):
        before, after = journal[record["seq"] - 1], journal[record["seq"] + 1]
        assert before["event"] == "on_pre_optimizer_step" and before["global_step"] == record["global_step"] - 1
        assert after["event"] == "on_optimizer_step"


def test_the_stats_are_the_norms_before_clipping(tmp_path):
    """With max_grad_norm far below the gradients' norm, the stats are still the pre-clip ones: at step 1
    (same weights, same batch) they equal an unclipped run's, and at every step the total equals the
    trainer's own pre-clip grad_norm; an `exploding` threshold between the clip and the norm fires."""
    torch.manual_seed(0)
    clipped, capture, _ = train(tmp_path / "clipped", max_grad_norm=1e-3,
                                grad_logger=GradLogger(log_frequency=1, exploding=2e-3))
    torch.manual_seed(0)
    free, _, _ = train(tmp_path / "free", grad_logger=GradLogger(log_frequency=1, exploding=1e9))
    stats = {r["global_step"]: r["metrics"] for r in of(clipped, "grad_stats")}
    assert sorted(stats) == [1, 2, 3, 4, 5, 6]
    first_free = of(free, "grad_stats")[0]["metrics"]
    for key in ("grad_norm_total", "grad_norm_max", "grad_norm_min", "grad_norm_mean"):
        assert stats[1][key] == pytest.approx(first_free[key], rel=REL), key
    for record in of(clipped, "on_step_end"):
        pre_clip = record["metrics"]["grad_norm"]
        assert pre_clip > 1e-2  # clipping really happened: the gradients the optimizer saw were 1e-3
        assert stats[record["global_step"]]["grad_norm_total"] == pytest.approx(pre_clip, rel=REL)
        post_clip = expected_stats(capture.norms[record["global_step"]])["grad_norm_total"]
        assert post_clip == pytest.approx(1e-3, rel=1e-3)
    warned = [r for r in of(clipped, "warning") if "exploding" in r["message"]]
    assert [r["global_step"] for r in warned] == [1, 2, 3, 4, 5, 6]


def scaled_loss(factor):
    def compute_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.mse_loss(outputs["logits"], labels) * factor
    return compute_loss


def test_an_exploding_norm_is_published_as_a_warning(tmp_path):
    torch.manual_seed(0)
    journal, capture, _ = train(tmp_path, compute_loss_func=scaled_loss(1e6))
    stats = {r["global_step"]: r for r in of(journal, "grad_stats")}
    assert sorted(stats) == [2, 4, 6]
    warnings = of(journal, "warning")
    assert [w["global_step"] for w in warnings] == [2, 4, 6]
    for warning in warnings:
        step = warning["global_step"]
        total = stats[step]["metrics"]["grad_norm_total"]
        assert total > 1e3
        assert total == pytest.approx(expected_stats(capture.norms[step])["grad_norm_total"], rel=REL)
        assert "exploding" in warning["message"] and "vanishing" not in warning["message"]
        assert f"step {step}" in warning["message"]
        assert warning["metrics"]["grad_norm_total"] == pytest.approx(total, rel=REL)
        assert warning["seq"] > stats[step]["seq"]


def test_a_lower_exploding_threshold_warns_for_ordinary_gradients(tmp_path):
    torch.manual_seed(0)
    journal, _, _ = train(tmp_path, grad_logger=GradLogger(log_frequency=2, exploding=1e-12))
    assert [w["global_step"] for w in of(journal, "warning")] == [2, 4, 6]
    assert all("exploding" in w["message"] for w in of(journal, "warning"))


def test_a_nan_gradient_counts_as_exploding(tmp_path):
    torch.manual_seed(0)
    journal, _, _ = train(tmp_path, compute_loss_func=scaled_loss(math.nan))
    stats = of(journal, "grad_stats")
    assert [r["global_step"] for r in stats] == [2, 4, 6]
    assert all(math.isnan(r["metrics"]["grad_norm_total"]) for r in stats)
    warnings = of(journal, "warning")
    assert [w["global_step"] for w in warnings] == [2, 4, 6]
    assert all("exploding" in w["message"] and math.isnan(w["metrics"]["grad_norm_total"]) for w in warnings)


def test_vanishing_norms_are_published_as_warnings(tmp_path):
    torch.manual_seed(0)
    journal, capture, _ = train(tmp_path, grad_logger=GradLogger(log_frequency=2, track_layers=["linear.weight"],
                                                                 vanishing=1e9))
    warnings = of(journal, "warning")
    assert [w["global_step"] for w in warnings] == [2, 4, 6]
    for warning in warnings:
        assert "vanishing" in warning["message"] and "exploding" not in warning["message"]
        expected = expected_stats(capture.norms[warning["global_step"]])["grad_norm_total"]
        assert warning["metrics"]["grad_norm_total"] == pytest.approx(expected, rel=REL)


def test_tracked_layers_of_a_char_gpt(tmp_path):
    from trainer.chargpt import CharGPT, CharGPTConfig
    from trainer.data import CharCorpus

    text = "the quick brown fox jumps over the lazy dog. " * 20
    corpus = CharCorpus(block_size=16, text=text)
    torch.manual_seed(0)
    model = CharGPT(CharGPTConfig(vocab_size=corpus.tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2,
                                  n_embd=16))
    journal, capture, _ = train(tmp_path, model=model, dataset=corpus.train_dataset,
                                grad_logger=GradLogger(log_frequency=2, track_layers=[r"blocks\.0\.", r"^ln_f\."]))
    stats = of(journal, "grad_stats")
    assert [r["global_step"] for r in stats] == [2, 4, 6]
    for record in stats:
        norms = capture.norms[record["global_step"]]
        tracked = {n for n in norms if n.startswith("blocks.0.") or n.startswith("ln_f.")}
        assert tracked and any(n.startswith("blocks.1.") for n in norms)
        metrics = record["metrics"]
        assert {k[len("layer/"):] for k in metrics if k.startswith("layer/")} == tracked
        for name in tracked:
            assert metrics[f"layer/{name}"] == pytest.approx(norms[name], rel=REL)
        for key, value in expected_stats(norms).items():
            assert metrics[key] == pytest.approx(value, rel=REL), key


def test_log_frequency_must_be_positive():
    with pytest.raises(ValueError, match="log_frequency"):
        GradLogger(log_frequency=0)


def test_under_transformers_the_stats_are_the_norms_before_clipping(tmp_path):
    """In a transformers.Trainer (attach_bus taps accelerate's clip_grad_norm_), the total equals the
    grad_norm transformers logs, which is the pre-clip norm, though the gradients were clipped to 1e-3."""
    transformers = pytest.importorskip("transformers")
    from trainer import attach_bus

    torch.manual_seed(0)
    hf = transformers.Trainer(
        model=TinyRegression(), train_dataset=RegressionDataset(16), callbacks=[GradLogger(log_frequency=1)],
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none",
                                            max_steps=4, logging_steps=1, max_grad_norm=1e-3, save_strategy="no",
                                            per_device_train_batch_size=4, disable_tqdm=True))
    bus = attach_bus(hf)
    hf.train()
    bus.close()
    journal = list(read_journal(registry.resolve(bus.run_id).journal_path()))
    logged = {h["step"]: h["grad_norm"] for h in hf.state.log_history if "grad_norm" in h}
    stats = {r["global_step"]: r["metrics"]["grad_norm_total"] for r in of(journal, "grad_stats")}
    assert sorted(stats) == sorted(logged) == [1, 2, 3, 4]
    for step, norm in logged.items():
        assert norm > 1e-2 and stats[step] == pytest.approx(norm, rel=1e-4), step
