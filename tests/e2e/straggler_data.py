"""A data collator slow on one rank only, for tests/e2e/test_stragglers.py (`!singleton:straggler_data:...`)."""

import os
import time

from trainer.data import default_data_collator


class SlowOnOneRank:
    """The default collator, `seconds` slower per batch on rank `rank`: a rank whose data loading is slow."""

    def __init__(self, rank: int, seconds: float):
        self.slow = int(os.environ.get("RANK", 0)) == int(rank)
        self.seconds = float(seconds)

    def __call__(self, features):
        if self.slow:
            time.sleep(self.seconds)
        return default_data_collator(features)
