"""Data for the built-in default: the standard library's own documentation as a character corpus,
a character tokenizer, fixed-length blocks for next-character prediction, and the default collator.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def default_data_collator(features: Sequence[Mapping]) -> dict:
    """Stack a list of dicts of tensors / numbers / lists into a dict of batched tensors."""
    if not features:
        raise ValueError("default_data_collator got an empty batch")
    first = features[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            f"default_data_collator expects each example to be a dict of tensors or numbers, got {type(first).__name__}; "
            "pass data_collator= to the Trainer for other shapes"
        )
    batch = {}
    for key, value in first.items():
        values = [f[key] for f in features]
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(value, (bool, int, float, list, tuple)):
            batch[key] = torch.tensor(values)
        elif value is None or isinstance(value, str):
            batch[key] = values
        else:
            raise TypeError(f"default_data_collator cannot batch field {key!r} of type {type(value).__name__}")
    return batch


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
