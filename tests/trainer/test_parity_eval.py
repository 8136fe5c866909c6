"""Evaluation and prediction side by side with transformers' Trainer (issue 12).

Each test builds this `trainer.Trainer` and `transformers.Trainer` on the same tiny model, data and
arguments (tests/trainer/side_by_side.py) and compares what a transformers user sees: what compute_metrics
and preprocess_logits_for_metrics receive, the metrics (keys, values and Python types), the log history,
and what predict() returns (nested structure, shapes, dtypes, values, -100 padding).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import RegressionDataset, TinyRegression
from side_by_side import TIMING_SUFFIXES, assert_logs_equal, assert_metrics_equal, make_pair, run_both

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

DIM, CLASSES = 4, 3


# -- tiny models and data -------------------------------------------------------------------------------

@dataclasses.dataclass
class ClassifierOutput(transformers.utils.ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class Classifier(torch.nn.Module):
    """A linear 3-class classifier whose output is a dict, a tuple, a ModelOutput or a bare logits tensor."""

    main_input_name = "input_ids"

    def __init__(self, kind: str = "dict"):
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(DIM, CLASSES)

    def forward(self, input_ids, labels=None):
        logits = self.linear(input_ids)
        hidden = input_ids * 2  # a second output, shaped (batch, DIM)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        if self.kind == "dict":
            return {**({"loss": loss} if loss is not None else {}), "logits": logits, "hidden": hidden}
        if self.kind == "tuple":
            return (loss, logits, hidden) if loss is not None else (logits, hidden)
        if self.kind == "modeloutput":
            return ClassifierOutput(loss=loss, logits=logits, hidden=hidden)
        return (loss, logits) if loss is not None else logits  # "logits": a bare tensor without labels


class ClassDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 10, seed: int = 0, with_labels: bool = True, extra_labels: tuple = ()):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = self.x[:, :CLASSES].argmax(-1)
        self.with_labels, self.extra_labels = with_labels, extra_labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"input_ids": self.x[i]}
        if self.with_labels:
            item["labels"] = self.y[i]
        for name in self.extra_labels:
            item[name] = self.x[i, 0]
        return item


class TwoLabelClassifier(Classifier):
    """forward takes two label arguments: transformers' default label_names finds both."""

    def forward(self, input_ids, labels=None, aux_labels=None):
        out = super().forward(input_ids, labels)
        if aux_labels is not None and labels is not None:
            out["loss"] = out["loss"] + F.mse_loss(out["hidden"][:, 0], aux_labels)
        return out


class TargetClassifier(Classifier):
    """Its label argument is `target`, found only through args.label_names."""

    def forward(self, input_ids, target=None):
        return super().forward(input_ids, target)


class Tagger(torch.nn.Module):
    """A token classifier: logits (batch, seq, classes), CE over labels != -100."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, CLASSES)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, CLASSES), labels.reshape(-1), ignore_index=-100)
        return out


class RaggedTokens(torch.utils.data.Dataset):
    """Sequences whose lengths differ from batch to batch (batch size 2): 3, 5, 2, 4, 1."""

    LENGTHS = (3, 3, 5, 5, 2, 2, 4, 4, 1)

    def __len__(self):
        return len(self.LENGTHS)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 11, (self.LENGTHS[i],), generator=g)
        return {"input_ids": ids, "labels": ids % CLASSES}


def pad_collate(items):
    """Pads each batch to its own longest sequence: input_ids with 0, labels with -100."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, :len(it["input_ids"])] = it["input_ids"]
        labels[row, :len(it["labels"])] = it["labels"]
    return {"input_ids": ids, "labels": labels}


# -- compute_metrics / preprocess_logits_for_metrics that record what they are given ---------------------

def first(predictions):
    return predictions[0] if isinstance(predictions, tuple) else predictions


def recording_metrics(calls: list):
    """compute_metrics returning numpy types (which must come back as Python numbers) and recording its input."""
    def compute_metrics(p):
        calls.append(p)
        preds = first(p.predictions)
        preds = preds.argmax(-1) if preds.ndim > 1 else preds
        return {"accuracy": (preds == p.label_ids).mean(), "count": np.int64(len(preds))}
    return compute_metrics


def recording_argmax(calls: list):
    def preprocess(logits, labels):
        calls.append((tuple(first(logits).shape), tuple(labels.shape)))
        return first(logits).argmax(-1)
    return preprocess


def assert_nested_equal(ours, hf, where="predictions"):
    """Same nesting (types), shapes, dtypes and values."""
    assert type(ours) is type(hf), f"{where}: ours is {type(ours).__name__}, transformers' {type(hf).__name__}"
    if isinstance(hf, (tuple, list)):
        assert len(ours) == len(hf), f"{where}: {len(ours)} items, transformers has {len(hf)}"
        for i, (a, b) in enumerate(zip(ours, hf)):
            assert_nested_equal(a, b, f"{where}[{i}]")
    elif isinstance(hf, np.ndarray):
        assert ours.dtype == hf.dtype, f"{where}: dtype {ours.dtype}, transformers' {hf.dtype}"
        np.testing.assert_allclose(ours, hf, rtol=1e-5, atol=1e-6, err_msg=where)
    else:
        assert ours == hf, where


def assert_same_metrics(ours: dict, hf: dict):
    """Values (timings aside), Python types, and key order (which is the order logs print in)."""
    assert_metrics_equal(ours, hf)
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in hf.items()}
    assert list(ours) == list(hf)


def eval_args(**extra):
    return {"per_device_eval_batch_size": 4, **extra}


# -- the tests ------------------------------------------------------------------------------------------

def test_compute_metrics_and_preprocess_logits_run_per_batch_and_appear_in_training_logs(tmp_path):
    seen = {"ours": ([], []), "hf": ([], [])}
    ours, hf = make_pair(
        tmp_path, Classifier, ClassDataset(16), ClassDataset(10, seed=1),
        eval_args(max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2, learning_rate=0.1),
        ours_kwargs=dict(compute_metrics=recording_metrics(seen["ours"][0]),
                         preprocess_logits_for_metrics=recording_argmax(seen["ours"][1])),
        hf_kwargs=dict(compute_metrics=recording_metrics(seen["hf"][0]),
                       preprocess_logits_for_metrics=recording_argmax(seen["hf"][1])))
    ours.train()
    hf.train()
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert sum("eval_accuracy" in h for h in hf.state.log_history) == 2
    assert_same_metrics(ours.evaluate(), hf.evaluate())

    (our_calls, our_batches), (hf_calls, hf_batches) = seen["ours"], seen["hf"]
    assert our_batches == hf_batches == [((4, CLASSES), (4,)), ((4, CLASSES), (4,)), ((2, CLASSES), (2,))] * 3
    assert len(our_calls) == len(hf_calls) == 3
    for a, b in zip(our_calls, hf_calls):
        assert_nested_equal(a.predictions, b.predictions)  # the argmax of each batch, concatenated
        assert_nested_equal(a.label_ids, b.label_ids, "label_ids")
        assert a.inputs is b.inputs is None and a.losses is b.losses is None


def test_include_for_metrics_gives_inputs_and_per_example_losses(tmp_path):
    seen = {"ours": [], "hf": []}
    ours, hf = make_pair(tmp_path, Classifier, None, ClassDataset(10, seed=1),
                         eval_args(include_for_metrics=["inputs", "loss"]),
                         ours_kwargs=dict(compute_metrics=recording_metrics(seen["ours"])),
                         hf_kwargs=dict(compute_metrics=recording_metrics(seen["hf"])))
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    (a,), (b,) = seen["ours"], seen["hf"]
    assert_nested_equal(a.inputs, b.inputs, "inputs")
    assert_nested_equal(a.losses, b.losses, "losses")
    assert b.losses.shape == (10,)  # the last batch of 2 counts twice, not 4 times
    assert len(list(a)) == len(list(b)) == 4  # predictions, label_ids, inputs, losses


def test_batch_eval_metrics_are_computed_per_batch_with_compute_result(tmp_path):
    def batch_metrics(calls):
        def compute_metrics(p, compute_result):
            calls.append((compute_result, tuple(first(p.predictions).shape), p.losses.tolist()))
            return {"batches": len(calls), "last": compute_result}
        return compute_metrics

    seen = {"ours": [], "hf": []}
    ours, hf = make_pair(tmp_path, Classifier, None, ClassDataset(10, seed=1),
                         eval_args(batch_eval_metrics=True, include_for_metrics=["loss"]),
                         ours_kwargs=dict(compute_metrics=batch_metrics(seen["ours"])),
                         hf_kwargs=dict(compute_metrics=batch_metrics(seen["hf"])))
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    assert [c[0] for c in seen["hf"]] == [False, False, True]
    for a, b in zip(seen["ours"], seen["hf"], strict=True):
        assert a[:2] == b[:2] and a[2] == pytest.approx(b[2])
    # predict() still gathers the predictions when metrics are computed per batch.
    p_ours, p_hf = ours.predict(ClassDataset(6, seed=2)), hf.predict(ClassDataset(6, seed=2))
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert_same_metrics(p_ours.metrics, p_hf.metrics)


def test_metric_key_prefix_is_added_unless_the_key_already_has_it(tmp_path):
    def metrics(p):
        return {"accuracy": np.float32(0.5), "dev_f1": 0.25, "eval_other": 1, "held_x": torch.tensor(2.0)}

    ours, hf = make_pair(tmp_path, Classifier, None, ClassDataset(10, seed=1), eval_args(), compute_metrics=metrics)
    dev_ours, dev_hf = ours.evaluate(metric_key_prefix="dev"), hf.evaluate(metric_key_prefix="dev")
    assert_same_metrics(dev_ours, dev_hf)
    assert {"dev_accuracy", "dev_f1", "dev_eval_other", "dev_held_x", "dev_loss"} <= set(dev_ours)
    p_ours = ours.predict(ClassDataset(6, seed=2), metric_key_prefix="held")
    p_hf = hf.predict(ClassDataset(6, seed=2), metric_key_prefix="held")
    assert_same_metrics(p_ours.metrics, p_hf.metrics)
    assert "held_x" in p_ours.metrics and "held_dev_f1" in p_ours.metrics
    assert_logs_equal(ours.state.log_history, hf.state.log_history)  # evaluate logs, predict does not


def test_a_dict_of_eval_datasets_is_evaluated_one_by_one_during_training_and_after(tmp_path):
    eval_sets = {"a": ClassDataset(6, seed=1), "b": ClassDataset(10, seed=2)}
    ours, hf = run_both(tmp_path, Classifier, ClassDataset(16), eval_sets,
                        eval_args(max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2,
                                  learning_rate=0.1, metric_for_best_model="b_accuracy"),
                        compute_metrics=recording_metrics([]))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert {"eval_a_loss", "eval_a_accuracy"} <= set(hf.state.log_history[1])
    assert (ours.state.best_metric, ours.state.best_global_step) == (hf.state.best_metric, hf.state.best_global_step)
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    assert_same_metrics(ours.evaluate("b"), hf.evaluate("b"))  # a name of self.eval_dataset
    passed = {"x": ClassDataset(5, seed=3), "y": ClassDataset(3, seed=4)}
    assert_same_metrics(ours.evaluate(passed, metric_key_prefix="val"), hf.evaluate(passed, metric_key_prefix="val"))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)


def test_eval_on_start_logs_the_same_evaluation_at_step_zero(tmp_path):
    ours, hf = run_both(tmp_path, Classifier, ClassDataset(16), ClassDataset(10, seed=1),
                        eval_args(max_steps=2, eval_strategy="steps", eval_steps=2, eval_on_start=True),
                        compute_metrics=recording_metrics([]))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    assert hf.state.log_history[0]["step"] == 0 and "eval_accuracy" in hf.state.log_history[0]
    assert [set(h) for h in ours.state.log_history] == [set(h) for h in hf.state.log_history]


def test_prediction_loss_only_skips_predictions_and_metrics(tmp_path):
    seen = {"ours": [], "hf": []}
    ours, hf = make_pair(tmp_path, Classifier, None, ClassDataset(10, seed=1), eval_args(prediction_loss_only=True),
                         ours_kwargs=dict(compute_metrics=recording_metrics(seen["ours"])),
                         hf_kwargs=dict(compute_metrics=recording_metrics(seen["hf"])))
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    assert seen["ours"] == seen["hf"] == []
    p_ours, p_hf = ours.predict(ClassDataset(6, seed=2)), hf.predict(ClassDataset(6, seed=2))
    assert p_ours.predictions is p_hf.predictions is None and p_ours.label_ids is p_hf.label_ids is None
    assert_same_metrics(p_ours.metrics, p_hf.metrics)
    # The loop's own argument wins over the TrainingArguments field.
    out_ours = ours.evaluation_loop(ours.get_eval_dataloader(), "Evaluation", prediction_loss_only=False)
    out_hf = hf.evaluation_loop(hf.get_eval_dataloader(), "Evaluation", prediction_loss_only=False)
    assert_nested_equal(out_ours.predictions, out_hf.predictions)
    assert_same_metrics(out_ours.metrics, out_hf.metrics)
    assert out_ours.num_samples == out_hf.num_samples == 10


@pytest.mark.parametrize("kind", ["dict", "tuple", "modeloutput", "logits"])
def test_predict_returns_what_transformers_returns_for_each_output_shape(tmp_path, kind):
    ours, hf = make_pair(tmp_path, lambda: Classifier(kind), None, None, eval_args(),
                         compute_metrics=recording_metrics([]))
    for data in (ClassDataset(10, seed=2), ClassDataset(7, seed=3, with_labels=False)):
        p_ours, p_hf = ours.predict(data), hf.predict(data)
        assert_nested_equal(p_ours.predictions, p_hf.predictions)
        assert_nested_equal(p_ours.label_ids, p_hf.label_ids, "label_ids")
        assert_same_metrics(p_ours.metrics, p_hf.metrics)
    if kind in ("dict", "modeloutput"):
        p_ours, p_hf = ours.predict(data, ignore_keys=["hidden"]), hf.predict(data, ignore_keys=["hidden"])
        assert_nested_equal(p_ours.predictions, p_hf.predictions)
        assert isinstance(p_hf.predictions, np.ndarray)  # one output left: unwrapped


def test_keys_to_ignore_at_inference_of_the_model_config(tmp_path):
    def with_config():
        model = Classifier("dict")
        model.config = transformers.PretrainedConfig()
        model.config.keys_to_ignore_at_inference = ["logits"]
        return model

    ours, hf = make_pair(tmp_path, with_config, None, None, eval_args())
    p_ours, p_hf = ours.predict(ClassDataset(10, seed=2)), hf.predict(ClassDataset(10, seed=2))
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert p_hf.predictions.shape == (10, DIM)  # "hidden", the one output left
    # ignore_keys passed to predict() replaces the config's list.
    data = ClassDataset(10, seed=2)
    p_ours, p_hf = ours.predict(data, ignore_keys=[]), hf.predict(data, ignore_keys=[])
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert isinstance(p_hf.predictions, tuple) and len(p_hf.predictions) == 2


def test_label_names_several_labels_a_custom_name_and_a_missing_label(tmp_path):
    ours, hf = make_pair(tmp_path, TwoLabelClassifier, None, None, eval_args())
    assert ours.label_names == hf.label_names == ["labels", "aux_labels"]
    both = ClassDataset(10, seed=2, extra_labels=("aux_labels",))
    p_ours, p_hf = ours.predict(both), hf.predict(both)
    assert isinstance(p_hf.label_ids, tuple) and len(p_hf.label_ids) == 2
    assert_nested_equal(p_ours.label_ids, p_hf.label_ids, "label_ids")
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert_same_metrics(p_ours.metrics, p_hf.metrics)
    # Only one of the two labels: no loss, the whole output is the prediction.
    p_ours, p_hf = ours.predict(ClassDataset(6, seed=3)), hf.predict(ClassDataset(6, seed=3))
    assert "test_loss" not in p_hf.metrics
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert_same_metrics(p_ours.metrics, p_hf.metrics)

    class Targets(ClassDataset):
        def __getitem__(self, i):
            return {"input_ids": self.x[i], "target": self.y[i]}

    ours, hf = make_pair(tmp_path / "t", TargetClassifier, None, None, eval_args(label_names=["target"]))
    p_ours, p_hf = ours.predict(Targets(10, seed=4)), hf.predict(Targets(10, seed=4))
    assert_nested_equal(p_ours.label_ids, p_hf.label_ids, "label_ids")
    assert_same_metrics(p_ours.metrics, p_hf.metrics)
    assert "test_loss" in p_hf.metrics


@pytest.mark.parametrize("concat", [True, False])
def test_ragged_sequence_lengths_are_padded_with_minus_100_across_batches(tmp_path, concat):
    def token_accuracy(p):
        if isinstance(p.predictions, list):  # eval_do_concat_batches=False: one array per batch
            preds, labels = np.concatenate([a.ravel() for a in p.predictions]), \
                np.concatenate([a.ravel() for a in p.label_ids])
        else:
            preds, labels = p.predictions.ravel(), p.label_ids.ravel()
        keep = labels != -100
        return {"token_accuracy": (preds[keep] == labels[keep]).mean()}

    ours, hf = make_pair(tmp_path, Tagger, None, RaggedTokens(), eval_args(per_device_eval_batch_size=2,
                                                                           eval_do_concat_batches=concat),
                         data_collator=pad_collate, compute_metrics=token_accuracy,
                         preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    for t in (ours, hf):  # raw logits now: (batch, seq, classes)
        t.preprocess_logits_for_metrics = t.compute_metrics = None
    p_ours, p_hf = ours.predict(RaggedTokens()), hf.predict(RaggedTokens())
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert_nested_equal(p_ours.label_ids, p_hf.label_ids, "label_ids")
    if concat:
        assert p_hf.predictions.shape == (9, 5, CLASSES) and (p_hf.predictions[4:6, 2:] == -100).all()


@pytest.mark.parametrize("nan_filter", [True, False])
def test_non_finite_eval_batch_losses_are_handled_as_transformers_does(tmp_path, nan_filter):
    def with_bad_rows(rows, value):
        data = RegressionDataset(12, seed=1)
        data.y[rows] = value
        return data

    ours, hf = make_pair(tmp_path, TinyRegression, None, None, eval_args(logging_nan_inf_filter=nan_filter))
    cases = {"one nan batch": with_bad_rows(slice(4, 6), float("nan")),
             "one inf batch": with_bad_rows(slice(8, 9), float("inf")),
             "nan in the short last batch": with_bad_rows(slice(11, 12), float("nan")),
             "every batch nan": with_bad_rows(slice(0, 12, 4), float("nan"))}
    for data in cases.values():
        assert_same_metrics(ours.evaluate(data), hf.evaluate(data))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    finite = [bool(np.isfinite(h["eval_loss"])) for h in hf.state.log_history]
    assert finite == ([True, True, True, False] if nan_filter else [False] * 4)


def test_dataloader_drop_last_drops_the_short_eval_batch_but_num_samples_counts_the_dataset(tmp_path):
    ours, hf = make_pair(tmp_path, Classifier, None, ClassDataset(10, seed=1), eval_args(dataloader_drop_last=True),
                         compute_metrics=recording_metrics([]))
    assert_same_metrics(ours.evaluate(), hf.evaluate())
    out_ours = ours.evaluation_loop(ours.get_eval_dataloader(), "Evaluation")
    out_hf = hf.evaluation_loop(hf.get_eval_dataloader(), "Evaluation")
    assert out_ours.num_samples == out_hf.num_samples == 10
    p_ours, p_hf = ours.predict(ClassDataset(10, seed=2)), hf.predict(ClassDataset(10, seed=2))
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert p_hf.label_ids.shape == (8,)


def timing_keys(logs: list[dict]) -> list[set]:
    return [{k for k in h if k.endswith(TIMING_SUFFIXES)} for h in logs]


def test_model_preparation_time_appears_exactly_where_transformers_adds_it(tmp_path):
    args = eval_args(max_steps=2, eval_strategy="steps", eval_steps=2)
    # Evaluated before train(): the key is in that evaluation, the predictions and every later evaluation.
    ours, hf = make_pair(tmp_path / "first", Classifier, ClassDataset(16), ClassDataset(10, seed=1), args)
    for t in (ours, hf):
        t.evaluate()
        t.predict(ClassDataset(4, seed=2))
        t.train()
    assert timing_keys(ours.state.log_history) == timing_keys(hf.state.log_history)
    assert "eval_model_preparation_time" in hf.state.log_history[-2]
    # Trained first: never.
    ours, hf = make_pair(tmp_path / "trained", Classifier, ClassDataset(16), ClassDataset(10, seed=1), args)
    for t in (ours, hf):
        t.train()
        t.evaluate()
    p_ours, p_hf = ours.predict(ClassDataset(4, seed=2)), hf.predict(ClassDataset(4, seed=2))
    assert timing_keys(ours.state.log_history) == timing_keys(hf.state.log_history)
    assert set(p_ours.metrics) == set(p_hf.metrics) and "test_model_preparation_time" not in p_hf.metrics


def test_transformers_early_stopping_on_a_compute_metrics_metric_stops_our_trainer_at_the_same_step(tmp_path):
    common = eval_args(max_steps=30, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1,
                       save_strategy="steps", save_steps=1, logging_steps=1, load_best_model_at_end=True,
                       metric_for_best_model="accuracy", greater_is_better=True, save_total_limit=2,
                       learning_rate=0.05)
    ours, hf = run_both(tmp_path, Classifier, ClassDataset(16), ClassDataset(10, seed=1), common,
                        compute_metrics=recording_metrics([]),
                        ours_kwargs=dict(callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=2)]),
                        hf_kwargs=dict(callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=2)]))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
    accuracy = [h["eval_accuracy"] for h in hf.state.log_history if "eval_accuracy" in h]
    assert accuracy[0] < max(accuracy) == accuracy[-1] == accuracy[-3]  # rose, then two evaluations without gain
    assert ours.state.global_step == hf.state.global_step == hf.state.best_global_step + 2 < 30
    assert (ours.state.best_metric, ours.state.best_global_step) == (hf.state.best_metric, hf.state.best_global_step)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "hf").iterdir())


class ReturnsLoss(torch.nn.Module):
    """CLIP-like: no label argument, but forward(return_loss=True) returns a loss of its own."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(DIM, CLASSES)

    def forward(self, input_ids, return_loss=True):
        logits = self.linear(input_ids)
        return {"loss": logits.pow(2).mean(), "logits": logits} if return_loss else {"logits": logits}


class Stream(torch.utils.data.IterableDataset):
    """An eval set without a length: 10 examples."""

    def __iter__(self):
        data = RegressionDataset(10, seed=1)
        return (data[i] for i in range(len(data)))


def test_a_loss_without_labels_and_an_eval_set_without_length(tmp_path):
    ours, hf = make_pair(tmp_path, ReturnsLoss, None, None, eval_args())
    data = ClassDataset(10, seed=2, with_labels=False)
    p_ours, p_hf = ours.predict(data), hf.predict(data)
    assert "test_loss" in p_hf.metrics and p_hf.label_ids == ()
    assert_nested_equal(p_ours.predictions, p_hf.predictions)
    assert_nested_equal(p_ours.label_ids, p_hf.label_ids, "label_ids")
    assert_same_metrics(p_ours.metrics, p_hf.metrics)
    # Without a length: the short last batch still counts once per example, and num_samples is what was seen.
    ours, hf = make_pair(tmp_path / "stream", TinyRegression, None, None, eval_args())
    assert_same_metrics(ours.evaluate(Stream()), hf.evaluate(Stream()))
    out_ours = ours.evaluation_loop(ours.get_eval_dataloader(Stream()), "Evaluation")
    out_hf = hf.evaluation_loop(hf.get_eval_dataloader(Stream()), "Evaluation")
    assert out_ours.num_samples == out_hf.num_samples == 10


def test_our_chargpt_output_dataclass_predicts_its_logits(tmp_path):
    """Not side by side: transformers' Trainer cannot read a dataclass output that is not a dict. Ours reads
    it like a ModelOutput, so fg-train's CharGPT gets its logits back from predict() and compute_metrics."""
    import trainer as fg
    from trainer.chargpt import CharGPT

    torch.manual_seed(0)
    model = CharGPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    data = [{"input_ids": torch.arange(i, i + 6) % 11, "labels": torch.arange(i + 1, i + 7) % 11} for i in range(5)]
    t = fg.Trainer(model=model, args=fg.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                          per_device_eval_batch_size=2, report_to="none"))
    out = t.predict(data)
    with torch.no_grad():
        expected = model(torch.stack([d["input_ids"] for d in data])).logits.numpy()
    np.testing.assert_allclose(out.predictions, expected, rtol=1e-5, atol=1e-6)
    assert out.label_ids.shape == (5, 6) and "test_loss" in out.metrics
