"""Commands whose output is piped into `head` end quietly: exit 0, no BrokenPipeError, nothing on stderr
but the usual. The reader closes the pipe after one line, while a long run is still being written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import python_bin_dir
from fg_bus import registry
from fg_bus.publisher import Publisher


@pytest.fixture
def long_run(tmp_path):
    """An ended run of 20,000 records: far more than a pipe buffer holds."""
    publisher = Publisher(tmp_path / "bus", registry.new_run_id("pipe")).start()
    for i in range(20_000):
        publisher.publish("on_log", i, metrics={"loss": 1.0 / (i + 1), "note": "x" * 80})
    publisher.close()
    return publisher


@pytest.mark.parametrize("command", ["fg-bus cat", "fg-sink tail"])
def test_output_piped_into_head_ends_quietly(long_run, command):
    args = ({"fg-bus cat": [str(Path(python_bin_dir()) / "fg-bus"), "cat", long_run.run_id],
             "fg-sink tail": [sys.executable, "-m", "sinks", "tail", "--run", str(long_run.bus_dir)]})[command]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does once it has its line
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert first, "no output at all"
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr and b"Broken pipe" not in stderr, stderr
