"""examples/seed_callbacks.yaml, the seed document's callbacks as written there, run by the real `fg-train`.

The handles start `fg-sink tb`, `json` and `textgen` processes; the run's outputs are read back: the JSON
log (with the experiment metadata, GradLogger's statistics and the generated samples) and the TensorBoard
files in ./runs/experiment_001 (the SummaryWriter's directory, relative to the working directory).

This is the slowest test of the suite: the seed's model (2 layers, 128 wide, batches of 32 blocks of 64)
trains at about one step a second on two CPU cores, and generation runs beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_bus import read_journal, registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "seed_callbacks.yaml"
FG_TRAIN = os.path.join(os.path.dirname(sys.executable), "fg-train")
TIMEOUT = 240  # seconds: about 130 s on two CPU cores
PROMPTS = ["The weather today is", "Machine learning is", "In the future, we will"]


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("seed")
    home = tmp_path_factory.mktemp("seed-fg-home")
    home.chmod(0o700)
    out = cwd / "OUT"
    env = {**os.environ, "FG_HOME": str(home), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([FG_TRAIN, str(SEED), "--var", "pp_config={note: preprocessed}", "--max-steps", "110",
                           "--device", "cpu", "--output-dir", str(out), "--no-progress"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return cwd, out, proc


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def run(seed_run):
    cwd, out, proc = seed_run
    assert proc.returncode == 0, explain(proc)
    info = registry.load_run(next((out / registry.BUS_DIRNAME).iterdir()))
    logs = list((out / "logs").glob("*.jsonl"))
    assert [p.name for p in logs] == [f"{info.run_id}.jsonl"]
    log = [orjson.loads(line) for line in logs[0].read_bytes().splitlines()]
    return cwd, out, info, log


def test_the_seed_example_trains_and_its_sinks_finish(seed_run):
    _, out, proc = seed_run
    assert proc.returncode == 0, explain(proc)
    assert "Done: 110 steps" in proc.stdout, explain(proc)
    for kind in ("tb", "json", "textgen"):
        assert f"fg-sink {kind}: run " in proc.stderr and "completed" in proc.stderr, explain(proc)


def test_the_json_log_is_the_whole_run(run):
    _, _, info, log = run
    assert [r["seq"] for r in log] == list(range(len(log)))  # every seq, no hole, no duplicate
    assert log[-1]["event"] == "end" and log[-1]["status"] == "completed"
    journal = list(read_journal(info.journal_path()))
    assert [r["seq"] for r in journal] == [r["seq"] for r in log]
    assert [r["event"] for r in journal] == [r["event"] for r in log]


def test_the_experiment_metadata_is_in_the_log(run):
    _, _, _, log = run
    experiments = {r["meta"]["source"]: r["meta"] for r in log if r["event"] == "experiment"}
    assert set(experiments) == {"TBLogger", "JsonLogger"}
    json_logger = experiments["JsonLogger"]
    assert json_logger["name"] == "My Experiment"
    assert json_logger["description"] == "Experiment description"
    assert json_logger["config"] == {"note": "preprocessed"}
    tb_logger = experiments["TBLogger"]
    assert tb_logger["name"] == "My Experiment"
    assert tb_logger["description"] == "Testing new architecture"
    assert tb_logger["date"] == "2024-01-01"
    begin = next(r for r in log if r["event"] == "on_train_begin")
    assert begin["meta"]["model"]["factory"] == "trainer.chargpt:CharGPT"
    assert all(r["seq"] > begin["seq"] for r in log if r["event"] == "experiment")


def test_grad_stats_every_25_steps_with_the_tracked_blocks(run):
    _, _, _, log = run
    stats = [r for r in log if r["event"] == "grad_stats"]
    assert [r["global_step"] for r in stats] == [25, 50, 75, 100]
    for record in stats:
        metrics = record["metrics"]
        assert {"grad_norm_total", "grad_norm_max", "grad_norm_min", "grad_norm_mean"} <= set(metrics)
        assert metrics["grad_norm_min"] <= metrics["grad_norm_mean"] <= metrics["grad_norm_max"] \
            <= metrics["grad_norm_total"]
        layers = [k for k in metrics if k.startswith("layer/")]
        assert any(k.startswith("layer/blocks.0.") for k in layers)
        assert any(k.startswith("layer/blocks.1.") for k in layers)
        assert all(k.startswith(("layer/blocks.0", "layer/blocks.1")) for k in layers)
        assert "layer/blocks.0.qkv.weight" in metrics and "layer/tok_emb.weight" not in metrics


def test_textgen_samples_for_step_100(run):
    _, _, _, log = run
    samples = [r for r in log if r["event"] == "textgen"]
    assert sorted((r["global_step"], r["prompt_index"], r["prompt"]) for r in samples) == \
        [(100, i, p) for i, p in enumerate(PROMPTS)]
    # generation_config: max_new_tokens 50, one character each.
    assert all(len(r["text"]) == 50 for r in samples)
    snapshot = next(r for r in log if r["event"] == "snapshot")
    assert snapshot["global_step"] == 100 and all(r["snapshot"] == snapshot["path"] for r in samples)


def test_tensorboard_files_in_the_summary_writers_directory(run):
    cwd, _, info, log = run
    run_dir = cwd / "runs" / "experiment_001" / info.run_id
    assert run_dir.is_dir(), sorted(str(p.relative_to(cwd)) for p in cwd.glob("runs/**/*"))
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    logged = [r for r in log if r["event"] == "on_log" and "loss" in r["metrics"]]
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [r["global_step"] for r in logged]
    assert [e.value for e in loss] == pytest.approx([r["metrics"]["loss"] for r in logged], rel=1e-6)
    grad = ea.Scalars("grad/grad_norm_total")
    stats = [r for r in log if r["event"] == "grad_stats"]
    assert [e.step for e in grad] == [25, 50, 75, 100]
    assert [e.value for e in grad] == pytest.approx([r["metrics"]["grad_norm_total"] for r in stats], rel=1e-6)
    assert {"run/meta", "textgen/sample_0", "textgen/sample_1", "textgen/sample_2"} <= set(tags["tensors"])
    meta = ea.Tensors("run/meta")[0].tensor_proto.string_val[0].decode()
    assert "trainer.chargpt:CharGPT" in meta
    for index, prompt in enumerate(PROMPTS):
        (event,) = ea.Tensors(f"textgen/sample_{index}")
        assert event.step == 100 and prompt in event.tensor_proto.string_val[0].decode()
