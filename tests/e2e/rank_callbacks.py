"""Callbacks for the torchrun tests (found by `!singleton:rank_callbacks:...` in ranks.yaml)."""

from trainer import TrainerCallback


class StopOnOneRank(TrainerCallback):
    """Asks to stop at `step` on rank `rank` only, as an early-stopping rule on rank-local data would."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step == self.step:
            control.should_training_stop = True
