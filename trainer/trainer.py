"""`Trainer`: the training loop, firing every callback event exactly where transformers' Trainer does.

Read `train()` top to bottom: set-up, epochs, optimizer steps (micro-batches inside), log / evaluate /
save, end. The loss and gradient norm stay on the device between logging steps; every place that reads a
device value into Python is marked "sync point" and happens only at a logging step, at the end of an
evaluation, or at the end of training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from . import _checkpoint as ckpt
from . import distributed
from ._optim import create_optimizer, create_scheduler
from ._evaluation import EvaluationMixin
from ._saving import CheckpointMixin
from ._utils import TrainOutput, call_model, loss_from_outputs, set_seed, speed_metrics, to_device
from .callbacks import CallbackHandler, DefaultFlowCallback
from .data import EpochSampler, default_data_collator
from .default_callbacks import InfoCallback, PrinterCallback, ProgressCallback
from .state import TrainerControl, TrainerState, _is_exportable
from .training_args import IntervalStrategy, SaveStrategy, TrainingArguments

logger = logging.getLogger(__name__)

_get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6


class Trainer(EvaluationMixin, CheckpointMixin):
    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, compute_loss_func=None,
                 compute_metrics=None, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, *, event_bus=None):
        """transformers' signature, plus `event_bus`: a callback placed before all others so it sees every
        event first (fg-train passes a `BusCallback`, which publishes each one)."""
        if model is None and model_init is not None:
            model = model_init()
        if model is None:
            raise ValueError("Trainer needs a model (or a model_init that returns one)")
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if self.args.eval_strategy != IntervalStrategy.NO and eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy.value!r} needs an eval_dataset; pass one, or "
                             "set eval_strategy='no'")
        # Under torchrun: join the process group before anything reads the rank (state, callbacks, data).
        self.distributed = distributed.setup(self.args)
        set_seed(self.args.seed)
        self.model = model.to(self.args.device)
        # What the training step runs: the model itself, or its DistributedDataParallel wrapper. Callbacks,
        # evaluation and checkpoints see `self.model`, as in transformers.
        self.model_wrapped = self.model
        if self.distributed:
            device = self.args.device
            self.model_wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.data_collator = data_collator if data_collator is not None else default_data_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.optimizer, self.lr_scheduler = optimizers

        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        self.event_bus = event_bus
        if event_bus is not None and hasattr(event_bus, "trainer"):
            event_bus.trainer = self  # it reads step_loss / step_grad_norm at on_step_end
        self.callback_handler = CallbackHandler(
            [*([event_bus] if event_bus is not None else []), DefaultFlowCallback, *(callbacks or []), progress,
             InfoCallback],
            self.model, self.processing_class, self.optimizer, self.lr_scheduler,
        )
        self.state = TrainerState(is_local_process_zero=self.is_local_process_zero(),
                                  is_world_process_zero=self.is_world_process_zero())
        self.control = TrainerControl()
        self.current_gradient_accumulation_steps = 1
        # The last optimizer step's loss and gradient norm, still on the device (read by publishers).
        self.step_loss: torch.Tensor | None = None
        self.step_grad_norm: torch.Tensor | None = None
        self._data_position = (0, 0)  # (epoch, examples of it seen by all ranks): saved with checkpoints
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # -- callbacks --------------------------------------------------------------------------------------

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def is_world_process_zero(self) -> bool:
        return self.args.process_index == 0

    def is_local_process_zero(self) -> bool:
        return self.args.local_process_index == 0

    # -- data -------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        sampler = None
        if not isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            sampler = EpochSampler(len(self.train_dataset), seed=self.args.seed, rank=self.args.process_index,
                                   world_size=self.args.world_size)
        return self._dataloader(self.train_dataset, self.args.per_device_train_batch_size, sampler,
                                drop_last=self.args.dataloader_drop_last)

    def get_eval_dataloader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset (pass it to the Trainer or to evaluate())")
        return self._dataloader(dataset, self.args.per_device_eval_batch_size, None, drop_last=False)

    def _dataloader(self, dataset, batch_size: int, sampler, drop_last: bool) -> torch.utils.data.DataLoader:
        # A private generator: creating an iterator must not draw from the global RNG, or resuming would
        # shift every random number after it.
        generator = torch.Generator()
        generator.manual_seed(self.args.seed)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, drop_last=drop_last,
            pin_memory=self.args.device.type == "cuda", generator=generator,
        )

    # -- training ---------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train; `resume_from_checkpoint` is a checkpoint directory, or True for the newest in output_dir."""
        try:
            return self._train(resume_from_checkpoint)
        except BaseException as e:
            # The event bus, if any, ends the run's stream with the reason instead of going silent.
            if self.event_bus is not None and hasattr(self.event_bus, "close"):
                self.event_bus.close("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
            raise

    def _train(self, resume_from_checkpoint) -> TrainOutput:
        args = self.args
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        set_seed(args.seed)
        if checkpoint is not None:
            ckpt.verify_checksums(checkpoint)  # before any file is used: a damaged one is refused, named
            ckpt.load_model_weights(self.model, checkpoint)

        train_dataloader = self.get_train_dataloader()
        batches_per_epoch = _length(train_dataloader)
        if batches_per_epoch is None and args.max_steps <= 0:
            raise ValueError("max_steps must be set (> 0) when the train_dataset has no length")
        gas = args.gradient_accumulation_steps
        if batches_per_epoch is not None:
            updates_per_epoch = max(math.ceil(batches_per_epoch / gas), 1)
            max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
            num_train_epochs = math.ceil(max_steps / updates_per_epoch) if args.max_steps > 0 else \
                math.ceil(args.num_train_epochs)
            num_train_samples = (max_steps * args.train_batch_size * gas if args.max_steps > 0
                                 else len(self.train_dataset) * args.num_train_epochs)
        else:
            updates_per_epoch, max_steps, num_train_epochs = args.max_steps, args.max_steps, 1 << 62
            batches_per_epoch = max_steps * gas
            num_train_samples = max_steps * args.train_batch_size * gas

        epochs_trained, samples_to_skip = self._init_state(max_steps, num_train_epochs, updates_per_epoch, checkpoint)
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, args)
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(self.optimizer, args, max_steps)
        if checkpoint is not None:
            ckpt.load_training_state(checkpoint, self.optimizer, self.lr_scheduler)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader

        start_time = time.time()
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.zeros((), device=args.device)  # summed on the device between logging steps
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        self.model.zero_grad(set_to_none=True)

        self.control = self.callback_handler.on_train_begin(args, self.state, self.control,
                                                            eval_dataset=self.eval_dataset)
        if args.eval_on_start:
            self.evaluate()  # as transformers: metrics logged, on_evaluate fired, no best-model bookkeeping
        for epoch in range(epochs_trained, num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            resuming_here = checkpoint is not None and epoch == epochs_trained
            self._run_epoch(train_dataloader, epoch, batches_per_epoch, updates_per_epoch, start_time,
                            skip_samples=samples_to_skip if resuming_here else 0,
                            rng_checkpoint=checkpoint if resuming_here else None)
            if self.control.should_training_stop:
                break
        return self._finalize_training(start_time, num_train_samples)

    def _resolve_checkpoint(self, resume_from_checkpoint) -> Path | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            latest = ckpt.latest_checkpoint(self.args.output_dir)
            if latest is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-* "
                                 "directory")
            return latest
        path = Path(resume_from_checkpoint)
        if not (path / ckpt.TRAINER_STATE_NAME).is_file():
            raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint directory "
                             f"(no {ckpt.TRAINER_STATE_NAME} in it)")
        return path

    def _stateful_callbacks(self) -> list:
        return [cb for cb in [*self.callback_handler.callbacks, self.control] if _is_exportable(cb)]

    def _init_state(self, max_steps: int, num_train_epochs: int, updates_per_epoch: int,
                    checkpoint: Path | None) -> tuple[int, int]:
        """A fresh TrainerState, or the checkpoint's. Returns (epochs done, examples of the next one already
        seen by all ranks together)."""
        self.state = TrainerState(stateful_callbacks=self._stateful_callbacks())
        self.state.train_batch_size = self.args.train_batch_size
        self.state.compute_steps(self.args, max_steps)
        epochs_trained = samples_to_skip = 0
        if checkpoint is not None:
            self.state = ckpt.load_trainer_state(checkpoint, TrainerState)
            if self.state.best_model_checkpoint and not os.path.isdir(self.state.best_model_checkpoint):
                self.state.best_model_checkpoint = None
            self._load_callback_state()
            position = ckpt.load_data_position(checkpoint)
            if position is not None:  # exact, and valid at any world size
                epochs_trained, samples_to_skip = position["epoch"], position["samples_seen_in_epoch"]
            else:  # a checkpoint written by transformers: same world size assumed
                epochs_trained = self.state.global_step // updates_per_epoch
                samples_to_skip = ((self.state.global_step % updates_per_epoch) * self.args.gradient_accumulation_steps
                                   * self.args.per_device_train_batch_size * self.args.world_size)
            if self.args.ignore_data_skip:
                samples_to_skip = 0
        self.state.max_steps = max_steps
        self.state.num_train_epochs = num_train_epochs
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        return epochs_trained, samples_to_skip

    def _load_callback_state(self) -> None:
        """Rebuild ExportableState callbacks (and the control) from the checkpoint, when asked to."""
        if not self.args.restore_callback_states_from_checkpoint:
            return
        current = [*self.callback_handler.callbacks, self.control]
        for name, data in self.state.stateful_callbacks.items():
            same_class = [cb for cb in current if type(cb).__name__ == name]
            if not same_class:
                logger.warning("checkpoint holds state for callback %s, which this run does not have; ignored", name)
                continue
            for callback, saved in zip(same_class, data if isinstance(data, list) else [data]):
                restored = type(callback)(**saved.get("args", {}))
                for key, value in saved.get("attributes", {}).items():
                    setattr(restored, key, value)
                if isinstance(callback, TrainerControl):
                    self.control = restored
                else:
                    index = self.callback_handler.callbacks.index(callback)
                    self.callback_handler.callbacks[index] = restored

    def _run_epoch(self, dataloader, epoch: int, batches_per_epoch: int, updates_per_epoch: int,
                   start_time: float, skip_samples: int, rng_checkpoint: Path | None) -> None:
        args, gas = self.args, self.args.gradient_accumulation_steps
        global_batch = args.per_device_train_batch_size * args.world_size  # examples per micro-batch, all ranks
        skip = skip_samples // global_batch  # micro-batches of this epoch already done (at this world size)
        sampler = dataloader.sampler
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=skip_samples)
        elif skip:
            logger.warning("cannot skip %d batches of a dataset without a length; the resumed run sees other data", skip)
        iterator = iter(dataloader)
        if rng_checkpoint is not None:
            # After the iterator exists: the resumed run draws random numbers from here on exactly as the
            # original run did after its checkpoint.
            ckpt.load_rng_state(rng_checkpoint, args.process_index, args.world_size)
        step = skip - 1  # index of the last micro-batch done in this epoch
        self._data_position = (epoch, skip_samples)
        remainder = batches_per_epoch % gas or gas
        grad_norm = learning_rate = None

        for update_step in range(skip // gas, updates_per_epoch):
            num_batches = gas if update_step != updates_per_epoch - 1 else remainder
            batches = [b for _, b in zip(range(num_batches), iterator)]
            if not batches:
                break
            self.current_gradient_accumulation_steps = len(batches)
            for i, inputs in enumerate(batches):
                step += 1
                if step % gas == 0:
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                last = i == len(batches) - 1
                with self._no_sync(not last):  # DDP: gradients are all-reduced once, on the last micro-batch
                    loss = self.training_step(self.model_wrapped, inputs)
                # Where a checkpoint taken now resumes: later in this epoch, or at the start of the next.
                self._data_position = ((epoch + 1, 0) if step + 1 >= batches_per_epoch else
                                       (epoch, skip_samples + (step + 1 - skip) * global_batch))
                self.step_loss = loss if i == 0 else self.step_loss + loss
                self._accumulate_loss(loss)

                if i < len(batches) - 1:
                    self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                else:
                    grad_norm = self._clip_grad_norm()
                    self.step_grad_norm = grad_norm
                    self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                    self.optimizer.step()
                    self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                    learning_rate = self.lr_scheduler.get_last_lr()[0]
                    self.lr_scheduler.step()
                    self.model.zero_grad(set_to_none=True)
                    self.state.global_step += 1
                    self.state.epoch = epoch + (step + 1) / batches_per_epoch
                    self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                    distributed.agree_on_control(self.control)  # a stop raised on any rank stops all, here
                    self._maybe_log_save_evaluate(grad_norm, start_time, learning_rate)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break

        if step < 0:
            logger.warning("epoch %d had no batch; stopping training at step %d", epoch, self.state.global_step)
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        distributed.agree_on_control(self.control)
        self._maybe_log_save_evaluate(grad_norm, start_time, learning_rate)

    def _no_sync(self, skip_sync: bool):
        if skip_sync and self.distributed:
            return self.model_wrapped.no_sync()
        return contextlib.nullcontext()

    def _accumulate_loss(self, loss: torch.Tensor) -> None:
        if self.args.logging_nan_inf_filter:
            # A non-finite step loss counts as the mean so far (transformers' rule), decided on the device
            # with torch.where: testing it in Python would be a sync point on every micro-batch.
            mean_so_far = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            loss = torch.where(torch.isfinite(loss), loss, mean_so_far)
        self._tr_loss += loss

    def training_step(self, model, inputs) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns the detached loss, scaled for accumulation."""
        model.train()
        inputs = to_device(inputs, self.args.device)
        with self._autocast():
            loss = self.compute_loss(model, inputs)
        loss = loss / self.current_gradient_accumulation_steps
        loss.backward()
        return loss.detach()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self.compute_loss_func is not None:
            inputs = dict(inputs)
            labels = inputs.pop("labels", None)
            outputs = call_model(model, inputs)
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            outputs = call_model(model, inputs)
            loss = loss_from_outputs(outputs)
            if loss is None:
                keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
                raise ValueError(f"the model returned no loss (got {keys}); give it `labels` in the batch, or pass "
                                 "compute_loss_func= to the Trainer")
        return (loss, outputs) if return_outputs else loss

    def _autocast(self):
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16)

    def _clip_grad_norm(self) -> torch.Tensor | None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        if self.args.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        if _get_total_norm is not None:
            return _get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))

    def _maybe_log_save_evaluate(self, grad_norm, start_time: float, learning_rate: float | None) -> None:
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            values = self._tr_loss if grad_norm is None else torch.stack([self._tr_loss, grad_norm.float()])
            # The mean over ranks (logging steps only; the grad norm is the same on every rank after DDP).
            values = distributed.mean_over_ranks(values)  # in place: _tr_loss is zeroed just below anyway
            # Sync point (logging step only): loss and grad norm come to the host in one transfer.
            values = values.tolist()
            tr_loss_scalar = values[0] if grad_norm is not None else values
            self._tr_loss.zero_()
            logs: dict[str, float] = {"loss": tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = values[1]
            logs["learning_rate"] = learning_rate if learning_rate is not None else self._get_learning_rate()
            self._total_loss_scalar += tr_loss_scalar
            self._globalstep_last_logged = self.state.global_step
            self.log(logs, start_time)

        if self.control.should_evaluate:
            metrics = self.evaluate()
            is_new_best = self._determine_best_metric(metrics)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_new_best
            distributed.agree_on_control(self.control)  # on_evaluate callbacks (early stopping) may have voted

        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _get_learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=logs)

    def _finalize_training(self, start_time: float, num_train_samples: float) -> TrainOutput:
        # Sync point (end of training): the loss accumulated since the last log.
        self._total_loss_scalar += self._tr_loss.item()
        steps_done = self.state.global_step - self._initial_global_step
        train_loss = self._total_loss_scalar / max(steps_done, 0.001)
        metrics = speed_metrics("train", start_time,
                                num_samples=num_train_samples * steps_done / max(self.state.max_steps, 1),
                                num_steps=steps_done)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info("loading the best model from %s (%s=%s)", self.state.best_model_checkpoint,
                        self.args.metric_for_best_model, self.state.best_metric)
            ckpt.verify_checksums(self.state.best_model_checkpoint)
            ckpt.load_model_weights(self.model, self.state.best_model_checkpoint)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        if self.event_bus is not None and hasattr(self.event_bus, "close"):
            self.event_bus.close()  # after every on_train_end, so records they publish are in the run
        return TrainOutput(self.state.global_step, train_loss, metrics)


def _length(dataloader) -> int | None:
    try:
        return len(dataloader)
    except TypeError:
        return None
