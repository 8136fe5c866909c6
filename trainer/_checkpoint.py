"""Checkpoint files: `output_dir/checkpoint-{global_step}/` as transformers lays them out.

model weights (`save_pretrained` when the model has it, else `pytorch_model.bin`), `optimizer.pt`,
`scheduler.pt`, `rng_state.pth`, `trainer_state.json`. Everything loads with `weights_only=True`:
RNG states are stored as tensors and lists, never pickled objects.

`checksums.json` (ours) holds the sha256 of every other file, written when the checkpoint is complete and
checked before a resume: a torch file with flipped bytes in its tensor data still loads (as NaN weights),
so only a checksum catches it. Every load error is a CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
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
CHECKSUMS_NAME = "checksums.json"  # ours: sha256 of every other file of the checkpoint
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or of the wrong shape; the message names the file."""


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path}: {what}; resume from another checkpoint (or delete this one)")


def torch_load(path: Path, **kwargs):
    """torch.load with weights_only=True, its failures (truncated, not a torch file, ...) naming the file."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors, ...
        raise _damaged(path, f"cannot be read ({type(e).__name__}: {e})") from None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(directory: Path) -> None:
    """sha256 of every file in the (complete) checkpoint, into checksums.json."""
    files = {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS_NAME}
    (directory / CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1),
                                            encoding="utf-8")


def verify_checksums(directory: Path) -> bool:
    """Check every file against checksums.json; CheckpointError naming the first that differs or is missing.
    False (with a warning) for a checkpoint without the manifest (written before it existed)."""
    directory = Path(directory)
    manifest_path = directory / CHECKSUMS_NAME
    if not manifest_path.exists():
        logger.warning("%s has no %s (saved by an older version or by transformers): its files cannot be "
                       "checked for damage", directory, CHECKSUMS_NAME)
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown layout")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise _damaged(manifest_path, f"not a checksum manifest ({type(e).__name__}: {e})") from None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise _damaged(path, f"missing (listed in {CHECKSUMS_NAME})")
        if _sha256(path) != digest:
            raise _damaged(path, "damaged: its sha256 differs from the one recorded when it was saved")
    return True


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

            try:
                state = load_file(str(path), device="cpu")
            except Exception as e:  # SafetensorError, OSError
                raise _damaged(path, f"cannot be read ({type(e).__name__}: {e})") from None
        else:
            state = torch_load(path, map_location="cpu")
        if not isinstance(state, dict):
            raise _damaged(path, f"holds a {type(state).__name__}, not a state dict of weights")
        # Tied weights may be stored once; strict=False would hide real mismatches, so check them here.
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape mismatch
            raise _damaged(path, f"does not match the model: {e}") from None
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise _damaged(path, f"does not match the model: missing {missing}, unexpected {unexpected}")
        return
    raise CheckpointError(f"checkpoint {directory}: no model weights ({WEIGHTS_NAME} or model.safetensors) in it")


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
    for name, target, kwargs in ((OPTIMIZER_NAME, optimizer, {"map_location": "cpu"}), (SCHEDULER_NAME, lr_scheduler, {})):
        path = directory / name
        if not path.exists():
            continue
        try:
            target.load_state_dict(torch_load(path, **kwargs))
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise _damaged(path, f"does not fit this run's {type(target).__name__} ({type(e).__name__}: {e})") from None


def load_rng_state(directory: Path, rank: int = 0, world_size: int = 1) -> None:
    path = directory / rng_file(rank, world_size)
    if path.exists():
        state = torch_load(path)
        try:
            set_rng_state(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise _damaged(path, f"is not an RNG state ({type(e).__name__}: {e})") from None
    else:
        logger.warning("%s has no %s (saved at another world size?): random numbers after the resume will "
                       "differ from the original run", directory, path.name)


def save_data_position(directory: Path, epoch: int, samples_seen: int, world_size: int) -> None:
    """Where the data order stood: the epoch, and examples of it seen by all ranks together."""
    (directory / DATA_POSITION_NAME).write_text(json.dumps(
        {"epoch": epoch, "samples_seen_in_epoch": samples_seen, "world_size": world_size}), encoding="utf-8")


def load_data_position(directory: Path) -> dict | None:
    """The saved data position, checked (epoch and examples seen >= 0, world_size >= 1, all integers)."""
    path = directory / DATA_POSITION_NAME
    if not path.exists():
        return None
    data = read_json(path)
    minimum = {"epoch": 0, "samples_seen_in_epoch": 0, "world_size": 1}
    if not isinstance(data, dict):
        raise _damaged(path, f"holds a {type(data).__name__}, expected an object with {', '.join(minimum)}")
    for key, least in minimum.items():
        value = data.get(key)
        if type(value) is not int or value < least:  # type(): True is an int to isinstance
            raise _damaged(path, f"{key} is {value!r}, expected an integer >= {least}")
    return data


def load_trainer_state(directory: Path, state_class):
    """The checkpoint's trainer_state.json as a `state_class` (TrainerState), its failures naming the file."""
    path = Path(directory) / TRAINER_STATE_NAME
    data = read_json(path)
    if not isinstance(data, dict):
        raise _damaged(path, f"holds a {type(data).__name__}, expected an object")
    step = data.get("global_step", 0)
    if type(step) is not int or step < 0:
        raise _damaged(path, f"global_step is {step!r}, expected an integer >= 0")
    if not isinstance(data.get("log_history", []), list):
        raise _damaged(path, "log_history is not a list")
    try:
        return state_class.load_from_json(str(path))
    except (TypeError, ValueError) as e:
        raise _damaged(path, f"does not describe a trainer state ({type(e).__name__}: {e})") from None


def read_json(path: Path):
    """A checkpoint's JSON file, its failures naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise _damaged(path, f"is not valid JSON ({e})") from None


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
