"""Data for the built-in default: the standard library's own documentation as a character corpus,
a character tokenizer, fixed-length blocks for next-character prediction; and what every run uses: the
default collator and the removal of example fields the model's forward does not take (transformers' rules).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def default_data_collator(features: Sequence[Mapping]) -> dict:
    """Stack a list of dicts of tensors / arrays / numbers / lists into a dict of batched tensors, as
    transformers' `default_data_collator` does.

    A `label` (one number per example) or, failing that, a `label_ids` (a list or tensor per example)
    field becomes `labels`: long for integer labels, float for float ones. Fields that are None or strings
    are left out. Objects that are not mappings are read through `vars()` (dataclasses, for instance).
    """
    if not features:
        raise ValueError("default_data_collator got an empty batch")
    if not isinstance(features[0], Mapping):
        try:
            features = [vars(f) for f in features]
        except TypeError:
            raise TypeError(
                f"default_data_collator expects each example to be a dict of tensors or numbers, got "
                f"{type(features[0]).__name__}; pass data_collator= to the Trainer for other shapes") from None
    first = features[0]
    batch = {}
    if first.get("label") is not None:
        label = first["label"].item() if isinstance(first["label"], torch.Tensor) else first["label"]
        dtype = torch.long if isinstance(label, (int, np.integer)) else torch.float
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
    elif first.get("label_ids") is not None:
        if isinstance(first["label_ids"], torch.Tensor):
            batch["labels"] = torch.stack([f["label_ids"] for f in features])
        else:
            dtype = torch.long if isinstance(first["label_ids"][0], (int, np.integer)) else torch.float
            batch["labels"] = torch.tensor([f["label_ids"] for f in features], dtype=dtype)
    for key, value in first.items():
        if key in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        values = [f[key] for f in features]
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(np.stack(values))
        else:
            batch[key] = torch.tensor(values)
    return batch


# -- columns: what reaches the model's forward ------------------------------------------------------------

def label_names_of(model: torch.nn.Module) -> list[str]:
    """The forward parameters that carry labels, by transformers' rule (`find_labels`): every parameter whose
    name contains "label", plus start/end positions for question-answering models."""
    names = inspect.signature(type(model).forward).parameters
    if "QuestionAnswering" in type(model).__name__:
        return [p for p in names if "label" in p or p in ("start_positions", "end_positions")]
    return [p for p in names if "label" in p]


def signature_columns(model: torch.nn.Module, label_names: Sequence[str]) -> list[str]:
    """The example fields `remove_unused_columns` keeps: the names of `model.forward`'s parameters, plus
    `label` / `label_ids` (the default collator renames them) and the label names.

    As in transformers, a forward that takes `**kwargs` does not keep every field: only its named
    parameters (and the literal name of the `**` parameter) count.
    """
    columns = list(inspect.signature(model.forward).parameters)
    return columns + sorted({"label", "label_ids", *label_names})


class RemoveColumnsCollator:
    """Wraps a collator: each example that is a `dict` loses the fields not in `signature_columns` first.

    This is how transformers removes unused columns of any dataset that is not a `datasets.Dataset` (a
    torch Dataset of dicts, an IterableDataset): per example, in the collator, for training, evaluation and
    prediction alike. Examples that are not dicts go through untouched.
    """

    def __init__(self, data_collator, signature_columns: Sequence[str], model_name: str = "",
                 description: str | None = None):
        self.data_collator = data_collator
        self.signature_columns = set(signature_columns)
        self.model_name = model_name
        self.description = description
        self.message_logged = False

    def _remove_columns(self, feature):
        if not isinstance(feature, dict):
            return feature
        if not self.message_logged:
            ignored = sorted(set(feature) - self.signature_columns)
            if ignored:
                where = "" if self.description is None else f" in the {self.description} set"
                logger.info("The following columns%s have no matching argument in `%s.forward` and have been "
                            "ignored: %s.", where, self.model_name, ", ".join(ignored))
                self.message_logged = True
        return {k: v for k, v in feature.items() if k in self.signature_columns}

    def __call__(self, features):
        return self.data_collator([self._remove_columns(f) for f in features])


class DataMixin:
    """The data loaders of `Trainer`, built as transformers builds them (it reads `self.args`, `self.model`,
    `self.data_collator`, `self.train_dataset`, `self.eval_dataset`, `self.label_names`)."""

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        sampler = None
        if not isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            sampler = EpochSampler(len(self.train_dataset), seed=self.args.seed, rank=self.args.process_index,
                                   world_size=self.args.world_size)
        return self._dataloader(self.train_dataset, self.args.per_device_train_batch_size, sampler, "Training")

    def get_eval_dataloader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        """`eval_dataset` may be a dataset, or the name of one when the Trainer's eval_dataset is a dict."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("evaluation needs an eval_dataset (pass it to the Trainer or to evaluate())")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._dataloader(dataset, self.args.per_device_eval_batch_size, None, "Evaluation")

    def get_test_dataloader(self, test_dataset) -> torch.utils.data.DataLoader:
        return self._dataloader(test_dataset, self.args.per_device_eval_batch_size, None, "test")

    def _dataloader(self, dataset, batch_size: int, sampler, description: str) -> torch.utils.data.DataLoader:
        """As transformers' `_get_dataloader`: unused columns removed (from a `datasets.Dataset` itself,
        otherwise per example in the collator), and `dataloader_drop_last` applied to every dataset with a
        length, for evaluation and prediction too."""
        collator = self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description)
        # A private generator: creating an iterator must not draw from the global RNG, or resuming would
        # shift every random number after it.
        generator = torch.Generator()
        generator.manual_seed(self.args.seed)
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
            num_workers=self.args.dataloader_num_workers, drop_last=self.args.dataloader_drop_last and not iterable,
            pin_memory=self.args.device.type == "cuda", generator=generator,
        )

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = signature_columns(self.model, self.label_names)

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        if not self.args.remove_unused_columns:
            return data_collator
        self._set_signature_columns_if_needed()
        return RemoveColumnsCollator(data_collator, self._signature_columns, type(self.model).__name__, description)

    def _remove_unused_columns(self, dataset, description: str | None = None):
        """A `datasets.Dataset` loses the columns the model's forward does not take (as transformers)."""
        if not self.args.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        ignored = sorted(set(dataset.column_names) - set(self._signature_columns))
        if not [c for c in self._signature_columns if c in dataset.column_names]:
            raise ValueError(f"no column of the {description} set matches the arguments of "
                             f"{type(self.model).__name__}.forward ({', '.join(self._signature_columns)}); the "
                             f"dataset has {', '.join(ignored)}. Set remove_unused_columns=False to keep them.")
        return dataset.remove_columns(ignored) if ignored else dataset


def _is_hf_dataset(dataset) -> bool:
    """A `datasets.Dataset`, without importing `datasets` (it is not a dependency)."""
    return any(c.__module__.startswith("datasets") and c.__name__ == "Dataset" for c in type(dataset).__mro__)


def stdlib_text() -> str:
    """Text every Python install carries: the help topics of `pydoc_data.topics` (else the `this` module's
    Zen, decoded, repeated — enough to train on, if dull)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        logger.warning("pydoc_data.topics is missing; training on the standard library's own sources instead")
        import inspect
        import json as json_module
        import textwrap

        return textwrap.dedent(inspect.getsource(json_module)) * 20
    return "\n\n".join(topics[name] for name in sorted(topics))


class CharTokenizer:
    """One token per character of a fixed vocabulary; unknown characters map to `unk_token`."""

    unk_token = "\ufffd"

    def __init__(self, chars: Sequence[str]):
        vocab = sorted(set(chars) | {self.unk_token})
        self.itos = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unk = self.stoi[self.unk_token]
        return [self.stoi.get(ch, unk) for ch in text]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.itos[i] for i in ids)

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": "".join(self.itos)}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        return cls(list(data["vocab"]))

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, "tokenizer.json").write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CharTokenizer":
        data = json.loads(Path(directory, "tokenizer.json").read_text(encoding="utf-8"))
        return cls(list(data["vocab"]))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of `block_size + 1` tokens: `input_ids` and the next-token `labels`."""

    def __init__(self, ids: torch.Tensor, block_size: int, max_blocks: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        self.ids = ids
        self.block_size = block_size
        n = (len(ids) - 1) // block_size
        self.n = n if max_blocks is None else min(n, max_blocks)
        if self.n < 1:
            raise ValueError(f"text of {len(ids)} tokens is too short for block_size={block_size}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.block_size
        chunk = self.ids[start:start + self.block_size + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


@dataclass
class CharCorpus:
    """A text split into train and eval blocks, with its tokenizer. `text=None` uses `stdlib_text()`."""

    block_size: int = 64
    eval_fraction: float = 0.1
    max_eval_blocks: int | None = 128
    text: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: must be in (0, 1)")
        text = self.text if self.text is not None else stdlib_text()
        self.tokenizer = CharTokenizer.from_text(text)
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        split = int(len(ids) * (1 - self.eval_fraction))
        self.train_dataset = BlockDataset(ids[:split], self.block_size)
        self.eval_dataset = BlockDataset(ids[split:], self.block_size, self.max_eval_blocks)


# Small functions so a YAML config can reach the corpus' parts with `!singleton:trainer.data:...`.
def corpus_train_dataset(corpus: CharCorpus) -> BlockDataset:
    return corpus.train_dataset


def corpus_eval_dataset(corpus: CharCorpus) -> BlockDataset:
    return corpus.eval_dataset


def corpus_tokenizer(corpus: CharCorpus) -> CharTokenizer:
    return corpus.tokenizer


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle that depends only on (seed, epoch), and can start part-way through an epoch.

    Resuming from a checkpoint sets the epoch and the number of examples already seen, so the resumed run
    sees exactly the batches the uninterrupted run would have, without loading the skipped ones.

    With several ranks, every rank draws the same order and takes every `world_size`-th example of what is
    left after `start` (examples seen by all ranks together), cut so that every rank gets as many: a run
    resumed at another world size continues the same epoch order where the old one stopped.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return max(self.length - self.start, 0) // self.world_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.arange(self.length)
        mine = order[self.start:][self.rank::self.world_size][:len(self)]
        return iter(mine.tolist())
