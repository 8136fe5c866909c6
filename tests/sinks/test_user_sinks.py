"""The user sinks of examples/my_sinks.py: CsvSink through the real `fg-sink` console script against a run
that `fg-train` made, and WandbSink (the seed's WandBCallback as a sink) against a fake `wandb` module."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fg_bus import read_journal, registry
from fg_bus.registry import RunInfo

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = Path(__file__).resolve().parents[1] / "e2e" / "tiny.yaml"
BIN = os.path.dirname(sys.executable)
FG_TRAIN = os.path.join(BIN, "fg-train")
FG_SINK = os.path.join(BIN, "fg-sink")

sys.path.insert(0, str(EXAMPLES))
import my_sinks  # noqa: E402  (examples/ is not a package: a user module beside its config)

sys.path.remove(str(EXAMPLES))


def env(fg_home: Path, **extra: str) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


@pytest.fixture
def ended_run(fg_home, tmp_path) -> tuple[Path, RunInfo]:
    """A short real run, over: `fg-train tests/e2e/tiny.yaml --max-steps 20`."""
    out = tmp_path / "out"
    proc = subprocess.run([FG_TRAIN, str(TINY), "--device", "cpu", "--max-steps", "20", "--output-dir", str(out),
                           "--no-progress"], env=env(fg_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, explain(proc)
    info = registry.resolve(out)
    assert info.status == "completed"
    return out, info


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# -- CsvSink -----------------------------------------------------------------------------------------------

def test_csv_sink_through_fg_sink_writes_one_row_per_log(fg_home, tmp_path, ended_run):
    out, info = ended_run
    target = tmp_path / "metrics.csv"
    proc = subprocess.run([FG_SINK, "my_sinks:CsvSink", "--option", f"path={target}", "--run", str(out)],
                          env=env(fg_home, PYTHONPATH=str(EXAMPLES)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, explain(proc)
    journal = list(read_journal(info.journal_path()))
    assert f"run {info.run_id} completed: reached max_steps (20); {len(journal)} records handled" in proc.stderr

    logs = [r for r in journal if r["event"] == "on_log"]
    header, rows = read_csv(target)
    first = logs[0]["metrics"]
    assert header == ["step", "epoch", *[k for k in first if k != "epoch"]]
    assert "loss" in header and "learning_rate" in header
    assert [int(r["step"]) for r in rows] == [r["global_step"] for r in logs]
    assert len(rows) >= 5  # the training logs of 20 steps, the evaluation, the summary
    for row, record in zip(rows, logs):
        assert float(row["epoch"]) == pytest.approx(record["epoch"])
        for key in header[2:]:
            if key in record["metrics"]:
                value = record["metrics"][key]
                assert float(row[key]) == value or (math.isnan(value) and math.isnan(float(row[key]))), key
            else:
                assert row[key] == "", key  # a column the record lacks stays empty
    # The evaluation and the final summary are rows too (their own keys outside the header are dropped).
    assert any("eval_loss" in r["metrics"] for r in logs) and any("train_loss" in r["metrics"] for r in logs)


def test_csv_sink_fed_directly(tmp_path):
    info = RunInfo(tmp_path / "fg-bus" / "run-1", {"run_id": "run-1", "status": registry.COMPLETED})
    sink = my_sinks.CsvSink(path="{output_dir}/{run}.csv")
    assert sink.open_run(info) is None
    records = [
        {"event": "on_train_begin", "global_step": 0, "epoch": 0.0, "meta": {}},
        {"event": "on_log", "global_step": 5, "epoch": 0.25, "metrics": {"loss": 2.5, "learning_rate": 1e-3,
                                                                          "epoch": 0.25}},
        {"event": "on_step_end", "global_step": 6, "epoch": 0.3, "metrics": {"loss": 2.4}},
        {"event": "on_log", "global_step": 10, "epoch": 0.5, "metrics": {"eval_loss": 2.0, "epoch": 0.5}},
        {"event": "on_log", "global_step": 10, "epoch": 0.5, "metrics": {"loss": 2.25, "learning_rate": 5e-4}},
    ]
    for record in records:
        sink.handle(record)
    sink.end_run("completed")
    sink.close()
    sink.close()  # idempotent
    header, rows = read_csv(tmp_path / "run-1.csv")
    assert header == ["step", "epoch", "loss", "learning_rate"]
    assert rows == [
        {"step": "5", "epoch": "0.25", "loss": "2.5", "learning_rate": "0.001"},
        {"step": "10", "epoch": "0.5", "loss": "", "learning_rate": ""},
        {"step": "10", "epoch": "0.5", "loss": "2.25", "learning_rate": "0.0005"},
    ]
    # Attached again (a restart replays the whole run): the file is rewritten, not appended to.
    sink.open_run(info)
    sink.handle(records[1])
    sink.close()
    assert read_csv(tmp_path / "run-1.csv")[1] == rows[:1]


# -- WandbSink ---------------------------------------------------------------------------------------------

def fake_wandb() -> SimpleNamespace:
    calls: list[tuple] = []
    return SimpleNamespace(
        calls=calls,
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda data, step=None: calls.append(("log", data, step)),
        finish=lambda *a, **kw: calls.append(("finish",)),
    )


def test_wandb_sink_mirrors_the_seed_callback(monkeypatch, tmp_path):
    fake = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    info = RunInfo(tmp_path, {"run_id": "run-7", "status": registry.COMPLETED})
    sink = my_sinks.WandbSink(project="demo", run_name="trial-1")
    assert fake.calls == []  # nothing happens before a run is attached
    sink.open_run(info)
    for record in [
        {"event": "on_train_begin", "global_step": 0, "epoch": 0.0, "meta": {"name": "x"}},
        {"event": "on_step_end", "global_step": 1, "epoch": 0.1, "metrics": {"loss": 3.0}},
        {"event": "on_log", "global_step": 1, "epoch": 0.1, "metrics": {"loss": 3.0, "learning_rate": 0.01}},
        {"event": "on_log", "global_step": 2, "epoch": 0.2, "metrics": {}},
        {"event": "on_log", "global_step": 4, "epoch": 0.4, "metrics": {"eval_loss": 2.0}},
        {"event": "on_train_end", "global_step": 4, "epoch": 0.4, "metrics": {}},
    ]:
        sink.handle(record)
    sink.end_run("completed")
    sink.close()
    assert fake.calls == [
        ("init", {"project": "demo", "name": "trial-1"}),
        ("log", {"loss": 3.0, "learning_rate": 0.01}, 1),
        ("log", {"eval_loss": 2.0}, 4),
        ("finish",),
    ]


def test_wandb_sink_names_the_run_after_the_run_id_and_finishes_once(monkeypatch, tmp_path):
    fake = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = my_sinks.WandbSink(project="demo")
    sink.open_run(RunInfo(tmp_path, {"run_id": "run-8", "status": registry.COMPLETED}))
    sink.close()  # stopped before the end record: the wandb run is still finished, once
    sink.close()
    assert fake.calls == [("init", {"project": "demo", "name": "run-8"}), ("finish",)]


def test_wandb_sink_without_wandb_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    sink = my_sinks.WandbSink(project="demo")
    with pytest.raises(ImportError, match="pip install wandb"):
        sink.open_run(RunInfo(tmp_path, {"run_id": "run-9", "status": registry.COMPLETED}))
    sink.close()  # nothing to finish, no error
