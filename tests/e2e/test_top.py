"""`fg-bus top` against a real `fg-train`: `--once` frames (every run, one run), and the live dashboard
driven in a real terminal (tmux send-keys / capture-pane): select, detail, save, stop with its
confirmation, quit with the terminal restored."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.cells import cell_len

from fg_bus import read_journal
from test_bus_e2e import Train

BIN = Path(sys.executable).parent
WAIT = 120  # s: every wait is bounded, and generous (a loaded CI machine)


def wait_until(what: str, check, timeout: float = WAIT, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def top_once(env: dict, *args: str) -> str:
    proc = subprocess.run([str(BIN / "fg-bus"), "top", *args, "--once", "--width", "80"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout  # piped: plain text, no colour codes
    assert all(cell_len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout
    return proc.stdout


def events(info, name: str) -> list[dict]:
    return [r for r in read_journal(info.journal_path()) if r["event"] == name]


@pytest.fixture
def train(tmp_path, fg_home):
    started = []

    def start(*args, **kwargs):
        t = Train(tmp_path, fg_home, *args, **kwargs)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def test_once_shows_the_runs_table_and_one_run_in_detail_then_the_run_dead(train):
    t = train("--system-interval", "0.2", max_steps=100_000)
    info = t.run_info()
    wait_until("a system record and an evaluation", lambda: events(info, "system") and events(info, "on_evaluate"))
    table = top_once(t.env)
    row = next(line for line in table.splitlines() if line.startswith(info.run_id))
    assert re.search(r"\blive\b", row) and re.search(r"\d+/100000", row), table
    assert "RUN" in table and "STATUS" in table and "PROGRESS" in table and "LOSS" in table
    detail = top_once(t.env, info.run_id)
    assert detail.startswith(info.run_id) and " live " in detail.splitlines()[0], detail
    for expected in ("loss", "eval", "lr ", "grad_norm", "throughput", "tok/s", "steps/s", "ETA", "r0  cpu",
                     "events"):
        assert expected in detail, f"{expected!r} missing in:\n{detail}"
    assert "⠀" not in detail and re.search("[\u2801-\u28ff]", detail), detail  # braille charts
    t.proc.kill()
    t.proc.wait(30)
    after = top_once(t.env)
    row = next(line for line in after.splitlines() if line.startswith(info.run_id))
    assert re.search(r"\bdead\b", row), after
    assert "dead" in top_once(t.env, info.run_id).splitlines()[0]
    # piped into a reader that goes away (`| head`): quiet, exit 0
    proc = subprocess.Popen([str(BIN / "fg-bus"), "top", info.run_id, "--once", "--width", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=t.env)
    proc.stdout.close()
    assert proc.wait(60) == 0 and proc.stderr.read() == b""


class Tmux:
    """A tmux server on a private socket, one 80x24 session."""

    def __init__(self, env: dict, command: str):
        self.socket = f"fgtop-{os.getpid()}-{secrets.token_hex(3)}"
        self.env = env
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", command)

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30,
                              env=self.env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def wait_for(self, what: str, predicate) -> str:
        seen = []

        def check():
            seen[:] = [self.screen()]
            return seen[0] if predicate(seen[0]) else None

        try:
            return wait_until(what, check)
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen:\n{seen[0] if seen else ''}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30, env=self.env)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: the terminal test needs it")
def test_the_dashboard_in_a_real_terminal_selects_saves_stops_and_quits_restoring_the_terminal(train):
    t = train("--system-interval", "0.5", max_steps=100_000)
    info = t.run_info()
    # After top exits, the pane's shell reports its exit status and the terminal's modes (cbreak undone).
    shell = (f"{BIN / 'fg-bus'} top; echo \"top exited $?\"; stty -a | tr ' ;' '\\n\\n' | "
             "grep -x -e icanon -e -icanon -e echo -e -echo; sleep 600")
    term = Tmux({**t.env, "TERM": "xterm-256color", "SHELL": "/bin/sh"}, shell)
    try:
        term.wait_for("the run in the table", lambda s: any(line.startswith(info.run_id) and " live " in line
                                                            for line in s.splitlines()))
        term.keys("Enter")
        term.wait_for("the detail view", lambda s: s.startswith(info.run_id) and "esc back" in s and "loss" in s)
        term.keys("s")
        # the outcome stays in the status line for a while (20 s): looked for first
        term.wait_for("the outcome in the status line", lambda s: f"save applied by run {info.run_id}" in s)
        saved = wait_until("the save applied", lambda: [r for r in events(info, "control")
                                                        if r["cmd"] == "save" and r.get("applied")])
        assert saved[0]["source"] == "fg-bus top"
        step = saved[0]["global_step"]
        wait_until("its checkpoint", lambda: (t.out / f"checkpoint-{step}" / "trainer_state.json").is_file())
        term.keys("x")
        term.wait_for("the confirmation", lambda s: "y/n" in s)
        assert t.proc.poll() is None  # nothing sent before the answer
        term.keys("y")
        assert t.wait(WAIT) == 0, t.output()
        stopped = [r for r in events(info, "control") if r["cmd"] == "stop" and r.get("applied")]
        assert len(stopped) == 1 and stopped[0]["source"] == "fg-bus top"
        term.wait_for("the run shown ended", lambda s: re.search(r"\bstopped\b", s.splitlines()[0]))
        term.wait_for("why it ended", lambda s: "ended stopped: stop from fg-bus top, by " in s)
        term.keys("Escape")
        term.wait_for("the table again", lambda s: "STATUS" in s and "PROGRESS" in s)
        term.keys("q")
        screen = term.wait_for("top to exit", lambda s: "top exited" in s)
        assert "top exited 0" in screen, screen
        modes = screen.split("top exited 0", 1)[1].split()
        assert "icanon" in modes and "echo" in modes, screen  # the terminal is back in its normal mode
        assert "esc back" not in screen and "enter detail" not in screen  # the dashboard's screen is gone
    finally:
        term.close()
