"""`fg-sink textgen`: samples from the model as it trains, without the training process waiting.

The trainer's `TextgenCallback` writes a weight snapshot every N steps and publishes a `snapshot` record.
This sink builds the model from the factory in the run's `meta` (import path and config), loads the
snapshot, generates from each prompt, and sends the samples back into the run's stream as `textgen`
records (over the run's inbox), so `tb`, `json` and `tail` show them. For a run that is over (nothing to
send them to) the samples are printed instead. The tokenizer is loaded from the copy saved beside the
snapshots (the snapshot record's `tokenizer`), else rebuilt from the run's meta.

A model or tokenizer that cannot be built (a class defined in the training script's `__main__`, a
tokenizer with neither a saved copy nor a name) is said once on stderr, and every snapshot is answered with
`textgen` records with `text: null` and the reason in `skipped`, so the trainer's wait for samples ends.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import orjson
import zmq

from fg_bus import security
from fg_bus.registry import RunInfo

from ._output import printable
from .base import Sink

logger = logging.getLogger(__name__)


def build_model(factory: str, config: dict | None):
    """`module:Class` and its config dict: a transformers model (`config_class`) or a model taking a config."""
    cls = _import(factory)
    config = dict(config or {})
    config_class = getattr(cls, "config_class", None)
    if config_class is not None and hasattr(config_class, "from_dict"):
        return cls(config_class.from_dict(config))
    return cls(config)


def _import(factory: str):
    module_name, _, class_name = factory.partition(":")
    obj = importlib.import_module(module_name)
    for attr in class_name.split("."):
        obj = getattr(obj, attr)
    return obj


def build_tokenizer(description: dict | None):
    """The tokenizer from a description: a saved copy (`path`, loaded with its factory's `from_pretrained`,
    else transformers' AutoTokenizer), else its factory's `from_dict(config)`, else a transformers tokenizer
    loaded from `name_or_path`."""
    if not description:
        raise ValueError("the run's meta has no tokenizer: textgen needs one to encode prompts")
    factory, config, saved = description.get("factory"), description.get("config"), description.get("path")
    cls = _import(factory) if factory else None
    if saved:
        if hasattr(cls, "from_pretrained"):
            return cls.from_pretrained(saved)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    if config is not None and hasattr(cls, "from_dict"):
        return cls.from_dict(config)
    path = description.get("name_or_path")
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    raise ValueError(f"cannot rebuild tokenizer {factory!r} from the run's meta (no saved copy, no from_dict, no "
                     "name_or_path): pass it to the trainer as processing_class, with TextgenCallback saving it")


class TextgenSink(Sink):
    kind = "textgen"

    def __init__(self, prompts: list[str] | None = None, device: str = "cpu", do_sample: bool = True,
                 temperature: float = 0.8, top_p: float | None = 0.95, top_k: int | None = None,
                 max_new_tokens: int = 60, seed: int = 0):
        self.prompts = list(prompts or ["The "])
        self.device = device
        self.generation = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                           "max_new_tokens": max_new_tokens}
        self.seed = seed
        self.meta: dict[str, Any] | None = None
        self.model = None
        self.tokenizer = None
        self.samples = 0
        self.unusable: str | None = None  # why this run's model or tokenizer cannot be built
        self._ctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None

    def open_run(self, info: RunInfo) -> int | None:
        self._close_push()
        self.model = self.meta = self.tokenizer = self.unusable = None
        if info.is_live:
            self._ctx = zmq.Context()
            self._push = self._ctx.socket(zmq.PUSH)
            self._push.linger = 2000
            server_key = info.data.get("curve_server_key")
            if server_key:
                security.make_client(self._push, server_key.encode())
            self._push.connect(info.ranks["0"]["inbox"])
        return None

    def handle(self, record: dict) -> None:
        if record["event"] == "on_train_begin":
            self.meta = record.get("meta") or {}
        elif record["event"] == "snapshot":
            self._generate(record)

    def _generate(self, record: dict) -> None:
        import torch

        if self.meta is None:
            raise ValueError("a snapshot before on_train_begin: start this sink --from start")
        if self.model is None and self.unusable is None:
            self._build(record)
        if self.unusable is not None:
            self._skip(record, self.unusable)
            return
        try:
            state = torch.load(record["path"], map_location=self.device, weights_only=True)
        except FileNotFoundError:
            # Rotated away before this sink got to it (it fell behind): say so in the stream, one record per
            # prompt, so nothing waits for samples that will not come.
            logger.warning("snapshot %s is gone (rotated away): skipped", record["path"])
            self._skip(record, "the snapshot was rotated away before generation")
            return
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes: every snapshot will fail alike
            self._give_up(f"the snapshot's weights do not fit the model built from the run's meta: {e}")
            self._skip(record, self.unusable)
            return
        generator = torch.Generator(device=self.device).manual_seed(self.seed + record["global_step"])
        for index, prompt in enumerate(self.prompts):
            ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
            with torch.no_grad():
                out = self._sample(ids, generator)
            text = self.tokenizer.decode(out[0, ids.shape[1]:].tolist())
            self._send({"op": "record", "event": "textgen", "global_step": record["global_step"],
                        "epoch": record.get("epoch"), "prompt": prompt, "prompt_index": index, "text": text,
                        "snapshot": record["path"]})
            self.samples += 1

    def _build(self, record: dict) -> None:
        """The model (from the meta's factory and config) and the tokenizer (the copy saved beside the
        snapshots, else the meta's description). Either is user code, imported by name: whatever it raises
        means no samples for this run, and the reason is reported (once) rather than the sink dying."""
        model_meta = self.meta.get("model") or {}
        factory = model_meta.get("factory")
        try:
            if not factory:
                raise ValueError("the run's meta names no model factory")
            self.model = build_model(factory, model_meta.get("config")).to(self.device).eval()
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.model = None
            self._give_up(f"cannot build the model {factory!r} from the run's meta: {type(e).__name__}: {e}")
            return
        description = record.get("tokenizer") or self.meta.get("tokenizer")
        try:
            self.tokenizer = build_tokenizer(description)
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.model = None
            where = "saved with the snapshots" if record.get("tokenizer") else "described in the run's meta"
            self._give_up(f"cannot build the tokenizer {where}: {type(e).__name__}: {e}")

    def _give_up(self, reason: str) -> None:
        self.unusable = reason if len(reason) <= 1000 else reason[:1000] + "..."  # a state-dict error lists every key
        logger.error("textgen: %s; no samples for this run (each snapshot is answered with a skipped sample)",
                     printable(reason))

    def _skip(self, record: dict, reason: str) -> None:
        """One `textgen` record per prompt with no text and the reason: nothing waits for these samples."""
        for index, prompt in enumerate(self.prompts):
            self._send({"op": "record", "event": "textgen", "global_step": record["global_step"],
                        "epoch": record.get("epoch"), "prompt": prompt, "prompt_index": index, "text": None,
                        "skipped": reason, "snapshot": record["path"]})

    def _sample(self, ids, generator):
        options = {k: v for k, v in self.generation.items() if v is not None}
        try:
            return self.model.generate(ids, generator=generator, **options)
        except (TypeError, ValueError):  # transformers' generate refuses `generator`: it follows torch's seed
            import torch

            torch.manual_seed(int(generator.initial_seed()))
            return self.model.generate(ids, pad_token_id=getattr(self.tokenizer, "eos_token_id", None), **options)

    def _send(self, message: dict) -> None:
        if self._push is None:
            shown = repr(message["text"]) if message["text"] is not None else f"skipped ({message.get('skipped')})"
            print(printable(f"[step {message['global_step']}] {message['prompt']!r} -> {shown}"), file=sys.stdout,
                  flush=True)
            return
        self._push.send(orjson.dumps(message))

    def _close_push(self) -> None:
        if self._push is not None:
            self._push.close()
            self._ctx.term()
            self._push = self._ctx = None

    def end_run(self, status: str) -> None:
        self._close_push()

    def close(self) -> None:
        self._close_push()
