"""What the sink processes write, tried as a careless user and a hostile record would: two sinks on one
output, an output that is not a log, outputs others can read, escapes in record text on a terminal, bad
arguments, a full disk, a write that fails. Real `fg-sink` and `fg-train` processes throughout."""

from __future__ import annotations

import json
import os
import pty
import resource
import shutil
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pandas
import pytest
from test_process_faults import BIN, child_sink_pid, env, fg_sink, fg_train, run_dir, scalars, wait_for

from fg_bus import Publisher, read_journal

pytestmark = pytest.mark.timeout(600)  # real processes: minutes on a loaded 2-core machine

EXIT_LOCKED = 7
EXIT_WRITE_FAILED = 8
ESC = b"\x1b"


def umask_022():
    os.umask(0o022)  # a usual login umask: the outputs must be private anyway


def sink_run(fg_home: Path, *args: str, timeout: float = 120, preexec_fn=umask_022,
             **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fg-sink"), *args], capture_output=True, timeout=timeout,
                          env={**env(fg_home), **extra}, preexec_fn=preexec_fn)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_traceback(proc) -> str:
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    assert "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short fg-train run with --sinks json,tb under umask 022: (fg_home, output dir, bus dir, run id)."""
    home = tmp_path_factory.mktemp("fg-home-outputs")
    home.chmod(0o700)
    out = tmp_path_factory.mktemp("outputs") / "run"
    train = fg_train(home, out, "--sinks", "json,tb", max_steps=60, preexec_fn=umask_022)
    assert train.wait(240) == 0, train.stderr.read().decode()[-3000:]
    bus = run_dir(out)
    return home, out, bus, bus.name


def journal_of(bus: Path) -> list[dict]:
    return list(read_journal(bus / "journal.rank0.jsonl"))


# -- one writer per output ----------------------------------------------------------------------------------

def test_a_second_writer_of_a_json_log_or_tb_run_is_refused_and_a_killed_writers_lock_is_free(fg_home, tmp_path):
    out = tmp_path / "run"
    train = fg_train(fg_home, out, "--sinks", "json", max_steps=3000)
    bus = run_dir(out)
    run_id = bus.name
    log, tb_run = out / "logs" / f"{run_id}.jsonl", out / "tb" / run_id
    json_lock, tb_lock = log.with_name(f".{log.name}.lock"), tb_run / "fg-sink.lock"
    holder = wait_for(lambda: child_sink_pid(train.pid, "json"), 240, "fg-train to start its json sink")
    tb_first = fg_sink(fg_home, "tb", "--run", str(bus))  # the default logdir, like fg-train --sinks tb
    wait_for(lambda: json_lock.exists() and json_lock.read_text().split() == [str(holder)], 240, "the json lock")
    wait_for(lambda: tb_lock.exists() and tb_lock.read_text().split() == [str(tb_first.pid)], 240, "the tb lock")

    # The same defaults a second time: refused at once, naming the output and its holder, no traceback.
    second_json = fg_sink(fg_home, "json", "--run", str(bus))
    second_tb = fg_sink(fg_home, "tb", "--run", str(bus))
    for proc, output, pid in ((second_json, log, holder), (second_tb, tb_run, tb_first.pid)):
        assert proc.wait(60) == EXIT_LOCKED
        err = no_traceback(subprocess.CompletedProcess([], proc.returncode, b"", proc.stderr.read()))
        assert str(output) in err and f"pid {pid}" in err and "another sink" in err, err

    # A killed writer's lock is free at once: a new sink takes it and continues where the output ends.
    tb_first.send_signal(signal.SIGKILL)
    tb_first.wait(10)
    tb_again = fg_sink(fg_home, "tb", "--run", str(bus))
    wait_for(lambda: tb_lock.read_text().split() == [str(tb_again.pid)], 240, "the restarted tb sink's lock")
    subprocess.run([str(BIN / "fg-bus"), "ctl", str(bus), "stop"], env=env(fg_home), capture_output=True, timeout=60)
    assert train.wait(180) == 0, train.stderr.read().decode()[-3000:]
    assert tb_again.wait(60) == 0, tb_again.stderr.read().decode()

    records = journal_of(bus)
    table = pandas.read_json(log, lines=True)
    assert len(table) == len(records) and table["seq"].is_unique
    assert list(table["seq"]) == [r["seq"] for r in records]
    steps = [r["global_step"] for r in records if r["event"] == "on_step_end"]
    got = scalars(tb_run)
    assert [s for s, _ in got["train/step_loss"]] == steps  # every point exactly once, none doubled
    assert len(got["train/loss"]) == sum(1 for r in records if r["event"] == "on_log" and "loss" in r["metrics"])


# -- check first, touch nothing that is not ours ------------------------------------------------------------

def test_json_on_a_file_that_is_not_a_log_refuses_and_leaves_it_byte_identical(finished, fg_home, tmp_path):
    home, out, bus, _ = finished
    victim = tmp_path / "optimizer.pt"
    shutil.copy(out / "checkpoint-60" / "optimizer.pt", victim)
    before = victim.read_bytes()
    proc = sink_run(home, "json", "--run", str(bus), "--out", str(victim))
    err = no_traceback(proc)
    assert proc.returncode == 2, err
    assert str(victim) in err and "not a record" in err, err
    assert victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.pt"]  # no lock file left beside it


def test_a_tb_position_file_naming_a_file_elsewhere_truncates_nothing(finished, tmp_path):
    home, out, bus, run_id = finished
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"precious\n" * 100)
    (tmp_path / "tb" / run_id).mkdir(parents=True)
    (tmp_path / "tb" / run_id / "fg-position.json").write_text(json.dumps(
        {"file": "../../notes.txt", "size": 0, "next_seq": 0}))
    proc = sink_run(home, "tb", "--run", str(bus), "--logdir", str(tmp_path / "tb"))
    err = no_traceback(proc)
    assert proc.returncode == 2 and "fg-position.json" in err, err
    assert victim.read_bytes() == b"precious\n" * 100


# -- private outputs ----------------------------------------------------------------------------------------

def test_outputs_are_private_by_default_and_group_readable_on_request(finished, tmp_path):
    home, out, bus, run_id = finished
    # fg-train --sinks: the sinks it started, under umask 022
    log = out / "logs" / f"{run_id}.jsonl"
    tb_files = [p for p in (out / "tb" / run_id).iterdir()]
    assert mode(log) == 0o600 and mode(log.parent) == 0o700
    assert mode(out / "tb") == 0o700 and mode(out / "tb" / run_id) == 0o700
    assert tb_files and all(mode(p) == 0o600 for p in tb_files), {p.name: oct(mode(p)) for p in tb_files}

    for flag, file_mode, dir_mode in (((), 0o600, 0o700), (("--group-readable",), 0o640, 0o750)):
        where = tmp_path / ("group" if flag else "private")
        json_out = where / "new" / "deeper" / "log.jsonl"
        assert sink_run(home, "json", "--run", str(bus), "--out", str(json_out), *flag).returncode == 0
        assert sink_run(home, "tb", "--run", str(bus), "--logdir", str(where / "tb"), *flag).returncode == 0
        assert mode(json_out) == file_mode
        assert mode(where / "new") == dir_mode and mode(where / "new" / "deeper") == dir_mode
        tb_run = where / "tb" / run_id
        assert mode(where / "tb") == dir_mode and mode(tb_run) == dir_mode
        events = list(tb_run.glob("events.out.tfevents.*"))
        assert len(events) == 1 and mode(events[0]) == file_mode


# -- terminal safety ----------------------------------------------------------------------------------------

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"  # retitle the window, clear the screen, C1 CSI, bidi override


def hostile_run(tmp_path: Path) -> Path:
    """A journal written by a real Publisher whose run name and record text carry terminal escapes."""
    bus = tmp_path / "hostile" / "fg-bus" / "evil-run"
    pub = Publisher(bus, "evil-20260101-000000-abcd", name=HOSTILE).start()
    pub.publish("on_train_begin", 0, 0.0, meta={"name": HOSTILE, "num_parameters": 10, "max_steps": 3,
                                               "model": {"factory": HOSTILE}})
    pub.publish("on_log", 1, 0.1, metrics={"loss": 1.0, "learning_rate": 0.1})
    pub.publish("on_log", 1, 0.1, metrics={"eval_" + HOSTILE: HOSTILE, "eval_loss": 2.0})
    pub.publish("on_save", 1, 0.1, checkpoint=HOSTILE)
    pub.publish("textgen", 1, 0.1, prompt=HOSTILE, text=HOSTILE)
    pub.publish("textgen", 1, 0.1, prompt=HOSTILE, text=None, skipped=HOSTILE)
    pub.publish("control", 1, 0.1, cmd=HOSTILE, reason=HOSTILE)
    pub.publish("warning", 1, 0.1, message=HOSTILE)
    pub.close("completed")
    return bus


def on_a_terminal(fg_home: Path, *args: str) -> tuple[int, bytes, bytes]:
    """fg-sink with its stdout on a pseudo-terminal (so the tail paints colour): exit status, screen, stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "fg-sink"), *args], stdout=slave, stderr=subprocess.PIPE, env=env(fg_home))
    os.close(slave)
    screen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    return proc.wait(60), bytes(screen), proc.stderr.read()


def test_tail_shows_escapes_in_records_escaped_never_raw(fg_home, tmp_path):
    bus = hostile_run(tmp_path)
    own_colours = [b"\x1b[36m", b"\x1b[33m", b"\x1b[32m", b"\x1b[35m", b"\x1b[31m", b"\x1b[2m", b"\x1b[0m"]
    code, screen, err = on_a_terminal(fg_home, "tail", "--run", str(bus), "--events",
                                      "on_train_begin,on_log,on_save,textgen,control,warning")
    assert code == 0, err.decode()
    assert b"\x1b[36m" in screen  # colour was on: the tail's own codes still come through
    bare = screen
    for colour in own_colours:
        bare = bare.replace(colour, b"")
    assert ESC not in bare and b"\x07" not in bare and "\x9b".encode() not in bare, bare
    assert "\u202e".encode() not in bare
    assert bare.count(b"\\x1b]0;pwned") >= 8  # each field is shown, escaped: meta, factory, metric, save, ...
    assert ESC not in err

    proc = sink_run(fg_home, "tail", "--run", str(bus), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    for raw in (ESC, b"\x07", "\x9b".encode(), "\u202e".encode()):
        assert raw not in proc.stdout
    shown = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seq"] for r in shown] == [r["seq"] for r in journal_of(bus)]
    begin = next(r for r in shown if r["event"] == "on_train_begin")
    assert begin["meta"]["name"] == HOSTILE  # the same JSON values, only escaped


# -- argument errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, environ, says", [
    (("--dead-after", "0"), {}, "--dead-after"),
    (("--dead-after", "nan"), {}, "--dead-after"),
    (("--from", str(2 ** 70)), {}, "2**63"),
    (("--out", "{foo}.jsonl"), {}, "{run}, {output_dir}"),
    (("--out", "{run"), {}, "placeholders"),
    (("--nice", str(10 ** 20)), {}, "--nice"),
    ((), {"FG_SINK_NICE": "lots"}, "FG_SINK_NICE"),
    (("--wait", "-1"), {}, "--wait"),
])
def test_bad_arguments_are_refused_with_a_message(finished, args, environ, says):
    home, _, bus, _ = finished
    proc = sink_run(home, "json", "--run", str(bus), *args, **environ)
    err = no_traceback(proc)
    assert proc.returncode == 2 and says in err, err


def test_an_unusable_out_is_refused_with_a_message(finished, tmp_path):
    home, _, bus, _ = finished
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    for out in (tmp_path / "a-file" / "log.jsonl", tmp_path / "a-dir"):
        proc = sink_run(home, "json", "--run", str(bus), "--out", str(out))
        err = no_traceback(proc)
        assert proc.returncode == 2 and str(out.parent if out.parent.is_file() else out) in err, err


# -- a full disk --------------------------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        umask_022()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # the hard limit stays open
    return apply


class StderrLines:
    """A process's stderr, read by a thread so the test can wait for a line without blocking."""

    def __init__(self, proc):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in iter(stream.readline, b""):
            self.text += line.decode(errors="replace")

    def done(self) -> str:
        self._thread.join(30)
        return self.text


@pytest.mark.parametrize("kind, limit", [("json", 16_000), ("tb", 4_000)])  # of about 58 and 8.5 KB
def test_a_full_disk_is_said_once_and_the_output_completes_when_room_returns(finished, tmp_path, kind, limit):
    """RLIMIT_FSIZE makes writes past `limit` bytes fail with EFBIG, handled as a full disk; lifting it is the
    space coming back."""
    home, _, bus, run_id = finished
    where = ("--out", str(tmp_path / "log.jsonl")) if kind == "json" else ("--logdir", str(tmp_path / "tb"))
    proc = subprocess.Popen([str(BIN / "fg-sink"), kind, "--run", str(bus), *where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(home), preexec_fn=_file_size_limit(limit))
    err = StderrLines(proc)
    wait_for(lambda: "no room" in err.text, 240, "the sink to say the disk is full")
    assert proc.poll() is None  # waiting, not failed
    assert err.text.count("no room") == 1
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert proc.wait(60) == 0, err.done()
    text = err.done()
    assert "Traceback" not in text and "room again" in text, text
    records = journal_of(bus)
    if kind == "json":
        assert [json.loads(line)["seq"] for line in (tmp_path / "log.jsonl").read_bytes().splitlines()] == \
            [r["seq"] for r in records]
    else:
        steps = [r["global_step"] for r in records if r["event"] == "on_step_end"]
        assert [s for s, _ in scalars(tmp_path / "tb" / run_id)["train/step_loss"]] == steps


def test_a_sink_waiting_for_room_stops_on_sigterm_and_a_restart_completes(finished, tmp_path):
    home, _, bus, _ = finished
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([str(BIN / "fg-sink"), "json", "--run", str(bus), "--out", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(home),
                            preexec_fn=_file_size_limit(16_000))
    err = StderrLines(proc)
    wait_for(lambda: "no room" in err.text, 240, "the sink to say the disk is full")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert "Traceback" not in err.done(), err.text
    assert "stopped by SIGTERM" in err.text, err.text  # not "completed": a record was still held
    assert 0 < log.stat().st_size <= 16_000
    again = sink_run(home, "json", "--run", str(bus), "--out", str(log))
    assert again.returncode == 0, again.stderr.decode()
    assert [json.loads(line)["seq"] for line in log.read_bytes().splitlines()] == [r["seq"] for r in journal_of(bus)]


# -- a write that fails, holes in the stream ----------------------------------------------------------------

FAILING_SINK = '''
import errno
from sinks import Sink

class Failing(Sink):
    kind = "failing"

    def handle(self, record):
        if record["seq"] == 10:
            raise OSError(errno.EIO, "Input/output error", "/mnt/broken/out.csv")
'''


def test_a_write_error_other_than_a_full_disk_stops_with_the_resume_command(finished, tmp_path):
    home, _, bus, _ = finished
    (tmp_path / "failing_sink.py").write_text(FAILING_SINK)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = sink_run(home, "failing_sink:Failing", "--run", str(bus), "--nice", "3", PYTHONPATH=path)
    err = no_traceback(proc)
    assert proc.returncode == EXIT_WRITE_FAILED, err
    assert "/mnt/broken/out.csv" in err and "seq 10" in err, err
    assert f"fg-sink failing_sink:Failing --nice 3 --run {bus}" in err, err  # the command that resumes


def test_a_journal_with_a_hole_is_reported_and_exits_5(finished, tmp_path):
    home, out, bus, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out / "fg-bus", copy / "fg-bus")
    bus_copy = copy / "fg-bus" / bus.name
    journal = bus_copy / "journal.rank0.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:20] + lines[25:]))  # seq 20..24 gone for good
    proc = sink_run(home, "json", "--run", str(bus_copy), "--out", str(tmp_path / "log.jsonl"))
    err = no_traceback(proc)
    assert proc.returncode == 5 and "MISSING" in err and "20-24" in err, err

