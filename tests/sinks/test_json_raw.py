"""`fg-sink json` through the raw path (journal and live lines copied through after a check on their bytes),
against a real Publisher, as real `fg-sink` processes: the output is the journal's lines byte for byte
(what `encode(record)` per record gave before), a sink killed with SIGKILL mid-run and restarted neither
duplicates nor misses a line, and a malformed journal line is still refused with a reason."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fg_bus import Publisher, Subscriber, read_journal, registry
from fg_bus.records import encode
from sinks.json_sink import JsonSink

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent


def fg_sink(fg_home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-sink"), "json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def journal_lines(bus_dir: Path) -> bytes:
    """What the sink wrote before the raw path: each record of the journal as `encode` writes it."""
    return b"".join(encode(record) + b"\n" for record in read_journal(bus_dir / "journal.rank0.jsonl"))


def publish_mixed(pub: Publisher, first: int, n: int) -> None:
    """Records of every shape a JSON log sees: non-finite metrics, text with quotes, newlines, controls and
    non-ASCII, a checkpoint, an event name inside a string."""
    for i in range(first, first + n):
        if i % 97 == 0:
            pub.publish("on_save", i, checkpoint=f"/tmp/ckpt-{i}")
        elif i % 89 == 0:
            pub.publish("textgen", i, prompt='say "event":"end"\n', text="héllo \x1b[31m\u2028 ☃")
        else:
            pub.publish("on_step_end", i, i / 100, metrics={"loss": math.nan if i % 50 == 0 else 1.0 / (i + 1),
                                                            "grad_norm": math.inf if i % 70 == 0 else 0.5})


def test_the_raw_output_is_the_records_as_encode_writes_them(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("raw")).start()
    publish_mixed(pub, 0, 3000)
    pub.close()
    out = tmp_path / "log.jsonl"
    proc = fg_sink(fg_home, "--run", str(pub.bus_dir), "--out", str(out))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out.read_bytes() == journal_lines(pub.bus_dir)
    assert b"3001 records handled" in err, err.decode()


def test_a_live_raw_subscriber_hands_out_the_journal_bytes(fg_home, tmp_path):
    """Replay (a chunk at a time) then live (a line at a time), and the end record through the decoding path:
    the RawLines join to the journal's bytes, with seqs that follow on."""
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("raw"), heartbeat_interval=0.2).start()
    try:
        publish_mixed(pub, 0, 5000)
        journal = pub.bus_dir / "journal.rank0.jsonl"
        wait_for(lambda: journal.read_bytes().count(b"\n") >= 5000, 60, "the journal to hold 5000 records")
        sub = Subscriber(pub.run_id, from_seq=0, dead_after=30, raw=True)
        got = []
        while sum(b.last_seq - b.first_seq + 1 for b in got) < 5000:
            got += sub.poll(0.5)
        publish_mixed(pub, 5000, 500)
    finally:
        pub.close()
    got += list(sub)
    assert [b.first_seq for b in got[1:]] == [b.last_seq + 1 for b in got[:-1]]
    assert got[0].first_seq == 0 and got[-1].last_seq == 5500 and sub.status == "completed"
    assert len(got) < 5500  # the replay came in chunks, not a line at a time
    assert b"".join(b.data for b in got) == journal_lines(pub.bus_dir)
    assert sub.stats.malformed == {}


def test_a_json_sink_sigkilled_mid_run_and_restarted_writes_each_line_once(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("raw"), heartbeat_interval=0.2).start()
    out = tmp_path / "log.jsonl"
    try:
        publish_mixed(pub, 0, 20_000)
        sink = fg_sink(fg_home, "--run", str(pub.bus_dir), "--out", str(out), "--dead-after", "30")
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 120, "the sink to write")
        published = 20_000
        while sink.poll() is None and published < 200_000:  # live records while it writes, up to the kill
            publish_mixed(pub, published, 2000)
            published += 2000
            if out.stat().st_size > 2 << 20:
                break
        sink.send_signal(signal.SIGKILL)
        sink.wait(30)
        written = out.read_bytes()
        assert written and b"\n" in written
        publish_mixed(pub, published, 3000)  # while no sink runs
        restarted = fg_sink(fg_home, "--run", str(pub.bus_dir), "--out", str(out), "--dead-after", "30")
        publish_mixed(pub, published + 3000, 3000)  # live, to the restarted one
    finally:
        pub.close()
    _, err = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, err.decode()
    data = out.read_bytes()
    assert data == journal_lines(pub.bus_dir)  # every line once, in seq order, nothing torn
    assert data.startswith(written[:written.rfind(b"\n") + 1])  # what was written before the kill was kept


def test_a_garbled_journal_line_is_refused_with_its_reason_and_counted_as_a_hole(fg_home, tmp_path):
    pub = Publisher(tmp_path / "out" / "fg-bus" / "r1", registry.new_run_id("raw")).start()
    publish_mixed(pub, 0, 300)
    pub.close()
    path = pub.bus_dir / "journal.rank0.jsonl"
    data = path.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
    path.write_bytes(data[:starts[120]] + b"#" * (starts[121] - starts[120] - 1) + data[starts[121] - 1:])
    out = tmp_path / "log.jsonl"
    proc = fg_sink(fg_home, "--run", str(pub.bus_dir), "--out", str(out))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err.decode()  # records missing from the output: said in the exit status
    assert b"1 malformed skipped" in err and b"MISSING for good (seq 120" in err, err.decode()
    assert out.read_bytes() == journal_lines(pub.bus_dir)  # the other 300 records, as before


def test_json_sink_handle_raw_syncs_at_a_checkpoint_and_counts_lines(tmp_path):
    sink = JsonSink(out=str(tmp_path / "log.jsonl"))
    info = registry.RunInfo(tmp_path / "out" / "fg-bus" / "r", {"run_id": "r"})
    info.bus_dir.mkdir(parents=True)
    sink.open_run(info)
    synced = []
    sink._sync = lambda: synced.append(sink.written)
    line = b'{"v":1,"run":"r","rank":0,"seq":%d,"timestamp":"t","event":"%s"}\n'
    sink.handle_raw(line % (0, b"on_log") + line % (1, b"on_log"), 0, 0, 1)
    sink.handle_raw(line % (2, b"on_save"), 0, 2, 2)
    assert sink.written == 3 and synced == [3]
    sink.close()
    assert (tmp_path / "log.jsonl").read_bytes().count(b"\n") == 3


def test_a_large_write_goes_straight_to_the_file_and_keeps_what_a_full_disk_refused(tmp_path, monkeypatch):
    from sinks import _output
    out = _output.AppendFile(tmp_path / "log.jsonl", buffer_bytes=1024)
    piece = b"x" * 3000 + b"\n"
    out.write(piece)  # past the buffer: written at once, nothing buffered
    assert out.pending == 0 and out.size == len(piece) == (tmp_path / "log.jsonl").stat().st_size
    real_write, calls = os.write, []

    def short_then_full(fd, data):  # the disk takes 100 bytes, then is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:100]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_output.os, "write", short_then_full)
    with pytest.raises(OSError, match="log.jsonl"):
        out.write(piece)
    assert out.size == len(piece) + 100 and out.pending == len(piece) - 100 and out.tell() == 2 * len(piece)
    monkeypatch.setattr(_output.os, "write", real_write)  # room again: the rest goes out, once
    out.flush()
    out.close()
    assert (tmp_path / "log.jsonl").read_bytes() == piece * 2
