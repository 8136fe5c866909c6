"""The installed `fg-sink` console script, run as a subprocess against a private FG_HOME."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fg_bus import registry
from fg_bus.records import decode, encode
from fg_bus.registry import RunInfo
from conftest import same, dead_pid, explain

FG_SINK = os.path.join(os.path.dirname(sys.executable), "fg-sink")
TIMEOUT = 30  # seconds per command (each takes about one)
T0 = 1_767_225_600.0  # 2026-01-01


def fg_sink(fg_home: Path, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, FG_HOME=str(fg_home), PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run([FG_SINK, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)






def ended_run(root: Path, run_id: str) -> tuple[RunInfo, list[dict]]:
    """A completed run, registered, with its journal; its trainer is gone (a dead pid, no endpoints)."""
    bus_dir = root / registry.BUS_DIRNAME / run_id
    bus_dir.mkdir(parents=True)
    pid = dead_pid()
    data = {"run_id": run_id, "name": "done", "pid": pid, "host": socket.gethostname(), "started": T0,
            "status": registry.COMPLETED, "world_size": 1, "last_step": 2,
            "ranks": {"0": {"pub": f"ipc:///nonexistent/{run_id}/pub",
                            "replay": f"ipc:///nonexistent/{run_id}/replay",
                            "inbox": f"ipc:///nonexistent/{run_id}/inbox", "pid": pid}}}
    registry.write_json_atomic(bus_dir / registry.RUN_FILE, data)
    info = RunInfo(bus_dir, data)
    registry.register(info)
    events = [("on_train_begin", 0, {}), ("on_step_end", 1, {"loss": 2.0}), ("on_log", 1, {"loss": 2.0, "lr": 0.1}),
              ("on_step_end", 2, {"loss": math.nan}), ("on_log", 2, {"loss": math.nan, "grad_norm": math.inf}),
              ("on_save", 2, {}), ("on_evaluate", 2, {"eval_loss": 1.5}), ("on_train_end", 2, {}), ("end", 2, {})]
    recs = []
    for seq, (event, step, metrics) in enumerate(events):
        record = {"v": 1, "run": run_id, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
                  "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics}
        if event == "end":
            record["status"] = registry.COMPLETED
        recs.append(record)
    info.journal_path(0).write_bytes(b"".join(encode(r) + b"\n" for r in recs))
    return info, recs



def decode_lines(data: str | bytes) -> list[dict]:
    return [decode(line) for line in data.splitlines() if line.strip()]


# -- usage errors -----------------------------------------------------------------------------------------

def test_help(fg_home):
    proc = fg_sink(fg_home, "--help")
    assert proc.returncode == 0, explain(proc)
    for kind in ("tb", "json", "tail", "module:ClassName"):
        assert kind in proc.stdout, kind
    assert "--from" in proc.stdout and "--option" in proc.stdout


def test_a_sinks_help_shows_its_options_only_and_another_sinks_option_is_refused_by_name(fg_home):
    tb = fg_sink(fg_home, "tb", "--help")
    assert tb.returncode == 0 and tb.stdout.startswith("usage: fg-sink tb [options]"), explain(tb)
    assert "--logdir" in tb.stdout and "--run" in tb.stdout  # its own and the common ones
    assert "--temperature" not in tb.stdout and "--out" not in tb.stdout and "--webhook" not in tb.stdout
    textgen = fg_sink(fg_home, "--run", "latest", "textgen", "--help")  # options before the kind too
    assert "--temperature" in textgen.stdout and "--logdir" not in textgen.stdout, explain(textgen)
    refused = fg_sink(fg_home, "tb", "--temperature", "0.5")
    assert refused.returncode == 2, explain(refused)
    assert "--temperature is an option of `fg-sink textgen`, not of `fg-sink tb`" in refused.stderr
    assert "Traceback" not in refused.stderr
    unknown = fg_sink(fg_home, "json", "--no-such-option=1")
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-option=1" in unknown.stderr


def test_unknown_kind(fg_home):
    proc = fg_sink(fg_home, "bogus")
    assert proc.returncode == 2, explain(proc)
    assert "bogus" in proc.stderr
    for kind in ("json", "tb", "tail", "null"):
        assert kind in proc.stderr, kind
    assert "module:ClassName" in proc.stderr


def test_from_must_be_start_now_or_a_seq(fg_home):
    proc = fg_sink(fg_home, "json", "--from", "abc")
    assert proc.returncode == 2, explain(proc)
    assert "--from" in proc.stderr and "abc" in proc.stderr


def test_option_must_be_key_value(fg_home):
    proc = fg_sink(fg_home, "my_module:MySink", "--option", "novalue")
    assert proc.returncode == 2, explain(proc)
    assert "--option" in proc.stderr and "KEY=VALUE" in proc.stderr


def test_a_user_sink_that_does_not_import(fg_home):
    proc = fg_sink(fg_home, "no_such_module_xyz:Sink")
    assert proc.returncode == 2, explain(proc)
    assert "no_such_module_xyz" in proc.stderr and "import" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_user_sink_class_that_does_not_exist(fg_home):
    proc = fg_sink(fg_home, "sinks.base:NoSuchSink")
    assert proc.returncode == 2, explain(proc)
    assert "NoSuchSink" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_that_does_not_exist(fg_home):
    proc = fg_sink(fg_home, "json", "--run", "some-missing-id")
    assert proc.returncode == 2, explain(proc)
    assert "no run" in proc.stderr and "some-missing-id" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wait_gives_up_when_no_run_starts(fg_home, tmp_path):
    started = time.monotonic()
    proc = fg_sink(fg_home, "json", "--wait", "0.5", "--out", str(tmp_path / "x.jsonl"))
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, explain(proc)
    assert elapsed < 120, elapsed  # gave up after its --wait, not a hang (start-up is slow on a loaded machine)
    assert "no run started" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


# -- an ended run -----------------------------------------------------------------------------------------

def test_json_of_an_ended_run_then_again(fg_home, tmp_path):
    info, recs = ended_run(tmp_path / "out", "done-20260101-000000-aaaa")
    out = tmp_path / "log.jsonl"
    proc = fg_sink(fg_home, "json", "--run", info.run_id, "--out", str(out))
    assert proc.returncode == 0, explain(proc)
    got = decode_lines(out.read_bytes())
    assert [r["seq"] for r in got] == list(range(len(recs)))
    assert same(got, recs)
    assert math.isnan(got[3]["metrics"]["loss"]) and got[4]["metrics"]["grad_norm"] == math.inf
    assert f"{len(recs)} records handled" in proc.stderr
    assert "completed" in proc.stderr and info.run_id in proc.stderr
    written = out.read_bytes()

    # run again: it resumes at the end of its file and adds nothing
    proc = fg_sink(fg_home, "json", "--run", info.run_id, "--out", str(out))
    assert proc.returncode == 0, explain(proc)
    assert out.read_bytes() == written
    assert "0 records handled" in proc.stderr


def test_json_default_output_and_run_by_directory(fg_home, tmp_path):
    info, recs = ended_run(tmp_path / "out", "done-20260101-000000-bbbb")
    proc = fg_sink(fg_home, "json", "--run", str(tmp_path / "out"))
    assert proc.returncode == 0, explain(proc)
    out = tmp_path / "out" / "logs" / f"{info.run_id}.jsonl"  # {output_dir}/logs/{run}.jsonl
    assert same(decode_lines(out.read_bytes()), recs)


def test_json_from_a_seq(fg_home, tmp_path):
    info, recs = ended_run(tmp_path / "out", "done-20260101-000000-cccc")
    out = tmp_path / "from5.jsonl"
    proc = fg_sink(fg_home, "json", "--run", info.run_id, "--out", str(out), "--from", "5")
    assert proc.returncode == 0, explain(proc)
    assert [r["seq"] for r in decode_lines(out.read_bytes())] == list(range(5, len(recs)))


def test_tail_json_of_an_ended_run(fg_home, tmp_path):
    info, recs = ended_run(tmp_path / "out", "done-20260101-000000-dddd")
    proc = fg_sink(fg_home, "tail", "--json", "--run", info.run_id)
    assert proc.returncode == 0, explain(proc)
    assert same(decode_lines(proc.stdout), recs)


def test_a_user_sink_receives_the_records(fg_home, tmp_path):
    info, recs = ended_run(tmp_path / "out", "done-20260101-000000-eeee")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fg_test_recorder.py").write_text(textwrap.dedent("""
        import json

        from fg_bus import records
        from sinks import Sink


        class Recorder(Sink):
            kind = "recorder"

            def __init__(self, path, label="none"):
                self.path = path
                self.label = label
                self.file = open(path, "ab")

            def open_run(self, info):
                self.file.write(json.dumps({"label": self.label, "run": info.run_id}).encode() + b"\\n")
                return None

            def handle(self, record):
                self.file.write(records.encode(record) + b"\\n")

            def end_run(self, status):
                self.file.write(json.dumps({"end_run": status}).encode() + b"\\n")

            def close(self):
                if not self.file.closed:
                    self.file.write(b'{"closed": true}\\n')
                    self.file.close()
    """))
    out = tmp_path / "recorded.jsonl"
    pythonpath = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    proc = fg_sink(fg_home, "fg_test_recorder:Recorder", "--run", info.run_id,
                   "--option", f"path={out}", "--option", "label=hello world",
                   extra_env={"PYTHONPATH": pythonpath})
    assert proc.returncode == 0, explain(proc)
    lines = out.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"label": "hello world", "run": info.run_id}
    assert same(decode_lines(b"\n".join(lines[1:-2])), recs)
    assert json.loads(lines[-2]) == {"end_run": "completed"}
    assert json.loads(lines[-1]) == {"closed": True}
    assert "fg-sink recorder" in proc.stderr and f"{len(recs)} records handled" in proc.stderr
