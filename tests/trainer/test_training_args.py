"""TrainingArguments: transformers' defaults, validation messages that name the field, serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainer import IntervalStrategy, TrainerState, TrainingArguments


def test_defaults_match_transformers():
    args = TrainingArguments()
    assert args.output_dir == "trainer_output"
    assert (args.num_train_epochs, args.max_steps, args.learning_rate) == (3.0, -1, 5e-5)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (8, 8)
    assert (args.logging_steps, args.save_steps, args.seed) == (500, 500, 42)
    assert args.eval_strategy == "no" and args.logging_strategy == "steps" and args.save_strategy == "steps"
    assert args.lr_scheduler_type == "linear" and args.max_grad_norm == 1.0


def test_strategies_accept_strings_and_compare_as_strings():
    args = TrainingArguments(eval_strategy="epoch", logging_strategy="no", save_strategy="epoch")
    assert args.eval_strategy is IntervalStrategy.EPOCH
    assert args.eval_strategy == "epoch" and args.logging_strategy == "no"


def test_eval_steps_falls_back_to_logging_steps():
    assert TrainingArguments(eval_strategy="steps", logging_steps=7).eval_steps == 7


def test_greater_is_better_follows_the_metric_name():
    assert TrainingArguments(metric_for_best_model="eval_loss").greater_is_better is False
    assert TrainingArguments(metric_for_best_model="accuracy").greater_is_better is True


@pytest.mark.parametrize("kwargs, field", [
    ({"max_steps": 0}, "max_steps"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"adam_beta2": 1.0}, "adam_beta2"),
    ({"warmup_steps": -2}, "warmup_steps"),
    ({"logging_strategy": "sometimes"}, "logging_strategy"),
    ({"lr_scheduler_type": "cosine_forever"}, "lr_scheduler_type"),
    ({"logging_steps": 2.5}, "logging_steps"),
    ({"save_total_limit": 0}, "save_total_limit"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end"),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 3, "save_steps": 5}, "save_steps"),
])
def test_bad_values_fail_with_a_message_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainingArguments(**kwargs)


def test_ratios_below_one_resolve_against_max_steps():
    args = TrainingArguments(logging_steps=0.1, eval_strategy="steps", eval_steps=0.25, save_steps=0.5,
                             warmup_steps=0.1)
    state = TrainerState()
    state.compute_steps(args, 200)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (20, 50, 100)
    assert args.get_warmup_steps(200) == 20
    assert TrainingArguments(warmup_ratio=0.05).get_warmup_steps(200) == 10


def test_to_dict_and_json_round_trip():
    args = TrainingArguments(output_dir="out", eval_strategy="epoch", report_to="none")
    data = json.loads(args.to_json_string())
    assert data == args.to_dict()
    assert data["eval_strategy"] == "epoch" and data["output_dir"] == "out"
    assert TrainingArguments(**data) == args


def test_trainer_state_json_round_trip(tmp_path):
    state = TrainerState(global_step=7, best_metric=0.5, log_history=[{"loss": 1.0, "step": 7}])
    state.save_to_json(str(tmp_path / "s.json"))
    loaded = TrainerState.load_from_json(str(tmp_path / "s.json"))
    assert dataclasses.asdict(loaded) == dataclasses.asdict(state)


def test_optim_names_the_adamw_and_is_checked_when_the_arguments_are_built():
    from trainer._optim import default_optimizer_cls_and_kwargs

    with pytest.raises(ValueError, match="optim='sgd'.*optimizer_cls_and_kwargs"):
        TrainingArguments(output_dir="x", optim="sgd")
    # On the CPU the plain AdamW by default (torch's fused CPU kernel stalls on a busy machine), fused when asked.
    assert "fused" not in default_optimizer_cls_and_kwargs(TrainingArguments(output_dir="x", use_cpu=True))[1]
    fused = TrainingArguments(output_dir="x", use_cpu=True, optim="adamw_torch_fused")
    assert default_optimizer_cls_and_kwargs(fused)[1]["fused"] is True
