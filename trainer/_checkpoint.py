"""Checkpoint files: `output_dir/checkpoint-{global_step}/` exactly as transformers 5.x lays them out, so
each trainer resumes from the other's checkpoints.

The model (`save_pretrained` for a transformers model, else `model.safetensors`), `training_args.bin`,
`optimizer.pt`, `scheduler.pt`, `rng_state.pth` (transformers' format: python / numpy / cpu / cuda
states), `trainer_state.json`. Ours besides, which transformers ignores: `data_position.json` (resume at
another world size), `training_args.json` (the args, readable without unpickling), `fg_run.json` (the
run marker: the lineage of runs the checkpoint belongs to, see below) and `checksums.json`.

Every file we read back loads with `weights_only=True` (the RNG file with transformers' allowlist of
numpy classes, nothing more). `checksums.json` holds the sha256 of every other file, written when the
checkpoint is complete and checked before a resume: a torch file with flipped bytes in its tensor data
still loads (as NaN weights), so only a checksum catches it. Every load error is a CheckpointError
naming the file.

Lineages. A fresh train() starts a lineage (its id: the bus's run id when there is one, else a new id); a
train() resumed from one of our checkpoints carries on that checkpoint's lineage. `fg_run.json` records it
(a file of its own: transformers' TrainerState.load_from_json refuses unknown keys in trainer_state.json).
Rotation (`save_total_limit`) and the end-of-training clean-up only delete checkpoints of the lineage being
trained; checkpoints of other runs, and those without a marker (transformers', or ours before markers),
are never deleted. In a directory only this lineage wrote, that is transformers' rule exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
TRAINING_ARGS_NAME = "training_args.bin"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_STATE_NAME = "rng_state.pth"
DATA_POSITION_NAME = "data_position.json"  # ours: lets a run resume at another world size
TRAINING_ARGS_JSON_NAME = "training_args.json"  # ours: the args as JSON
CHECKSUMS_NAME = "checksums.json"  # ours: sha256 of every other file of the checkpoint
RUN_MARKER_NAME = "fg_run.json"  # ours: which run (lineage) wrote the checkpoint, and when
OUR_EXTRA_FILES = frozenset({DATA_POSITION_NAME, TRAINING_ARGS_JSON_NAME, CHECKSUMS_NAME, RUN_MARKER_NAME})
RUN_MARKER_FORMAT = "fg-run/1"
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


def _is_transformers_model(model) -> bool:
    """A `transformers.PreTrainedModel` (or peft's `PeftModel`): saved with its own `save_pretrained`, as
    transformers' Trainer does. Checked through sys.modules: a model of either class means its library is
    already imported, and nothing else should import transformers."""
    for module, name in (("transformers.modeling_utils", "PreTrainedModel"), ("peft", "PeftModel")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(model, cls):
            return True
    return False


def save_model_weights(model: torch.nn.Module, directory: str | os.PathLike, processing_class=None,
                       data_collator=None) -> None:
    """The model files of transformers' `Trainer._save`: `save_pretrained` for a transformers model, else
    `model.safetensors` (any other module, whatever methods it has), then the processing class (or the
    data collator's tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_transformers_model(model):
        model.save_pretrained(directory)
    else:
        _save_state_dict(model.state_dict(), directory / SAFE_WEIGHTS_NAME)
    tokenizer = processing_class if processing_class is not None else getattr(data_collator, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)


def _save_state_dict(state: dict, path: Path) -> None:
    """Every key of the state dict, with safetensors. transformers' own `save_file` call refuses tensors
    that share memory (tied weights of a module that is not a PreTrainedModel), and its loader fails on a
    file that lacks a key of such a module (`_issue_warnings_after_load` reads `_keys_to_ignore_on_save`).
    So a tensor whose storage was already stored under another name is stored again, as a copy: loading
    both names into the one tied parameter keeps the tie, in both trainers."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        if (storage in seen and tensor.numel()) or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(storage)
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_training_args(args, directory: Path) -> None:
    """`training_args.bin` (a pickle of the args object, as transformers writes it: transformers never reads
    it back) and our `training_args.json`, which can be read without unpickling anything."""
    torch.save(args, directory / TRAINING_ARGS_NAME)
    (directory / TRAINING_ARGS_JSON_NAME).write_text(args.to_json_string(), encoding="utf-8")


def _read_weights(path: Path) -> dict:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError
            raise _damaged(path, f"cannot be read ({type(e).__name__}: {e})") from None
    else:
        state = torch_load(path, map_location="cpu")
    if not isinstance(state, dict):
        raise _damaged(path, f"holds a {type(state).__name__}, not a state dict of weights")
    return state


def _weight_files(directory: Path) -> tuple[Path, list[Path]] | None:
    """(the file that names them, the weight files) in transformers' order of preference:
    model.safetensors, pytorch_model.bin, then the sharded index of either."""
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name, [directory / name]
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = directory / name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise _damaged(index, "has no weight_map object")
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) and f and Path(f).name == f for f in files):
                raise _damaged(index, "names a shard outside the checkpoint directory")
            return index, [directory / f for f in files]
    return None


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load the weights of a checkpoint written by us or by transformers (either file, or shards)."""
    directory = Path(directory)
    found = _weight_files(directory)
    if found is None:
        raise CheckpointError(f"checkpoint {directory}: no model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} "
                              "or a sharded index) in it")
    named, files = found
    state = {}
    for path in files:
        state.update(_read_weights(path))
    # save_pretrained stores tied weights once; strict=False would hide real mismatches, so check them here.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise _damaged(named, f"does not match the model: {e}") from None
    missing = [m for m in missing if not _shares_storage_with_a_loaded_key(model, m, state)]
    if missing or unexpected:
        raise _damaged(named, f"does not match the model: missing {missing}, unexpected {unexpected}")


def _shares_storage_with_a_loaded_key(model: torch.nn.Module, name: str, loaded: dict) -> bool:
    tensors = model.state_dict(keep_vars=True)
    target = tensors[name]
    return any(other in loaded and t.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
               for other, t in tensors.items() if other != name)


# -- RNG state: transformers' rng_state.pth ----------------------------------------------------------------
#
# {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
#  "cuda": torch.cuda.get_rng_state() (one process) / get_rng_state_all() (distributed)}, written by
# torch.save; transformers loads it with weights_only=True and a short allowlist of numpy classes (the
# numpy state holds an ndarray). We read it the same way: nothing else can be unpickled.

def _numpy_safe_globals():
    np_core = getattr(np, "_core", None) or np.core
    return torch.serialization.safe_globals(
        [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))])


def rng_state(distributed: bool = False) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return state


def set_rng_state(state: dict, distributed: bool = False) -> None:
    """Restore a state from `rng_state()`, transformers' file, or our format before 0.x (lists and tensors)."""
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, list):  # our earlier format: [version, list of ints, gauss]
        python = (python[0], tuple(python[1]), python[2])
    random.setstate(python)
    if isinstance(numpy_state, list):  # our earlier format: the key array as an int64 tensor
        name, keys, pos, has_gauss, gauss = numpy_state
        numpy_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(numpy_state)
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = state.get("cuda")
        try:
            if isinstance(cuda, (list, tuple)):
                torch.cuda.random.set_rng_state_all(cuda)
            else:
                torch.cuda.random.set_rng_state(cuda)
        except Exception as e:  # a missing key, a different number of GPUs: transformers logs and goes on
            logger.error("could not restore the CUDA RNG state (%s: %s); results after the resume will differ "
                         "from an uninterrupted run", type(e).__name__, e)


def rng_file(rank: int = 0, world_size: int = 1) -> str:
    """transformers' names: `rng_state.pth` for one process, `rng_state_<rank>.pth` for each of several."""
    return RNG_STATE_NAME if world_size <= 1 else f"rng_state_{rank}.pth"


def save_training_state(directory: Path, optimizer, lr_scheduler) -> None:
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_NAME)
    torch.save(lr_scheduler.state_dict(), directory / SCHEDULER_NAME)


def save_rng_state(directory: Path, rank: int = 0, world_size: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)  # a rank may get here before rank 0 made it
    torch.save(rng_state(world_size > 1), directory / rng_file(rank, world_size))


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
        with _numpy_safe_globals():
            state = torch_load(path)
        try:
            set_rng_state(state, world_size > 1)
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


# -- the run marker: fg_run.json --------------------------------------------------------------------------

def new_lineage(run_id: str | None = None) -> str:
    """A lineage id: the run id of the run that starts it when there is one, else a fresh `run-TIME-HEX`."""
    return run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def write_run_marker(directory: Path, lineage: str, run_id: str | None, global_step: int,
                     max_steps: int | None) -> None:
    """`fg_run.json`: the checkpoint's lineage, the run that saved it (the bus's run id, if any), its step
    and the run's max_steps, and when it was saved (seconds since the epoch, and ISO 8601 UTC)."""
    now = time.time()
    marker = {"format": RUN_MARKER_FORMAT, "lineage": lineage, "run": run_id, "global_step": global_step,
              "max_steps": max_steps, "saved_at": now,
              "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
    (Path(directory) / RUN_MARKER_NAME).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def read_run_marker(directory: str | os.PathLike) -> dict | None:
    """The checkpoint's run marker, or None: no marker (transformers', or saved before markers), or one
    that is not ours or cannot be read (such a checkpoint belongs to no lineage: never rotated away)."""
    path = Path(directory) / RUN_MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        logger.warning("%s cannot be read (%s): the checkpoint counts as another run's", path, e)
        return None
    if not (isinstance(marker, dict) and marker.get("format") == RUN_MARKER_FORMAT
            and isinstance(marker.get("lineage"), str) and marker["lineage"]):
        logger.info("%s is not a run marker of this version: the checkpoint counts as another run's", path)
        return None
    return marker


def checkpoint_lineage(directory: str | os.PathLike) -> str | None:
    marker = read_run_marker(directory)
    return marker["lineage"] if marker is not None else None


# -- finding, rotating -----------------------------------------------------------------------------------

def sorted_checkpoints(output_dir: str | os.PathLike, use_mtime: bool = False,
                       best_model_checkpoint: str | None = None, lineage: str | None = None) -> list[Path]:
    """`checkpoint-<step>` directories of `output_dir`, oldest first, as transformers' `sort_checkpoints`:
    by step, or by modification time with `use_mtime` (by step after all when the newest and oldest are
    less than 1 s apart: mtime is not trusted then). With `best_model_checkpoint`, that one is moved just
    before the newest (the rotation window never reaches it, and the newest stays last for a resume).
    With `lineage`, only the checkpoints whose run marker names that lineage."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (lineage is None or checkpoint_lineage(path) == lineage):
            found.append((path.stat().st_mtime if use_mtime else int(match.group(1)), path))
    found.sort()
    if use_mtime and len(found) > 1 and found[-1][0] - found[0][0] < 1.0:
        return sorted_checkpoints(output_dir, False, best_model_checkpoint, lineage)
    checkpoints = [path for _, path in found]
    # Paths compare as transformers compares their strings (both normalised by Path): a best checkpoint
    # spelled differently from output_dir (relative vs absolute) is not recognised there, nor here.
    best = Path(best_model_checkpoint) if best_model_checkpoint is not None else None
    if best is not None and best in checkpoints and checkpoints[-1] != best:
        newest = checkpoints[-1]
        checkpoints = [c for c in checkpoints if c not in (best, newest)] + [best, newest]
    return checkpoints


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """transformers' `get_last_checkpoint`: the highest step."""
    checkpoints = sorted_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None,
                       best_model_checkpoint: str | None, use_mtime: bool = False,
                       lineage: str | None = None) -> list[Path]:
    """transformers' `rotate_checkpoints`: beyond `save_total_limit`, delete the oldest checkpoints except
    the newest and the best (so with a limit of 1 two can stay). With `lineage`, among that lineage's
    checkpoints only: the others are neither counted nor deleted. Returns what was deleted."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = sorted_checkpoints(output_dir, use_mtime, lineage=lineage)
    if len(checkpoints) <= save_total_limit:
        return []
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(Path(best_model_checkpoint))
    keep = max(save_total_limit, len(protected))
    deleted = []
    for path in checkpoints:
        if len(checkpoints) - len(deleted) <= keep:
            break
        if path not in protected:
            logger.info("deleting older checkpoint %s (save_total_limit=%d)", path, save_total_limit)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def delete_all_but_best(output_dir: str | os.PathLike, best_model_checkpoint: str,
                        lineage: str | None = None) -> list[Path]:
    """End of training with save_total_limit=1 and a best checkpoint (transformers' `_finalize_training`):
    every other checkpoint goes (of `lineage` only, when given), the newest included. Returns what was
    deleted."""
    best = Path(best_model_checkpoint)
    if not best.is_dir():  # transformers raises here (samefile); deleting every checkpoint would be worse
        logger.warning("best checkpoint %s is gone: no checkpoint deleted at the end of training", best)
        return []
    deleted = []
    for path in sorted_checkpoints(output_dir, best_model_checkpoint=best_model_checkpoint, lineage=lineage):
        if not os.path.samefile(path, best):
            logger.info("deleting older checkpoint %s (save_total_limit=1, best is %s)", path, best)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
