"""User sinks for `fg-sink`: a CSV file of the logged metrics, and the seed document's WandBCallback as a sink.

Run them against a live or finished run, with this directory on the import path:

    PYTHONPATH=examples fg-sink my_sinks:CsvSink --option path=metrics.csv
    PYTHONPATH=examples fg-sink my_sinks:WandbSink --option project=demo --option run_name=trial-1

A sink is a small class fed a run's records in seq order (see `sinks.base.Sink`); it never sees a socket,
so a test drives it by calling `open_run`, `handle`, `end_run` and `close` itself.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from fg_bus.registry import RunInfo
from sinks import Sink
from sinks.base import expand

logger = logging.getLogger(__name__)


class CsvSink(Sink):
    """One CSV row per `on_log` record: `step`, `epoch`, then each metric.

    The header comes from the first row's keys; a later row's metrics outside it are left out, and the
    columns it lacks are empty (so an evaluation log in a training-log header has an empty `loss`). `path`
    may hold `{run}` and `{output_dir}`. The sink asks for the whole run (`open_run` returns None) and
    rewrites the file, so a restarted sink writes no duplicate rows.
    """

    kind = "csv"

    def __init__(self, path: str = "metrics.csv"):
        self.template = path
        self.path: Path | None = None
        self.rows = 0
        self._file = None
        self._writer: csv.DictWriter | None = None

    def open_run(self, info: RunInfo) -> int | None:
        self._close_file()
        self.path = Path(expand(self.template, info))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = None
        self.rows = 0
        return None

    def handle(self, record: dict[str, Any]) -> None:
        if record["event"] != "on_log":
            return
        row = {"step": record.get("global_step"), "epoch": record.get("epoch")}
        row.update({k: v for k, v in (record.get("metrics") or {}).items() if k not in row})
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), restval="", extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(row)
        self.rows += 1

    def end_run(self, status: str) -> None:
        if self._file is not None:
            self._file.flush()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
                self._writer = None

    def close(self) -> None:
        self._close_file()


class WandbSink(Sink):
    """The seed's `WandBCallback(project_name, run_name=None)` as a sink: `wandb.init` when the run is
    attached, `wandb.log(logs, step=global_step)` for each `on_log`, `wandb.finish()` when the run ends.

    wandb is imported only when a run is attached, so this module imports without it.
    """

    kind = "wandb"

    def __init__(self, project: str, run_name: str | None = None):
        if not project:
            raise ValueError("WandbSink: project must be a non-empty string")
        self.project = project
        self.run_name = run_name
        self._wandb = None
        self._active = False

    def open_run(self, info: RunInfo) -> int | None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbSink needs the wandb package: pip install wandb") from e
        self._finish()
        self._wandb = wandb
        wandb.init(project=self.project, name=self.run_name or info.run_id)
        self._active = True
        return None

    def handle(self, record: dict[str, Any]) -> None:
        if record["event"] == "on_log" and record.get("metrics") and self._active:
            self._wandb.log(dict(record["metrics"]), step=record["global_step"])

    def end_run(self, status: str) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._active:
            self._active = False
            self._wandb.finish()

    def close(self) -> None:
        self._finish()
