"""Saving: checkpoints (written whole or not at all), `save_model`, and the best-model bookkeeping, with
transformers 5.x's rules for which checkpoint is the best and which ones rotation keeps.

A mixin of `Trainer`; the files themselves are laid out by `_checkpoint`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from . import _checkpoint as ckpt
from . import distributed
from .state import TrainerState
from .training_args import SaveStrategy

logger = logging.getLogger(__name__)

_SAVING_STRATEGIES = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)


class CheckpointMixin:
    def _get_output_dir(self, trial=None) -> str:
        """Where checkpoints go (transformers' name; it is read by its JITCheckpointCallback)."""
        return self.args.output_dir

    def _save_checkpoint(self, model=None, trial=None) -> Path:
        """Write `checkpoint-{global_step}`, then rotate. transformers' signature, so its callbacks can call
        it (JITCheckpointCallback does); `model` and `trial` are not used.

        Rank 0 writes the checkpoint under a temporary name, every rank adds its RNG state, and rank 0
        renames it when complete: a crash mid-save never leaves a half-written checkpoint for
        `resume_from_checkpoint=True` to pick up."""
        args = self.args
        run_dir = self._get_output_dir(trial)
        folder = Path(run_dir, f"{ckpt.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        tmp = folder.with_name(folder.name + ".tmp")
        self.store_flos()  # total_flos in the saved state, as transformers (JITCheckpointCallback calls us directly)
        if args.save_strategy in _SAVING_STRATEGIES and self.state.best_global_step:
            # transformers looks for the best checkpoint once this one is written; this one is complete
            # only after the rename below, so it counts as existing here.
            best = os.path.join(run_dir, f"{ckpt.PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best) or Path(best) == folder:
                self.state.best_model_checkpoint = best
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
            # transformers asks for the order by modification time here (by step when mtimes are < 1 s apart);
            # among this lineage's checkpoints only: another run's in the same directory are never deleted.
            ckpt.rotate_checkpoints(run_dir, args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True,
                                    lineage=self.checkpoint_lineage)
        distributed.barrier()
        return folder

    def _write_checkpoint(self, tmp: Path) -> None:
        args = self.args
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_model_files(tmp)
        if not args.save_only_model:
            ckpt.save_training_state(tmp, self.optimizer, self.lr_scheduler)
            ckpt.save_data_position(tmp, *self._data_position, args.world_size)
        self.state.stateful_callbacks = TrainerState.export_callback_states(self._stateful_callbacks())
        self.state.save_to_json(str(tmp / ckpt.TRAINER_STATE_NAME))
        ckpt.write_run_marker(tmp, self.checkpoint_lineage, self._bus_run_id(), self.state.global_step,
                              self.state.max_steps)

    # -- lineages (see _checkpoint): which checkpoints of output_dir are this run's -------------------------

    @property
    def checkpoint_lineage(self) -> str:
        """The lineage this Trainer's checkpoints are marked with: the resumed checkpoint's, else its own
        (one per Trainer, made at its first fresh train() or save)."""
        if getattr(self, "_lineage", None) is None:
            self._continue_lineage(None)
        return self._lineage

    def _continue_lineage(self, checkpoint: Path | None) -> None:
        """At train(): carry on the lineage of `checkpoint` (one of ours), else this Trainer's own."""
        lineage = ckpt.checkpoint_lineage(checkpoint) if checkpoint is not None else None
        if lineage is None:
            if getattr(self, "_own_lineage", None) is None:
                self._own_lineage = ckpt.new_lineage(self._bus_run_id())
            lineage = self._own_lineage
        self._lineage = lineage

    def _bus_run_id(self) -> str | None:
        run_id = getattr(getattr(self, "event_bus", None), "run_id", None)
        return run_id if isinstance(run_id, str) else None

    def _save_model_files(self, directory: Path) -> None:
        """What transformers' `Trainer._save` writes: the model, the tokenizer, `training_args.bin`."""
        ckpt.save_model_weights(self.model, directory, self.processing_class, getattr(self, "data_collator", None))
        ckpt.save_training_args(self.args, directory)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> Path:
        """Save the model (and the processing class) to `output_dir` (default: args.output_dir)."""
        directory = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            self._save_model_files(directory)
        return directory

    def _determine_best_metric(self, metrics: dict[str, float], trial=None) -> bool:
        """True when `metrics` hold a new best `metric_for_best_model` (named with or without `eval_`).

        transformers' rule, kept exactly: the first comparison is against -inf/+inf, which is stored as
        best_metric even if it loses, and the comparison is numpy's, false for NaN. So a NaN metric never
        becomes the best, and an evaluation that gives NaN first leaves best_metric at +inf (-inf with
        greater_is_better) and best_global_step unset; EarlyStoppingCallback sees that value too."""
        name = self.args.metric_for_best_model
        if name is None:
            return False
        if not name.startswith("eval_"):
            name = f"eval_{name}"
        if name not in metrics:
            raise KeyError(f"metric_for_best_model={self.args.metric_for_best_model!r}: {name!r} is not among the "
                           f"evaluation metrics {sorted(metrics)}; set metric_for_best_model to one of them")
        value = metrics[name]
        better = np.greater if self.args.greater_is_better else np.less
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if self.args.greater_is_better else float("inf")
        if not better(value, self.state.best_metric):
            return False
        self.state.best_metric = value
        if self.args.save_strategy in _SAVING_STRATEGIES:
            self.state.best_global_step = self.state.global_step
        return True

    def _delete_checkpoints_at_train_end(self) -> list[Path]:
        """transformers' end-of-training rule: with save_total_limit=1 and a best checkpoint, delete every
        other checkpoint (the newest too), whether or not load_best_model_at_end is set."""
        if not (self.args.should_save and self.state.best_model_checkpoint is not None
                and self.args.save_total_limit == 1):
            return []
        return ckpt.delete_all_but_best(self._get_output_dir(), self.state.best_model_checkpoint,
                                        lineage=self.checkpoint_lineage)
