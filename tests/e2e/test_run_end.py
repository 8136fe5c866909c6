"""fg-train's closing lines, from real runs: why the run ended, where each sink wrote (read back: the files
are there), and for a run that can go on, the command that resumes it; a failed run keeps its traceback and
its run.json says what raised."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson

from fg_bus import registry

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).with_name("run_end.yaml")


def fg_train(tmp_path: Path, fg_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "fg-train"), str(CONFIG), "--device", "cpu", "--output-dir",
                           str(tmp_path / "out"), "--no-progress", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=300)


def closing_lines(text: str) -> dict[str, str]:
    """The `  label:  value` lines of fg-train's closing block."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"^  ([a-z][a-z ]*[a-z]):\s+(.+)$", line)
        if match:
            out.setdefault(match[1], match[2])
    return out


def the_run(tmp_path: Path) -> registry.RunInfo:
    [run_file] = (tmp_path / "out" / "fg-bus").glob("*/run.json")
    return registry.load_run(run_file.parent)


def test_a_completed_run_says_so_and_where_each_sink_wrote(tmp_path, fg_home):
    proc = fg_train(tmp_path, fg_home, "--max-steps", "20", "--var", "fail_step=0", "--sinks", "tb,json,alert")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = closing_lines(proc.stdout)
    info = the_run(tmp_path)
    assert lines["ended"] == "completed: reached max_steps (20)", proc.stdout
    assert info.status == "completed" and info.end_reason["text"] == "reached max_steps (20)"
    tb, log, alerts = Path(lines["tensorboard"]), Path(lines["json log"]), lines["alerts"]
    assert tb == tmp_path / "out" / "tb" / info.run_id and any(tb.glob("events.out.tfevents.*")), lines
    assert log == tmp_path / "out" / "logs" / f"{info.run_id}.jsonl"
    assert orjson.loads(log.read_bytes().splitlines()[-1])["status"] == "completed"
    assert alerts == f"{tmp_path / 'out' / 'alerts' / info.run_id}.jsonl  (none raised)"
    assert lines["journal"].startswith(str(info.bus_dir))
    assert "resume" not in lines  # nothing to continue


def test_a_failed_run_keeps_its_traceback_and_says_what_raised(tmp_path, fg_home):
    proc = fg_train(tmp_path, fg_home, "--max-steps", "150", "--var", "fail_step=120", "--sinks", "json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback (most recent call last)" in err and "RuntimeError: batch 120 holds" in err
    assert "fg-train: failed at step 120" in err, err
    lines = closing_lines(err)
    assert lines["ended"] == "failed: RuntimeError: batch 120 holds a token id out of range", err
    assert lines["raised at"].startswith(f"{CONFIG.with_name('run_end_callbacks.py')}:"), lines
    assert lines["raised at"].endswith("in check_batch")
    # a checkpoint at step 100 exists: the exact command that goes on from it, every option kept, last
    assert lines["checkpoint"] == f"{tmp_path / 'out' / 'checkpoint-100'}  (saved last: --resume continues from it)"
    assert err.rstrip().splitlines()[-1] == f"  resume:      {lines['resume']}"
    assert lines["resume"] == (f"fg-train {CONFIG} --device cpu --output-dir {tmp_path / 'out'} --no-progress "
                               "--max-steps 150 --var fail_step=120 --sinks json --resume"), lines
    info = the_run(tmp_path)
    assert info.status == "failed"
    exc = info.end_reason["exception"]
    assert exc["type"] == "RuntimeError" and exc["traceback"][-1]["function"] == "check_batch"
    assert exc["traceback"][-2]["function"] == "on_step_end"
    # the json sink finished the stream: its last record is the end, with the reason
    log = Path(lines["json log"])
    end = orjson.loads(log.read_bytes().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == info.end_reason


def test_alert_logger_starts_the_alert_sink_with_its_deliveries(tmp_path):
    from trainer import AlertLogger

    logger = AlertLogger(webhook="http://127.0.0.1:9/hook", webhook_format="slack", exec_cmd="notify-send x")
    logger.options, logger.run_dir = logger.sink_args(None), str(tmp_path / "run")
    assert logger.resume_command.split()[:4] == ["fg-sink", "alert", "--run", str(tmp_path / "run")]
    assert logger.options == ["--webhook", "http://127.0.0.1:9/hook", "--webhook-format", "slack",
                              "--exec", "notify-send x"]
    assert AlertLogger().sink_args(None) == [] and logger.output_template() == "{output_dir}/alerts/{run}.jsonl"
