"""The trackers a run can be replayed into (`fg-sink mlflow / wandb / trackio`), each an optional extra.
Light on purpose: fg-train checks `--sinks` with it before it imports torch."""

from __future__ import annotations

import importlib.util

TRACKER_KINDS = ("mlflow", "wandb", "trackio")


def tracker_missing(kind: str) -> str | None:
    """Why `fg-sink KIND` cannot run here (its client library is not installed), or None."""
    if importlib.util.find_spec(kind) is None:
        return f"the {kind} sink needs the {kind} extra: pip install 'fg-bus[{kind}]'"
    return None
