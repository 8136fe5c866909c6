"""Callbacks for tests/e2e/test_run_end.py (found by `!singleton:run_end_callbacks:...` in run_end.yaml)."""

from trainer import TrainerCallback


class FailAtStep(TrainerCallback):
    """Raises at the end of step `step` (0: never): a run that fails, as a bug in a callback or the data would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            check_batch(state.global_step)


def check_batch(step: int):
    raise RuntimeError(f"batch {step} holds a token id out of range")
