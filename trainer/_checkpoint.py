"""Checkpoint files: `output_dir/checkpoint-{global_step}/` as transformers lays them out.

model weights (`save_pretrained` when the model has it, else `pytorch_model.bin`), `optimizer.pt`,
`scheduler.pt`, `rng_state.pth`, `trainer_state.json`. Everything loads with `weights_only=True`:
RNG states are stored as tensors and lists, never pickled objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "pytorch_model.bin"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_STATE_NAME = "rng_state.pth"
DATA_POSITION_NAME = "data_position.json"  # ours: lets a run resume at another world size
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def save_model_weights(model: torch.nn.Module, directory: str | os.PathLike, processing_class=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        torch.save(model.state_dict(), directory / WEIGHTS_NAME)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(directory)


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    for name in (WEIGHTS_NAME, "model.safetensors"):
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # Tied weights may be stored once; strict=False would hide real mismatches, so check them here.
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        return
    raise FileNotFoundError(f"no model weights ({WEIGHTS_NAME} or model.safetensors) in {directory}")


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            logger.warning("could not restore the CUDA RNG state (a different number of GPUs?); results may differ")


def rng_file(rank: int = 0, world_size: int = 1) -> str:
    """transformers' names: `rng_state.pth` for one process, `rng_state_<rank>.pth` for each of several."""
    return RNG_STATE_NAME if world_size <= 1 else f"rng_state_{rank}.pth"


def save_training_state(directory: Path, optimizer, lr_scheduler) -> None:
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_NAME)
    torch.save(lr_scheduler.state_dict(), directory / SCHEDULER_NAME)


def save_rng_state(directory: Path, rank: int = 0, world_size: int = 1) -> None:
    torch.save(rng_state(), directory / rng_file(rank, world_size))


def load_training_state(directory: Path, optimizer, lr_scheduler) -> None:
    if (directory / OPTIMIZER_NAME).exists():
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
    if (directory / SCHEDULER_NAME).exists():
        lr_scheduler.load_state_dict(torch.load(directory / SCHEDULER_NAME, weights_only=True))


def load_rng_state(directory: Path, rank: int = 0, world_size: int = 1) -> None:
    path = directory / rng_file(rank, world_size)
    if path.exists():
        set_rng_state(torch.load(path, weights_only=True))
    else:
        logger.warning("%s has no %s (saved at another world size?): random numbers after the resume will "
                       "differ from the original run", directory, path.name)


def save_data_position(directory: Path, epoch: int, samples_seen: int, world_size: int) -> None:
    """Where the data order stood: the epoch, and examples of it seen by all ranks together."""
    (directory / DATA_POSITION_NAME).write_text(json.dumps(
        {"epoch": epoch, "samples_seen_in_epoch": samples_seen, "world_size": world_size}), encoding="utf-8")


def load_data_position(directory: Path) -> dict | None:
    path = directory / DATA_POSITION_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def sorted_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = sorted_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None,
                       best_model_checkpoint: str | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `save_total_limit`, never the best one. Returns what was deleted."""
    if not save_total_limit:
        return []
    checkpoints = sorted_checkpoints(output_dir)
    best = Path(best_model_checkpoint).resolve() if best_model_checkpoint else None
    limit = save_total_limit
    if best is not None and any(c.resolve() == best for c in checkpoints) and checkpoints[-1].resolve() != best:
        # Keep the best checkpoint by moving it just before the newest, out of the deletion window; the
        # newest must survive too, so a resume continues from where training stopped.
        best_path = next(c for c in checkpoints if c.resolve() == best)
        checkpoints.remove(best_path)
        checkpoints.insert(len(checkpoints) - 1, best_path)
        limit = max(limit, 2)
    deleted = checkpoints[:max(0, len(checkpoints) - limit)]
    for path in deleted:
        logger.info("deleting older checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return deleted
