"""Saving: checkpoints (written whole or not at all), `save_model`, and the best-model bookkeeping.

A mixin of `Trainer`; the files themselves are laid out by `_checkpoint`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import _checkpoint as ckpt
from . import distributed
from .state import TrainerState
from .training_args import SaveStrategy


class CheckpointMixin:
    def _save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint under a temporary name, every rank adds its RNG state, and rank 0
        renames it when complete: a crash mid-save never leaves a half-written checkpoint for
        `resume_from_checkpoint=True` to pick up."""
        args = self.args
        folder = Path(args.output_dir, f"{ckpt.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        tmp = folder.with_name(folder.name + ".tmp")
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and \
                self.state.best_global_step:
            best = Path(args.output_dir, f"{ckpt.PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if best.exists() or best == folder:
                self.state.best_model_checkpoint = str(best)
        if args.should_save:
            self._write_checkpoint(tmp)
        distributed.barrier()
        if not args.save_only_model:
            ckpt.save_rng_state(tmp, args.process_index, args.world_size)
        distributed.barrier()
        if args.should_save:
            ckpt.write_checksums(tmp)  # every rank's files are in: the checkpoint is complete
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            ckpt.rotate_checkpoints(args.output_dir, args.save_total_limit, self.state.best_model_checkpoint)
        distributed.barrier()
        return folder

    def _write_checkpoint(self, tmp: Path) -> None:
        args = self.args
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.save_model_weights(self.model, tmp, self.processing_class)
        if not args.save_only_model:
            ckpt.save_training_state(tmp, self.optimizer, self.lr_scheduler)
            ckpt.save_data_position(tmp, *self._data_position, args.world_size)
        self.state.stateful_callbacks = TrainerState.export_callback_states(self._stateful_callbacks())
        self.state.save_to_json(str(tmp / ckpt.TRAINER_STATE_NAME))
        (tmp / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")

    def save_model(self, output_dir: str | None = None) -> Path:
        """Save the model (and the processing class) to `output_dir` (default: args.output_dir)."""
        directory = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            ckpt.save_model_weights(self.model, directory, self.processing_class)
            (directory / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")
        return directory

    def _determine_best_metric(self, metrics: dict[str, float]) -> bool:
        name = self.args.metric_for_best_model
        if name is None:
            return False
        if not name.startswith("eval_"):
            name = f"eval_{name}"
        if name not in metrics:
            raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: {name!r} is not among the "
                           f"evaluation metrics {sorted(metrics)}")
        value = metrics[name]
        better = (lambda a, b: a > b) if self.args.greater_is_better else (lambda a, b: a < b)
        if self.state.best_metric is None or better(value, self.state.best_metric):
            self.state.best_metric = value
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                self.state.best_global_step = self.state.global_step
            return True
        return False
