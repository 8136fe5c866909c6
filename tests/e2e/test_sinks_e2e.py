"""Sinks as a user runs them: `fg-train` and `fg-sink` as separate processes, outputs read back with
TensorBoard's own reader and as JSON lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import read_journal, registry

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")


def env(fg_home: Path) -> dict:
    return {**os.environ, "FG_HOME": str(fg_home)}


def fg_train(fg_home: Path, out: Path, *args: str, max_steps: int = 300) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(out),
                             "--max-steps", str(max_steps), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(fg_home))


def fg_sink(fg_home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(fg_home))


def bus_dir(out: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((out / "fg-bus").glob("*/run.json"))
        if found:
            return found[0].parent
        time.sleep(0.05)
    raise AssertionError("no run appeared")


def wait_lines(path: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or path.read_bytes().count(b"\n") < n:
        assert time.monotonic() < deadline, f"{path} has fewer than {n} lines"
        time.sleep(0.05)


def json_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def texts(run_dir: Path) -> dict[str, list[str]]:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(tag)] for tag in ea.Tags()["tensors"]
            if ea.SummaryMetadata(tag).plugin_data.plugin_name == "text"}  # not the hparams session


def test_sinks_started_before_the_run_write_complete_outputs(fg_home, tmp_path):
    out = tmp_path / "run"
    json_sink = fg_sink(fg_home, "json", "--out", str(tmp_path / "log.jsonl"), "--wait", "60")
    tb_sink = fg_sink(fg_home, "tb", "--logdir", str(tmp_path / "tb"), "--wait", "60")
    tail_sink = fg_sink(fg_home, "tail", "--wait", "60")
    # Snapshots at 150 and 300 only: with two kept, none is rotated away before a slow (loaded) sink gets to
    # it, so every sample has text (rotation is tested in tests/sinks/test_textgen_hf.py).
    train = fg_train(fg_home, out, "--sinks", "textgen", "--textgen-every", "150")
    assert train.wait(180) == 0, train.stderr.read().decode()
    for sink in (json_sink, tb_sink, tail_sink):
        assert sink.wait(60) == 0, sink.stderr.read().decode()
    errors = {name: p.stderr.read().decode() for name, p in (("json", json_sink), ("tb", tb_sink), ("tail", tail_sink))}
    print(errors)  # shown by pytest if an assertion below fails
    info = registry.load_run(bus_dir(out))
    journal = list(read_journal(info.journal_path()))

    log = json_lines(tmp_path / "log.jsonl")
    assert [r["seq"] for r in log] == list(range(len(journal)))  # every seq, no hole, no duplicate
    assert log[-1]["event"] == "end" and log[-1]["status"] == "completed"
    samples = [r for r in log if r["event"] == "textgen"]
    assert [r["global_step"] for r in samples][:2] == [150, 300], samples
    assert all(r["text"] for r in samples), samples

    run_tb = tmp_path / "tb" / info.run_id
    got = scalars(run_tb)
    logged = [r for r in journal if r["event"] == "on_log" and "loss" in r["metrics"]]
    assert [s for s, _ in got["train/loss"]] == [r["global_step"] for r in logged]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["metrics"]["loss"] for r in logged], rel=1e-6)
    assert [s for s, _ in got["train/step_loss"]] == list(range(1, 301))
    assert {"train/learning_rate", "train/grad_norm", "eval/loss", "train/train_loss"} <= set(got)
    text = texts(run_tb)
    assert "run/meta" in text and "trainer.chargpt:CharGPT" in text["run/meta"][0]
    assert any(samples[0]["text"] in t for t in text["textgen/sample_0"])
    assert text["run/end"] == ["completed: reached max_steps (300)"]  # how the run ended

    tail_out = tail_sink.stdout.read().decode()
    assert "loss" in tail_out and "saved" in tail_out and "end: completed" in tail_out and "sample" in tail_out
    assert "\033[" not in tail_out  # piped: no colour
    assert f"run {info.run_id} completed: reached max_steps " in errors["json"]
    assert f"; {len(journal)} records handled" in errors["json"]


def test_a_sink_started_after_the_run_began_still_writes_the_whole_run(fg_home, tmp_path):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, max_steps=600)
    info = registry.load_run(bus_dir(out))
    wait_lines(info.journal_path(), 500)
    sink = fg_sink(fg_home, "json", "--run", info.run_id, "--out", str(tmp_path / "late.jsonl"))
    assert train.wait(180) == 0
    assert sink.wait(60) == 0, sink.stderr.read().decode()
    assert json_lines(tmp_path / "late.jsonl") == [orjson.loads(orjson.dumps(r)) for r in read_journal(info.journal_path())]


def test_fg_train_with_sinks_tail_shows_the_run_in_its_own_terminal(fg_home, tmp_path):
    proc = subprocess.run([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(tmp_path / "run"),
                           "--max-steps", "30", "--sinks", "tail,json"],
                          capture_output=True, text=True, timeout=180, env=env(fg_home))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[step")]
    assert any("loss" in line for line in lines) and lines[-1].endswith("end: completed: reached max_steps (30)")
    assert "it/s" not in proc.stderr and "step/s]" not in proc.stderr  # no progress bar beside the tail
    assert list((tmp_path / "run" / "logs").glob("*.jsonl"))
