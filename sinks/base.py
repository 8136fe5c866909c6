"""The sink protocol: a small class that receives a run's records in seq order.

    class MySink(Sink):
        def handle(self, record): ...        # one record, in seq order
        def close(self): ...                 # idempotent

Optional hooks: `open_run(info)` is called when a run is attached and returns where this sink's output
for that run ends (the next seq it needs: an int for rank 0, or a dict by rank), so a restarted sink
continues without a duplicate or a hole;
`end_run(status, reason)` when the run's stream is over (`reason`: why, a dict with `text`; see
`fg_bus.records.end_reason`; an `end_run(status)` of one argument gets the status alone). A sink never sees sockets: tests feed it records.

A sink that only stores records may take them as bytes instead (`raw = True`, and `handle_raw` in place of
`handle`): the lines come as the journal and the live stream carry them, checked on their bytes, never
parsed into dicts (`fg_bus.subscriber.RawLines`); `fg-sink json` does, and writes at several times the rate.

A full disk: when `handle` (or `handle_raw`) raises an OSError for one (ENOSPC, EDQUOT, EFBIG), the runner
says so and tries again every second, until it goes through, by calling the sink's `retry_write()` if it has one (a sink that
keeps what it could not write, like json and tb), else `handle(record)` again. Any other OSError stops the
sink (exit 8) with the command that resumes it.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fg_bus.registry import RunInfo


class Sink:
    """Base class with do-nothing hooks; `NullSink` is exactly this."""

    #: the name `fg-sink` uses for it
    kind = "sink"
    #: which ranks of a torchrun job it follows: "0", "all", or a list such as "0,2" (`fg-sink --ranks`)
    ranks = "0"
    #: True: the runner calls `handle_raw` with encoded lines instead of `handle` with dicts
    raw = False

    def open_run(self, info: RunInfo) -> int | dict[int, int] | None:
        """A run is attached. Return the next seq this sink needs (None: whatever `--from` says), or a dict
        {rank: next seq} when it follows several ranks."""
        return None

    def handle(self, record: dict[str, Any]) -> None:
        pass

    def handle_raw(self, data: bytes, rank: int, first_seq: int, last_seq: int) -> None:
        """For a sink with `raw = True`: records first_seq..last_seq of `rank`, in seq order, as `data`, their
        encoded lines (each as `fg_bus.records.encode` writes the record, ending with a newline). The run's
        `end` record never comes this way: `handle` gets it, decoded, then `end_run`."""
        raise NotImplementedError(f"{type(self).__name__} sets raw = True but has no handle_raw")

    def end_run(self, status: str, reason: dict | None = None) -> None:
        """The run's stream is over (completed / stopped / interrupted / failed / dead, and `reason`: why,
        `fg_bus.records.end_reason`'s dict, or None); make the output durable."""

    def close(self) -> None:
        """Release everything; called once at exit, and safe to call again."""


class NullSink(Sink):
    """Receives records and does nothing: the reference sink, and a way to measure the bus alone."""

    kind = "null"


def output_dir_of(info: RunInfo) -> str:
    """The training run's output directory (the bus directory is OUTPUT_DIR/fg-bus/RUN_ID)."""
    return str(info.bus_dir.parent.parent)


def expand(template: str, info: RunInfo) -> str:
    """`{run}` and `{output_dir}` in an output path."""
    return template.format(run=info.run_id, output_dir=output_dir_of(info))


def record_time(record: dict[str, Any]) -> float:
    """When the record happened (its `timestamp`, as a Unix time), for the point a tracker stores: the
    training time, never the replay's; now, for a record without a readable one."""
    try:
        return datetime.fromisoformat(record["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def rewrite_logs(metrics: dict[str, Any]) -> dict[str, Any]:
    """transformers' `rewrite_logs` (its TensorBoard, W&B and trackio integrations): `eval_x` -> `eval/x`,
    `test_x` -> `test/x`, anything else `train/x`."""
    out = {}
    for key, value in metrics.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                out[f"{prefix}/{key[len(prefix) + 1:]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out
