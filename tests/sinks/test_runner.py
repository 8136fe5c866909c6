"""The sink runner with real runs: records a sink cannot handle are skipped and counted; --follow stays
for the next run; SIGTERM stops a waiting sink cleanly."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from fg_bus import Publisher, registry
from sinks.base import Sink
from sinks.runner import _Stop, follow_run

BIN = Path(sys.executable).parent


class Picky(Sink):
    kind = "picky"

    def __init__(self):
        self.seen = []

    def handle(self, record):
        if record["event"] == "bad":
            raise ValueError("cannot handle this one")
        self.seen.append(record["seq"])


def ended_run(tmp_path, events) -> registry.RunInfo:
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r", registry.new_run_id("r")).start()
    for event in events:
        pub.publish(event, 1, 0.0)
    pub.close()
    return registry.resolve(pub.run_id)


def test_a_record_the_sink_cannot_handle_is_skipped_and_counted(tmp_path, caplog):
    info = ended_run(tmp_path, ["on_log", "bad", "on_log"])
    sink = Picky()
    summary = follow_run(sink, info, "start", _Stop(), dead_after=5)
    assert sink.seen == [0, 2, 3]  # 3 is the end record
    assert (summary.handled, summary.skipped, summary.status) == (3, 1, "completed")
    assert "cannot handle this one" in caplog.text
    assert "1 malformed skipped" in summary.line("picky")


def test_follow_stays_for_the_next_run_and_sigterm_stops_it_cleanly(tmp_path, fg_home):
    env = {**os.environ, "FG_HOME": str(fg_home)}
    sink = subprocess.Popen([str(BIN / "fg-sink"), "json", "--follow", "--out", str(tmp_path / "{run}.jsonl")],
                            stderr=subprocess.PIPE, env=env)
    # Handshake: the sink says it is waiting before the first run starts (as a user starts it first).
    assert select.select([sink.stderr], [], [], 60)[0], "the sink never said it was waiting"
    assert b"waiting for a run" in sink.stderr.readline()
    runs = []
    for _ in range(2):
        pub = Publisher(tmp_path / "out" / "fg-bus" / f"r{len(runs)}", registry.new_run_id("f")).start()
        for step in range(5):
            pub.publish("on_log", step, 0.0, metrics={"loss": 1.0})
        pub.close()
        runs.append(pub.run_id)
        deadline = time.monotonic() + 30
        path = tmp_path / f"{pub.run_id}.jsonl"
        while not (path.exists() and path.read_bytes().count(b"\n") == 6):
            assert time.monotonic() < deadline, f"{path} not complete"
            assert sink.poll() is None
            time.sleep(0.05)
    for run_id in runs:
        lines = (tmp_path / f"{run_id}.jsonl").read_bytes().splitlines()
        assert [orjson.loads(line)["seq"] for line in lines] == list(range(6))
    sink.send_signal(signal.SIGTERM)
    assert sink.wait(15) == 128 + signal.SIGTERM
    err = sink.stderr.read().decode()
    assert all(f"run {r} completed; 6 records handled" in err for r in runs)
