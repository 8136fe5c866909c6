"""Callbacks for tests/e2e/test_monitoring.py (found by `!singleton:monitoring_callbacks:...` in monitoring.yaml)."""

import time
from pathlib import Path

from trainer import TrainerCallback


class HoldAtStep(TrainerCallback):
    """Sleeps inside step `step` (in its on_step_end) until the file `release` exists, at most `limit` s: a
    step that hangs, for as long as the test needs to look at the stalled run."""

    def __init__(self, step: int, release: str, limit: float = 120.0):
        self.step, self.release, self.limit = step, Path(release), limit

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            deadline = time.monotonic() + self.limit
            while not self.release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
