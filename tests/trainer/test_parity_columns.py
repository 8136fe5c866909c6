"""Side by side with transformers.Trainer: which example fields reach the model's forward
(`remove_unused_columns`, the default collator's `label` / `label_ids` -> `labels`), and the data loaders'
`dataloader_drop_last`.

For a torch Dataset of dicts transformers removes unused fields per example, in the collator (its
`RemoveColumnsCollator`); a `datasets.Dataset` would lose the columns themselves. Either way the model
sees the same batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from side_by_side import assert_logs_equal, make_pair
from test_parity_loss import in_order
from trainer.data import default_data_collator

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf


FEATURES = {
    "int label": [{"x": [1.0, 2.0], "label": 1}, {"x": [3.0, 4.0], "label": 0}],
    "float label": [{"x": [1.0, 2.0], "label": 0.5}, {"x": [3.0, 4.0], "label": 1.5}],
    "tensor int label": [{"x": torch.ones(2), "label": torch.tensor(2)},
                         {"x": torch.zeros(2), "label": torch.tensor(1)}],
    "numpy label": [{"x": np.ones(2), "label": np.int64(3)}, {"x": np.zeros(2), "label": np.int64(4)}],
    "bool label": [{"x": [1], "label": True}, {"x": [2], "label": False}],
    "label_ids list": [{"x": [1], "label_ids": [1, 2, 3]}, {"x": [2], "label_ids": [4, 5, 6]}],
    "label_ids float": [{"x": [1], "label_ids": [0.5, 1.0]}, {"x": [2], "label_ids": [1.5, 2.0]}],
    "label_ids tensor": [{"x": [1], "label_ids": torch.tensor([1, 2])}, {"x": [2], "label_ids": torch.tensor([3, 4])}],
    "label and label_ids": [{"x": [1], "label": 1, "label_ids": [1, 2]}, {"x": [2], "label": 0, "label_ids": [3, 4]}],
    "label and labels": [{"x": [1], "label": 1, "labels": [7]}, {"x": [2], "label": 0, "labels": [8]}],
    "None label": [{"x": [1], "label": None, "label_ids": [5]}, {"x": [2], "label": None, "label_ids": [6]}],
    "strings and None": [{"x": [1], "text": "a", "extra": None}, {"x": [2], "text": "b", "extra": None}],
}


@pytest.mark.parametrize("case", sorted(FEATURES))
def test_default_collator_batches_as_transformers(case):
    """Same keys, dtypes and values as transformers.default_data_collator, for each way labels come."""
    ours = default_data_collator(FEATURES[case])
    theirs = transformers.default_data_collator(FEATURES[case])
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key])


class Classifier(torch.nn.Module):
    """Three classes from x in R^4; records the fields each forward receives."""

    def __init__(self, with_kwargs: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.seen: list[tuple[str, ...]] = []
        if with_kwargs:
            self.forward = self._forward_with_kwargs

    def forward(self, x, labels=None):
        self.seen.append(tuple(sorted(["x", *(["labels"] if labels is not None else [])])))
        return self._out(x, labels)

    def _forward_with_kwargs(self, x, labels=None, **kwargs):
        self.seen.append(tuple(sorted(["x", "labels", *kwargs])))
        return self._out(x, labels)

    def _out(self, x, labels):
        logits = self.linear(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Labelled(torch.utils.data.Dataset):
    """Examples with a `label` (an int class), an extra int column and a string column."""

    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, :3].argmax(-1).tolist()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.y[i], "idx": i, "note": f"example {i}"}


ARGS = dict(max_steps=4, per_device_train_batch_size=2, logging_steps=1, learning_rate=0.1, save_strategy="no",
            gradient_accumulation_steps=2)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
@pytest.mark.parametrize("with_kwargs", [False, True])
def test_label_and_extra_columns_reach_forward_as_in_transformers(tmp_path, remove_unused_columns, with_kwargs):
    """`label` becomes `labels` (long). With remove_unused_columns the extra `idx` is dropped, even for a
    forward that takes **kwargs (transformers keeps only named parameters); without it `idx` reaches a
    **kwargs forward, and a forward without **kwargs fails on it in both trainers. Strings never reach
    the model (the collator leaves them out)."""
    ours, hf = make_pair(tmp_path, lambda: Classifier(with_kwargs), Labelled(),
                         args=dict(ARGS, remove_unused_columns=remove_unused_columns))
    in_order(ours, hf)
    if not remove_unused_columns and not with_kwargs:
        for trainer in (ours, hf):
            with pytest.raises(TypeError, match="idx"):
                trainer.train()
        return
    ours.train()
    hf.train()
    assert ours.model.seen == hf.model.seen
    expected = {"x", "labels"} | ({"idx"} if not remove_unused_columns else set()) | \
        ({"num_items_in_batch"} if with_kwargs else set())
    assert set(ours.model.seen[0]) == expected
    assert_logs_equal(ours.state.log_history, hf.state.log_history)


class Sized(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.full((4,), float(i)), "labels": i % 3}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(Sized(5)[i] for i in range(5))


@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_drop_last_applies_where_transformers_applies_it(tmp_path, drop_last):
    """Train, eval and test loaders of a sized dataset drop the last short batch; an IterableDataset's
    loader does not."""
    ours, hf = make_pair(tmp_path, Classifier, Sized(5), Sized(5),
                         args=dict(per_device_train_batch_size=2, per_device_eval_batch_size=2,
                                   dataloader_drop_last=drop_last))
    assert len(ours.get_train_dataloader()) == len(hf.get_train_dataloader()) == (2 if drop_last else 3)
    assert len(ours.get_eval_dataloader()) == len(hf.get_eval_dataloader()) == (2 if drop_last else 3)
    assert len(ours.get_test_dataloader(Sized(5))) == len(hf.get_test_dataloader(Sized(5)))
    assert [len(b["x"]) for b in ours.get_eval_dataloader(Stream())] == \
        [len(b["x"]) for b in hf.get_eval_dataloader(Stream())] == [2, 2, 1]
