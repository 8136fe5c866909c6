"""Run this `trainer.Trainer` and `transformers.Trainer` on the same model, data and arguments, and diff them.

Used by the `test_parity_*.py` modules (issue 12's side-by-side suite). Each side gets a fresh copy of the
model made by the same factory under the same seed, its own output directory, the same datasets and the
same argument dict; the caller adds side-specific keyword arguments (compute_metrics, callbacks, ...).

    ours, hf = run_both(tmp_path, model_factory, train_ds, eval_ds, dict(max_steps=4, ...))
    assert_logs_equal(ours.state.log_history, hf.state.log_history)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

import pytest
import torch

import trainer as fg
from trainer._throughput import FG_ONLY_LOG_KEYS

transformers = pytest.importorskip("transformers")

# Keys of a log that carry wall-clock time, never equal between two runs (step_time and mfu: this trainer's
# throughput keys, see trainer/_throughput.py).
TIMING_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time", "step_time", "data_time", "mfu")


def make_pair(tmp_path, model_factory, train_dataset=None, eval_dataset=None, args: dict | None = None, *,
              seed: int = 0, ours_kwargs: dict | None = None, hf_kwargs: dict | None = None, **common):
    """Build (ours, transformers') trainers, unstarted. `common` keyword arguments go to both."""
    args = dict(args or {})
    args.setdefault("report_to", "none")
    args.setdefault("use_cpu", True)
    args.setdefault("disable_tqdm", True)
    # transformers' default is the fused AdamW, ours on the CPU the plain one (see trainer/_optim.py): ask
    # both for the same. They differ by float rounding, which 1e-5 comparisons of many steps can see.
    args.setdefault("optim", "adamw_torch")
    built = []
    for side, module, extra in (("ours", fg, ours_kwargs), ("hf", transformers, hf_kwargs)):
        torch.manual_seed(seed)
        model = model_factory()
        out = tmp_path / side
        built.append(module.Trainer(model=model, args=module.TrainingArguments(output_dir=str(out), **args),
                                    train_dataset=train_dataset, eval_dataset=eval_dataset,
                                    **common, **(extra or {})))
    return tuple(built)


def run_both(tmp_path, model_factory, train_dataset=None, eval_dataset=None, args: dict | None = None, **kwargs):
    """make_pair, then train() both; returns (ours, hf)."""
    ours, hf = make_pair(tmp_path, model_factory, train_dataset, eval_dataset, args, **kwargs)
    ours.train()
    hf.train()
    return ours, hf


def without_timings(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if not k.endswith(TIMING_SUFFIXES)}


def without_fg_only(ours, hf):
    """`ours` (a log dict, or its keys) less the throughput keys only this trainer logs (FG_ONLY_LOG_KEYS)
    that transformers' log `hf` lacks: every key transformers logs is still compared (num_input_tokens_seen
    too, when include_num_input_tokens_seen makes it transformers' key)."""
    drop = FG_ONLY_LOG_KEYS - set(hf)
    if isinstance(ours, Mapping):
        return {k: v for k, v in ours.items() if k not in drop}
    return type(ours)(k for k in ours if k not in drop)


def _close(a, b, rel: float, abs_: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if math.isnan(a) and math.isnan(b):
                return True
            return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
        return False
    return a == b


def diff_dicts(ours: dict, hf: dict, rel: float = 1e-5, abs_: float = 1e-6) -> list[str]:
    """Human-readable differences between two flat dicts (timing keys ignored): missing, extra, unequal."""
    ours, hf = without_timings(without_fg_only(ours, hf)), without_timings(hf)
    out = [f"only in transformers: {k}={hf[k]!r}" for k in sorted(hf.keys() - ours.keys())]
    out += [f"only in ours: {k}={ours[k]!r}" for k in sorted(ours.keys() - hf.keys())]
    out += [f"{k}: ours {ours[k]!r} != transformers {hf[k]!r}" for k in sorted(ours.keys() & hf.keys())
            if not _close(ours[k], hf[k], rel, abs_)]
    return out


def assert_logs_equal(ours: list[dict], hf: list[dict], rel: float = 1e-5, abs_: float = 1e-6) -> None:
    """Every log_history entry equal (timings ignored, floats to `rel`/`abs_`), in the same order."""
    problems = []
    if len(ours) != len(hf):
        problems.append(f"{len(ours)} log entries, transformers has {len(hf)}:\n" + "\n".join(difflib.unified_diff(
            [repr(sorted(without_timings(h))) for h in hf], [repr(sorted(without_timings(h))) for h in ours],
            "transformers", "ours", lineterm="")))
    for i, (a, b) in enumerate(zip(ours, hf)):
        problems += [f"log {i} (step {b.get('step')}): {d}" for d in diff_dicts(a, b, rel, abs_)]
    assert not problems, "log histories differ:\n" + "\n".join(problems)


def assert_metrics_equal(ours: dict, hf: dict, rel: float = 1e-5, abs_: float = 1e-6) -> None:
    problems = diff_dicts(ours, hf, rel, abs_)
    assert not problems, "metrics differ:\n" + "\n".join(problems)
