"""`Trainer`: the training loop, firing every callback event exactly where transformers' Trainer does.

Read `train()` top to bottom: set-up, epochs, optimizer steps (micro-batches inside), log / evaluate /
save, end. The loss and gradient norm stay on the device between logging steps; every place that reads a
device value into Python is marked "sync point" and happens only at a logging step, at the end of an
evaluation, or at the end of training.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from . import _checkpoint as ckpt
from . import distributed
from ._optim import OptimizerMixin
from ._evaluation import EvaluationMixin
from ._saving import CheckpointMixin
from ._throughput import ThroughputMeter
from ._utils import TrainOutput, call_model, length_of, loss_from_outputs, set_seed, speed_metrics, to_device
from .callbacks import CallbackHandler, DefaultFlowCallback
from .data import DataMixin, EpochSampler, default_data_collator, label_names_of
from .default_callbacks import InfoCallback, PrinterCallback, ProgressCallback
from .state import TrainerControl, TrainerState, _is_exportable
from .training_args import IntervalStrategy, SaveStrategy, TrainingArguments

logger = logging.getLogger(__name__)

_get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6


class Trainer(DataMixin, EvaluationMixin, CheckpointMixin, OptimizerMixin):
    # Whether `compute_loss` returns a loss already scaled for gradient accumulation. None: decided as
    # transformers decides it (scaled when normalised by num_items_in_batch, by the model or by
    # compute_loss_func). A subclass with its own compute_loss sets True or False.
    loss_is_scaled_for_ga: bool | None = None

    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, compute_loss_func=None,
                 compute_metrics=None, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, *, event_bus=None):
        """transformers' signature, plus `event_bus`: a callback placed before all others so it sees every
        event first (fg-train passes a `BusCallback`, which publishes each one)."""
        if model is not None and model_init is not None:
            raise ValueError("Trainer takes a model or a model_init, not both")  # as transformers
        self.model_init = model_init
        if model is None and model_init is not None:
            model = self._call_model_init()
        if model is None:
            raise ValueError("Trainer needs a model (or a model_init that returns one)")
        if optimizer_cls_and_kwargs is not None and optimizers[0] is not None:
            raise RuntimeError("pass optimizers= or optimizer_cls_and_kwargs=, not both")
        if model_init is not None and (optimizers[0] is not None or optimizers[1] is not None):
            raise RuntimeError("optimizers= cannot be used with model_init (each train() builds a new model); "
                               "override create_optimizer_and_scheduler instead")
        self.args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if self.args.eval_strategy != IntervalStrategy.NO and eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy.value!r} needs an eval_dataset; pass one, or "
                             "set eval_strategy='no'")
        # Under torchrun: join the process group before anything reads the rank (state, callbacks, data).
        self.distributed = distributed.setup(self.args)
        set_seed(self.args.seed)
        # What the training step runs: the model itself, or its DistributedDataParallel wrapper. Callbacks,
        # evaluation and checkpoints see `self.model`, as in transformers.
        self._set_model(model)
        self.data_collator = data_collator if data_collator is not None else default_data_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.optimizer, self.lr_scheduler = optimizers
        self._created_lr_scheduler = False  # True when we built the schedule: train() builds it afresh
        self.current_flos = 0.0  # this process' flos since the last store_flos(), counted on the host

        progress = PrinterCallback if self.args.disable_tqdm else ProgressCallback
        self.event_bus = event_bus
        self.is_in_train = False  # as transformers': True from train() on, False again once it returned
        if event_bus is not None and hasattr(event_bus, "trainer"):
            event_bus.trainer = self  # it reads step_loss / step_grad_norm at on_step_end
        defaults, jit = self._integration_callbacks()
        self.callback_handler = CallbackHandler(
            [*([event_bus] if event_bus is not None else []), DefaultFlowCallback, *defaults, *(callbacks or []),
             progress, InfoCallback],
            self.model, self.processing_class, self.optimizer, self.lr_scheduler,
        )
        if jit is not None:
            jit.set_trainer(self)  # its SIGTERM handler saves a checkpoint at the next step boundary
        self.state = TrainerState(is_local_process_zero=self.is_local_process_zero(),
                                  is_world_process_zero=self.is_world_process_zero())
        self.control = TrainerControl()
        self.current_gradient_accumulation_steps = 1
        # The last optimizer step's loss and gradient norm, still on the device (read by publishers).
        self.step_loss: torch.Tensor | None = None
        self.step_grad_norm: torch.Tensor | None = None
        self.step_data_time: float | None = None  # seconds this rank waited for the last step's batches
        self._data_position = (0, 0)  # (epoch, examples of it seen by all ranks): saved with checkpoints
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    def _call_model_init(self):
        takes_trial = len(inspect.signature(self.model_init).parameters) > 0
        model = self.model_init(None) if takes_trial else self.model_init()
        if model is None:
            raise RuntimeError("model_init returned None")
        return model

    def _inspect_model(self) -> None:
        """What transformers reads from the model at __init__ (and we for each model model_init builds):
        whether its forward takes loss kwargs (num_items_in_batch), its label names, and whether its loss
        shifts labels (a causal LM: its tokens are counted over labels[..., 1:])."""
        model = self.model
        if hasattr(model, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = bool(model.accepts_loss_kwargs)
        else:
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD
                                                 for p in inspect.signature(model.forward).parameters.values())
        self.label_names = label_names_of(model) if self.args.label_names is None else list(self.args.label_names)
        self._loss_shifts_labels = False
        if getattr(model, "loss_type", None) is not None:  # set by transformers' PreTrainedModel
            try:
                from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
            except ImportError:
                return
            self._loss_shifts_labels = (LOSS_MAPPING.get(model.loss_type) is ForCausalLMLoss and
                                        not getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    # -- callbacks --------------------------------------------------------------------------------------

    def _integration_callbacks(self) -> tuple[list, object | None]:
        """transformers' callbacks for `report_to` and `enable_jit_checkpoint`, placed as transformers places
        them: after DefaultFlowCallback, before the user's. Returns (callbacks, the JIT callback or None)."""
        if not self.args.report_to and not self.args.enable_jit_checkpoint:
            return [], None
        try:
            from transformers.integrations import get_available_reporting_integrations, \
                get_reporting_integration_callbacks
        except ImportError:
            raise ImportError("report_to / enable_jit_checkpoint use transformers' integrations: install the hf "
                              "extra (pip install 'fg-bus[hf]'), or set report_to='none'") from None
        names = self.args.report_to
        callbacks = get_reporting_integration_callbacks(
            get_available_reporting_integrations() if names == ["all"] else names) if names else []
        jit = None
        if self.args.enable_jit_checkpoint:
            from transformers.trainer_jit_checkpoint import JITCheckpointCallback

            jit = JITCheckpointCallback()
            callbacks.append(jit)
        return callbacks, jit

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

    # -- training ---------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        """Train; `resume_from_checkpoint` is a checkpoint directory, or True for the newest in output_dir.
        `ignore_keys_for_eval` goes to the evaluations during training; `trial` (hyperparameter search) is
        not supported and must be None."""
        if trial is not None:
            raise ValueError("hyperparameter search (trial=) is not supported by this Trainer")
        self._ignore_keys_for_eval = ignore_keys_for_eval
        self.is_in_train = True
        try:
            return self._train(resume_from_checkpoint)
        except BaseException as e:
            # The event bus, if any, ends the run's stream with the reason instead of going silent.
            if self.event_bus is not None:
                self.event_bus.close_with_error(e)
            raise

    def _train(self, resume_from_checkpoint) -> TrainOutput:
        args = self.args
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        set_seed(args.seed)
        if self.model_init is not None:  # as transformers: a new model, optimizer and schedule each call
            self._set_model(self._call_model_init())
            self.optimizer, self.lr_scheduler = None, None
        if checkpoint is not None:
            ckpt.verify_checksums(checkpoint)  # before any file is used: a damaged one is refused, named
            ckpt.load_model_weights(self.model, checkpoint)

        train_dataloader = self.get_train_dataloader()
        batches_per_epoch = length_of(train_dataloader)
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
        # A schedule we built is built again, for this call's max_steps (as transformers: otherwise a second
        # train() would run on at the first one's final learning rate, 0 for a linear decay). The optimizer
        # is kept, moments and all, as transformers keeps it; one passed by the user is never replaced.
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        self.create_optimizer_and_scheduler(max_steps)
        if checkpoint is not None:
            ckpt.load_training_state(checkpoint, self.optimizer, self.lr_scheduler)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader

        start_time = time.time()
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.zeros((), device=args.device)  # summed on the device between logging steps
        self._flos_params = None  # model.num_parameters(exclude_embeddings=True), read once per train()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen  # for train_tokens_per_second
        # samples / tokens / FLOPs counted per micro-batch on the host, read at logging steps (_throughput.py)
        self._throughput = ThroughputMeter(args, self.model, self.processing_class)
        self._extra_logs: dict[str, float] = {}
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        self.model.zero_grad(set_to_none=True)
        self.callback_handler.stopped_by = None  # who stops this train(), for the run's end reason
        self.control.should_abort = False  # `fg-bus ctl RUN abort` sets it: stop, saving nothing (below)

        self.control = self.callback_handler.on_train_begin(args, self.state, self.control,
                                                            eval_dataset=self.eval_dataset)
        if args.eval_on_start:
            # as transformers: metrics logged, on_evaluate fired, no best-model bookkeeping
            self.evaluate(ignore_keys=self._ignore_keys_for_eval)
        self._throughput.start(self.state.global_step)
        for epoch in range(epochs_trained, num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            resuming_here = checkpoint is not None and epoch == epochs_trained
            self._run_epoch(train_dataloader, epoch, batches_per_epoch, updates_per_epoch, start_time,
                            skip_samples=samples_to_skip if resuming_here else 0,
                            rng_checkpoint=checkpoint if resuming_here else None)
            if self.control.should_training_stop:
                break
        return self._finalize_training(start_time, num_train_samples)

    def _set_model(self, model) -> None:
        self.model = model.to(self.args.device)
        self.model_wrapped = self.model
        if self.distributed:
            device = self.args.device
            self.model_wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self._inspect_model()
        self._signature_columns = None

    def _resolve_checkpoint(self, resume_from_checkpoint) -> Path | None:
        """The checkpoint to resume (True: the highest step, as transformers' get_last_checkpoint; fg-train
        --resume picks the one saved last instead, see _output_dir), and the lineage this train()'s
        checkpoints carry on (_saving.py): that checkpoint's, else this Trainer's own."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            self._continue_lineage(None)
            return None
        if resume_from_checkpoint is True:
            path = ckpt.latest_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-* "
                                 "directory")
        else:
            path = Path(resume_from_checkpoint)
            if not (path / ckpt.TRAINER_STATE_NAME).is_file():
                raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint directory "
                                 f"(no {ckpt.TRAINER_STATE_NAME} in it)")
        self._continue_lineage(path)
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
            batches, num_items_in_batch = self.get_batch_samples(iterator, num_batches, args.device)
            if not batches:
                break
            self.current_gradient_accumulation_steps = len(batches)
            for i, inputs in enumerate(batches):
                step += 1
                if step % gas == 0:
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                last = i == len(batches) - 1
                with self._no_sync(not last):  # DDP: gradients are all-reduced once, on the last micro-batch
                    loss = self.training_step(self.model_wrapped, inputs, num_items_in_batch)
                # Where a checkpoint taken now resumes: later in this epoch, or at the start of the next.
                self._data_position = ((epoch + 1, 0) if step + 1 >= batches_per_epoch else
                                       (epoch, skip_samples + (step + 1 - skip) * global_batch))
                self.step_loss = loss if i == 0 else self.step_loss + loss
                self._accumulate_loss(loss)
                self.current_flos += float(self.floating_point_ops(inputs))  # from shapes: no sync
                self._throughput.count(inputs)  # shapes (a device tensor sum for non-padding tokens): no sync

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
                    # Under torchrun: the step schedule's flags act now; a flag one rank raised (a stop, a
                    # save) acts on every rank K to 2K-1 steps later, its all-reduce running while they train.
                    # At the epoch's (or the run's) last step, known alike on every rank, they are agreed at
                    # once: a vote due at the epoch's end acts before this step's save and evaluation
                    # (an abort then saves nothing), not after them.
                    if update_step == updates_per_epoch - 1 or self.state.global_step >= self.state.max_steps:
                        distributed.agree_on_control(self.control)
                    else:
                        distributed.agree_on_step(self.control, args, self.state)
                    self._maybe_log_save_evaluate(grad_norm, start_time, learning_rate)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break

        if step < 0:
            logger.warning("epoch %d had no batch; stopping training at step %d", epoch, self.state.global_step)
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        distributed.agree_on_control(self.control)  # once an epoch: waited for, with the last step's votes
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

    # -- one optimizer step's batches, and the loss ---------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, object]:
        """The next `num_batches` micro-batches (fewer at the end of the data), and `num_items_in_batch`
        for the optimizer step they make."""
        # This rank's wait for its data (loading, collating): host clock around the iterator only, no
        # collective inside, so unlike step timestamps under DDP it tells a slow-data rank from the others.
        began = time.perf_counter()
        batches = [b for _, b in zip(range(num_batches), epoch_iterator)]
        self.step_data_time = time.perf_counter() - began
        self._throughput.data_wait(self.step_data_time)
        return batches, self._get_num_items_in_batch(batches, device)

    def _get_num_items_in_batch(self, batches: list, device: torch.device) -> torch.Tensor | None:
        """The labels != -100 in all the micro-batches of one optimizer step (over labels[..., 1:] for a
        causal LM, whose loss shifts them; `shift_labels` as given when a batch has them), as a 0-d float
        tensor on `device`. Counted only when something uses it: a model that takes loss kwargs, or a
        compute_loss_func. Under torchrun (with average_tokens_across_devices) it is the sum over ranks.

        No sync: the count and the all-reduce are device operations whose result stays on the device."""
        if not (batches and isinstance(batches[0], Mapping) and "labels" in batches[0]):
            return None
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        try:
            labels = [b["shift_labels"] if "shift_labels" in b else
                      b["labels"][..., 1:] if self._loss_shifts_labels else b["labels"] for b in batches]
            count = sum(lab.to(device, non_blocking=True).ne(-100).sum() for lab in labels)
        except (TypeError, AttributeError):  # labels that are not tensors: nothing to count
            return None
        if self.args.average_tokens_across_devices and distributed.is_distributed():
            distributed.all_reduce(count)
        # transformers passes a float tensor (its count is divided by the tensor/context-parallel sizes).
        return count.to(torch.get_default_dtype())

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns the detached loss, scaled for accumulation."""
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers have modes too
            self.optimizer.train()
        inputs = to_device(inputs, self.args.device)
        if isinstance(inputs, Mapping) and len(inputs) == 0:
            raise ValueError("the batch is empty: no field of the training examples is an argument of the model's "
                             f"forward ({', '.join(self._signature_columns or [])}); check the dataset, or set "
                             "remove_unused_columns=False")
        with self._autocast():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # normalised over the whole step already, by the model or by compute_loss_func
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        loss.backward()
        return loss.detach()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """transformers' rule: compute_loss_func gets the outputs, the labels (taken out of the inputs) and
        num_items_in_batch; a model that takes loss kwargs gets num_items_in_batch; otherwise the model's
        own loss. A loss normalised by a token count over all ranks is multiplied by the world size, since
        DDP averages the gradients."""
        if not isinstance(inputs, Mapping):
            outputs = call_model(model, inputs)
            loss = self.compute_loss_func(outputs, None, num_items_in_batch=num_items_in_batch) \
                if self.compute_loss_func is not None else loss_from_outputs(outputs)
            return (loss, outputs) if return_outputs else loss
        labels = None
        if self.compute_loss_func is not None and "labels" in inputs:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            loss = loss_from_outputs(outputs)
            if loss is None:
                keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
                raise ValueError(f"the model returned no loss (got {keys}); give it `labels` in the batch, or pass "
                                 "compute_loss_func= to the Trainer")
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None and
                (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)):
            world = distributed.world_size()
            if world > 1:
                loss = loss * world
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> float:
        """transformers' estimate for a forward and backward: 6 x tokens x non-embedding parameters, for a
        model with `num_parameters` (a PreTrainedModel); 0 for others. Shapes only: no sync."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if not (isinstance(inputs, Mapping) and main_input in inputs and hasattr(self.model, "num_parameters")):
            return 0
        if getattr(self, "_flos_params", None) is None:
            self._flos_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flos_params

    def store_flos(self) -> None:
        """Add the flos counted since the last call (summed over ranks) to state.total_flos. Called where
        transformers calls it: at logging steps, before a checkpoint is written, and at the end."""
        flos = self.current_flos
        if distributed.is_distributed():  # sync point, of host values only (a gloo all-reduce)
            flos = _sum_over_ranks(flos)
        self.state.total_flos += flos
        self.current_flos = 0.0

    def _autocast(self):
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16)

    def _clip_grad_norm(self) -> torch.Tensor:
        """The total 2-norm of the gradients (before clipping, when max_grad_norm > 0), a device tensor. As
        transformers: over every parameter, 0 when none has a gradient."""
        if self.args.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if _get_total_norm is not None:
            return _get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))

    def _abort_if_agreed(self) -> None:
        if getattr(self.control, "should_abort", False):  # agreed over ranks: every rank stops here, unsaved
            self.control.should_save = self.control.should_evaluate = False
            self.control.should_training_stop = True

    def _maybe_log_save_evaluate(self, grad_norm, start_time: float, learning_rate: float | None) -> None:
        self._abort_if_agreed()
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
            self.store_flos()
            # Rates over the interval since the last log (and the token count, summed over ranks).
            self._extra_logs = self._throughput.interval_logs(self.state)
            self.log(logs, start_time)

        if self.control.should_evaluate:
            began = time.perf_counter()
            self._throughput.flush(self.state)  # the evaluation's log carries the token count so far
            metrics = self.evaluate(ignore_keys=getattr(self, "_ignore_keys_for_eval", None))
            is_new_best = self._determine_best_metric(metrics)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_new_best
            distributed.agree_on_control(self.control)  # on_evaluate callbacks (early stopping) may have voted
            self._abort_if_agreed()  # a vote in flight until now may be an abort: then the save below is not made
            self._throughput.exclude(time.perf_counter() - began)  # not training time

        if self.control.should_save:
            began = time.perf_counter()
            self._throughput.flush(self.state)  # trainer_state.json holds the token count so far
            self._save_checkpoint()  # it stores the flos so far first, as transformers' does
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            self._throughput.exclude(time.perf_counter() - began)

    def _get_learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """As transformers' log (epoch; with include_num_input_tokens_seen the token count in every log and the
        session's token rate in training logs), then the loop's throughput keys for a training log."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                session_tokens = self.state.num_input_tokens_seen - getattr(self, "_initial_num_input_tokens_seen", 0)
                logs.update(speed_metrics("train", start_time, num_tokens=session_tokens))
        extra, self._extra_logs = getattr(self, "_extra_logs", None), {}
        if extra:
            logs.update(extra)
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
        self.store_flos()
        self._throughput.flush(self.state)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info("loading the best model from %s (%s=%s)", self.state.best_model_checkpoint,
                        self.args.metric_for_best_model, self.state.best_metric)
            ckpt.verify_checksums(self.state.best_model_checkpoint)
            ckpt.load_model_weights(self.model, self.state.best_model_checkpoint)
        self._delete_checkpoints_at_train_end()  # save_total_limit=1 with a best checkpoint: only it stays
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, train_loss, metrics)


def _sum_over_ranks(value: float) -> float:
    """The sum of a host float over ranks, on the host group (distributed.py's gloo group)."""
    return distributed.all_reduce(torch.tensor([value], dtype=torch.float64), host=True).item()
