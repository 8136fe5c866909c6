"""A small character-level GPT: the model `fg-train` trains when given no configuration.

Pre-norm transformer blocks with causal self-attention (`scaled_dot_product_attention`), learned
positions, tied input/output embeddings. `forward(input_ids, labels=None)` returns an object with `.loss`
and `.logits`, like a transformers causal LM, and `generate()` samples with temperature / top-k / top-p.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class CharGPTConfig:
    vocab_size: int = 128
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"CharGPTConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"CharGPTConfig.n_embd={self.n_embd}: must be a multiple of n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"CharGPTConfig.dropout={self.dropout}: must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor

    def __getitem__(self, key: str):
        return getattr(self, key)


class _Block(nn.Module):
    def __init__(self, cfg: CharGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """`CharGPT(CharGPTConfig(...))` or `CharGPT(vocab_size=..., n_layer=...)`."""

    def __init__(self, config: CharGPTConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(config, dict):
            config = CharGPTConfig(**config)
        self.config = config if config is not None else CharGPTConfig(**kwargs)
        cfg = self.config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, num_items_in_batch=None,
                **_) -> CausalLMOutput:
        """`num_items_in_batch` (the label count of the whole accumulated batch, passed by the Trainer as
        transformers passes it to models that take `**kwargs`) makes the loss a sum over it, so gradient
        accumulation over padded micro-batches averages over tokens, not over micro-batches."""
        t = input_ids.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if labels is not None:
            flat = (logits.view(-1, logits.size(-1)), labels.reshape(-1))
            if num_items_in_batch is None:
                loss = F.cross_entropy(*flat, ignore_index=-100)
            else:
                loss = F.cross_entropy(*flat, ignore_index=-100, reduction="sum") / num_items_in_batch
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 50, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend `input_ids` (batch, time) by `max_new_tokens` tokens; greedy when `do_sample` is False."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.block_size:]).logits[:, -1, :]
            if not do_sample:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / max(temperature, 1e-6)
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if top_p is not None and top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    cumulative = sorted_logits.softmax(-1).cumsum(-1)
                    drop = cumulative - sorted_logits.softmax(-1) > top_p
                    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                    logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        return ids

    def save_pretrained(self, directory: str | Path) -> None:
        """`config.json` and `model.safetensors`, so `CharGPT.from_pretrained(directory)` rebuilds the model.
        (Checkpoints hold `model.safetensors` only, as transformers saves a model that is not its own;
        `from_pretrained(checkpoint, config=...)` loads one.)"""
        from ._checkpoint import SAFE_WEIGHTS_NAME, _save_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(
            json.dumps({"model_type": "char_gpt", "factory": "trainer.chargpt:CharGPT", **self.config.to_dict()},
                       indent=2), encoding="utf-8")
        _save_state_dict(self.state_dict(), directory / SAFE_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: CharGPTConfig | dict | None = None) -> "CharGPT":
        """The model saved in `directory` (by save_pretrained, or a checkpoint given its `config`)."""
        from ._checkpoint import load_model_weights

        directory = Path(directory)
        if config is None:
            path = directory / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: a checkpoint holds only the weights; pass "
                                        "config= (the CharGPTConfig the run was trained with)")
            data = json.loads(path.read_text(encoding="utf-8"))
            fields = {f.name for f in dataclasses.fields(CharGPTConfig)}
            config = CharGPTConfig(**{k: v for k, v in data.items() if k in fields})
        model = cls(config)
        load_model_weights(model, directory)
        return model


def char_gpt_for(tokenizer, **config) -> CharGPT:
    """A `CharGPT` sized to `tokenizer`'s vocabulary (the YAML-friendly factory)."""
    return CharGPT(CharGPTConfig(vocab_size=tokenizer.vocab_size, **config))
