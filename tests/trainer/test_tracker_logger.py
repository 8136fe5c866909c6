"""`TrackerLogger`: what fg-train's closing lines say about where each tracker holds the run, read from the
environment the sink process inherits, with no credential shown."""

from __future__ import annotations

import pytest

from trainer.sink_callbacks import TrackerLogger

ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_PROJECT", "WANDB_MODE", "TRACKIO_DIR",
       "TRACKIO_PROJECT", "HF_HOME")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def started(kind: str, tmp_path) -> TrackerLogger:
    sink = TrackerLogger(kind)
    sink.run_dir = tmp_path / "no-such-run"  # as if started; run.json unreadable: no output dir known
    return sink


def test_nothing_before_the_sink_started():
    assert TrackerLogger("mlflow").output is None


def test_mlflow_uri_without_credentials_and_the_experiment(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.com:5000/api?token=abc")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    sink = started("mlflow", tmp_path)
    assert sink.output_label == "MLflow"
    assert sink.output == "https://mlflow.example.com:5000/api, experiment sweep"
    clean_env.delenv("MLFLOW_TRACKING_URI")
    clean_env.delenv("MLFLOW_EXPERIMENT_NAME")
    assert sink.output == "MLflow's default tracking URI (MLFLOW_TRACKING_URI unset), experiment Default"


def test_wandb_project_mode_and_files(clean_env, tmp_path):
    clean_env.setenv("WANDB_DIR", str(tmp_path))
    clean_env.setenv("WANDB_MODE", "offline")
    sink = started("wandb", tmp_path)
    assert sink.output == f"project huggingface (offline), files in {tmp_path / 'wandb'}"


def test_trackio_store_from_the_environment_or_hf_home(clean_env, tmp_path):
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    sink = started("trackio", tmp_path)
    assert sink.output == f"store {tmp_path / 'hf' / 'trackio'}"
    clean_env.setenv("TRACKIO_DIR", str(tmp_path / "store"))
    clean_env.setenv("TRACKIO_PROJECT", "p")
    assert sink.output == f"store {tmp_path / 'store'}, project p"


def test_an_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="choose mlflow, wandb, trackio"):
        TrackerLogger("neptune")
