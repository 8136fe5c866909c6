"""`fg-bus top`: a full-screen terminal dashboard of this user's runs, or of one run in detail.

Built on rich (one renderable tree serves the live screen and `--once`'s plain frame; the few keys are
read here, from the terminal in cbreak mode). Three threads, each owning what it touches:

- the follower thread (`_top_follow.Follower`) owns every Subscriber and feeds one `RunView` per run;
- the main thread reads keys and redraws at most `FPS` times a second, whatever the event rate;
- a control thread per request (`fg_bus.control.send_control`, as `fg-bus ctl` does), whose outcome shows
  in the status line.

Memory is bounded: RunView thins its series and keeps the last samples and events only.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque

import zmq
from rich.console import Console, RenderableType
from rich.live import Live
from rich.segment import Segment
from rich.text import Text

from . import _top_render as render
from . import control, registry
from ._top_follow import LIVE, Follower, Tracked

logger = logging.getLogger(__name__)

FPS = 4                  # redraws a second at most, however fast records come
KEY_REDRAW_S = 0.05      # after a key: redrawn at once, but not more often than this
CONTROL_TIMEOUT = 30.0   # s; off the drawing thread, so a loaded machine gets time to answer
NOTE_SHOWN_S = 20.0      # a control's outcome, or a warning logged meanwhile, stays this long in the status line


# -- keys ------------------------------------------------------------------------------------------------------

_SEQUENCES = {b"\x1b[A": "up", b"\x1bOA": "up", b"\x1b[B": "down", b"\x1bOB": "down", b"\r": "enter",
              b"\n": "enter", b"\x7f": "backspace", b"\x08": "backspace", b"\x03": "ctrl-c"}


def parse_keys(data: bytes) -> list[str]:
    """Key names in bytes read from a terminal: "up", "down", "enter", "esc", "backspace", or the character."""
    keys, i = [], 0
    while i < len(data):
        for seq, name in _SEQUENCES.items():
            if data.startswith(seq, i):
                keys.append(name)
                i += len(seq)
                break
        else:
            if data[i] == 0x1b:
                if data.startswith((b"[", b"O"), i + 1):  # some other escape sequence: skip it whole
                    j = i + 2
                    while j < len(data) and not 0x40 <= data[j] <= 0x7e:
                        j += 1
                    i = j + 1
                else:
                    keys.append("esc")
                    i += 1
                continue
            keys.append(chr(data[i]) if data[i] < 0x80 else "")
            i += 1
    return [k for k in keys if k]


class KeyReader:
    """The terminal in cbreak mode (keys arrive one by one, not echoed; Ctrl-C still interrupts) until
    `close()`, which restores it."""

    def __init__(self, fd: int):
        self.fd = fd
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def read(self, timeout: float) -> list[str]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 1024)
        if data.endswith(b"\x1b") and select.select([self.fd], [], [], 0.03)[0]:
            data += os.read(self.fd, 1024)  # the rest of an escape sequence (a lone ESC has none)
        return parse_keys(data)

    def close(self) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


# -- the screen ------------------------------------------------------------------------------------------------

class _Terminated(Exception):
    """SIGTERM / SIGHUP: leave the screen as q does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Notes(logging.Handler):
    """Warnings logged while the screen is up go to the status area, not over the screen."""

    def __init__(self, notes: deque):
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append((time.monotonic(), record.getMessage()))


KEYS_TABLE = "↑↓/jk select  enter detail  s save  e evaluate  x stop  q quit"
KEYS_DETAIL = "esc back  s save  e evaluate  x stop  q quit"
KEYS_SHORT = "s/e/x  q"


class Top:
    """The dashboard's state: which view, which run is selected, a pending confirmation, the status line."""

    def __init__(self, follower: Follower, detail: str | None = None):
        self.follower = follower
        self.selected: str | None = detail
        self.detail = detail is not None
        self.confirm: str | None = None  # run id a stop waits to be confirmed for
        self.message: Text = Text("")
        self._message_at = 0.0
        self._controls: list[threading.Thread] = []
        if detail is not None:
            follower.show(detail)

    # -- keys --

    def key(self, key: str) -> bool:
        """Apply one key; False means quit."""
        if self.confirm is not None:
            run_id, self.confirm = self.confirm, None
            if key in ("y", "Y"):
                self._send(run_id, "stop")
            else:
                self._say(Text(f"stop cancelled for run {render.safe(run_id)}", style="dim"))
            return True
        if key in ("q", "Q", "ctrl-c"):
            return False
        runs = self._ids()
        if key in ("up", "k", "down", "j") and runs and not self.detail:
            i = runs.index(self.selected) if self.selected in runs else 0
            i = max(0, i - 1) if key in ("up", "k") else min(len(runs) - 1, i + 1)
            self.selected = runs[i]
        elif key == "enter" and not self.detail and self._current() is not None:
            self.selected, self.detail = self._current(), True
            self.follower.show(self.selected)
        elif key in ("esc", "backspace") and self.detail:
            self.detail = False
        elif key in ("s", "e", "x"):
            run_id = self._current()
            if run_id is None:
                self._say(Text("no run selected", style="dim"))
            elif key == "x":
                self.confirm = run_id
            else:
                self._send(run_id, "save" if key == "s" else "evaluate")
        return True

    def _ids(self) -> list[str]:
        with self.follower.lock:
            return [t.info.run_id for t in self.follower.ordered()]

    def _current(self) -> str | None:
        runs = self._ids()
        if self.selected in runs:
            return self.selected
        return runs[0] if runs else None

    # -- control, off the drawing thread --

    def _send(self, run_id: str, cmd: str) -> None:
        tracked = self.follower.runs.get(run_id)
        if tracked is None:
            return
        self._say(Text(f"{cmd}: asking run {render.safe(run_id)} …", style="yellow"))
        thread = threading.Thread(target=self._control, args=(tracked.info, cmd), name="fg-bus-top-control",
                                  daemon=True)
        self._controls = [t for t in self._controls if t.is_alive()] + [thread]
        thread.start()

    def _control(self, info: registry.RunInfo, cmd: str) -> None:
        try:
            result = control.send_control(info.reload(), cmd, timeout=CONTROL_TIMEOUT, source="fg-bus top")
            ok, text = result.ok, result.message
        except (registry.RunNotFound, zmq.ZMQError, OSError) as e:
            ok, text = False, str(e)
        self._say(Text(render.safe(text), style="green" if ok else "bold red"))

    def _say(self, message: Text) -> None:
        self.message, self._message_at = message, time.monotonic()

    # -- drawing --

    def frame(self, width: int, height: int | None, keys: bool = True) -> RenderableType:
        f = self.follower
        with f.lock:
            ordered = f.ordered()
            rows = [t.row() for t in ordered]
            ids = [r.run_id for r in rows]
            if self.selected not in ids:
                self.selected = ids[0] if ids else None
            live = sum(r.status in LIVE for r in rows)
            title = Text.assemble(("fg-bus top", "bold"), f"  {len(rows)} run{'s' * (len(rows) != 1)}, {live} live",
                                  ("  " + time.strftime("%H:%M:%S"), "dim"))
            body_h = None if height is None else height - (1 if self.detail else 2)  # title, status line
            if self.detail and self.selected is not None:
                tracked = f.runs[self.selected]
                parts = render.detail(tracked.view, rows[ids.index(self.selected)], width, body_h)
            elif rows:
                selected = ids.index(self.selected) if self.selected in ids else None
                parts = render.runs_table(rows, selected, width, body_h)
                chosen = f.runs[self.selected]
                if height is None or body_h - len(parts) >= 3:
                    parts += self._selected_summary(chosen, width)
                left = 8 if height is None else min(12, body_h - len(parts))
                if left >= 6 and chosen.view.series:  # the selected run's loss and learning rate
                    parts += render.charts(chosen.view, width, left, 1)
            else:
                parts = [Text(f"no runs registered in {render.safe(registry.registry_dir())}; waiting for one "
                              "to start", style="dim")]
            notes = [text for at, text in list(f.notes)[-1:] if time.monotonic() - at < NOTE_SHOWN_S]
        body = render.frame(parts if self.detail else [title] + parts, width)
        if not keys:
            return body
        return _Screen(body, self._status_line(notes, width), height)

    def _selected_summary(self, tracked: Tracked, width: int) -> list:
        pairs = render.metric_pairs(tracked.view)
        data = tracked.info.data
        bus_dir = tracked.info.bus_dir
        output = bus_dir.parent.parent if bus_dir.parent.name == registry.BUS_DIRNAME else bus_dir
        where = [("output", str(output))] + [(key, str(data[key])) for key in ("pid", "host") if data.get(key)]
        if tracked.elapsed() is not None:
            where.append(("ran" if data.get("ended") else "running", render.format_duration(tracked.elapsed())))
        out = [Text("")] + render.flow(where, width, 1)
        if tracked.view.ended:  # how it ended, and why
            row = render.RowData(run_id=tracked.info.run_id, status=tracked.view.status,
                                 end_reason=tracked.view.end_reason)
            out += render.end_lines(row, width)
        if pairs:
            out += render.flow(pairs, width, 2)
        if tracked.view.events:
            out += render.event_lines(tracked.view.events, width, 1)
        return out

    def _status_line(self, notes: list[str], width: int) -> Text:
        if self.confirm is not None:
            line = Text(f"stop run {render.middle(render.safe(self.confirm), 40)}? y/n", style="bold yellow")
        elif self.message.plain and time.monotonic() - self._message_at < NOTE_SHOWN_S:
            line = self.message.copy()
        elif notes:
            line = Text(render.safe(notes[-1]), style="yellow")
        else:
            line = Text("")
        keys = KEYS_DETAIL if self.detail else KEYS_TABLE
        if len(line.plain) + 2 + len(keys) > width:
            keys = KEYS_SHORT
        if len(line.plain) + 2 + len(keys) <= width:
            line.append(" " * (width - len(line.plain) - len(keys)) + keys, style="dim")
        line.truncate(width, overflow="ellipsis")
        line.no_wrap = True
        return line


class _Screen:
    """`body` cut or padded to fill the screen but its last line, which is `status`."""

    def __init__(self, body: RenderableType, status: Text, height: int):
        self.body, self.status, self.height = body, status, height

    def __rich_console__(self, console, options):
        lines = console.render_lines(self.body, options.update_height(max(0, self.height - 1)), pad=True)
        lines += console.render_lines(self.status, options.update_height(1), pad=True)
        for line in lines:
            yield from line
            yield Segment.line()


def run_screen(follower: Follower, detail: str | None) -> int:
    """The full-screen dashboard until q / Ctrl-C / SIGTERM; the terminal is restored on every path."""
    top = Top(follower, detail)
    console = Console()
    notes = _Notes(follower.notes)
    root = logging.getLogger()
    saved_handlers, root.handlers = root.handlers, [notes]

    def terminate(signum, _frame):
        raise _Terminated(signum)

    old_signals = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    resized = threading.Event()
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: resized.set())
    keys = KeyReader(sys.stdin.fileno())
    follower.start()
    code = 0
    try:
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as live:
            drawn_version, drawn_at, dirty = -1, 0.0, True
            while True:
                pressed = keys.read(0.05)
                if not all(top.key(k) for k in pressed):
                    break
                now = time.monotonic()
                dirty = dirty or bool(pressed) or resized.is_set()
                due = now - drawn_at >= (KEY_REDRAW_S if dirty else 1 / FPS) and (
                    dirty or follower.version != drawn_version or now - drawn_at >= 1)
                if due:
                    dirty = False
                    resized.clear()
                    drawn_version = follower.version
                    live.update(top.frame(console.width, console.height), refresh=True)
                    drawn_at = now
    except KeyboardInterrupt:
        code = 130
    except _Terminated as e:
        code = 128 + e.signum
    finally:
        keys.close()
        for s, handler in old_signals.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGWINCH, old_winch)
        follower.stop()
        root.handlers = saved_handlers
    return code


class _FrameConsole(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (`| head`): the rest goes nowhere and the exit status stays 0, as in the
        other commands (rich's own would exit 1)."""
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())


def once(follower: Follower, detail: str | None, width: int, file=None) -> int:
    """One plain frame (no colour codes unless `file` is a terminal) and out."""
    top = Top(follower, detail)
    follower.refresh()  # (the detail run's whole history, read from its journal)
    file = sys.stdout if file is None else file
    console = _FrameConsole(file=file, width=width, force_terminal=None, highlight=False, soft_wrap=False)
    console.print(top.frame(width, None, keys=False))
    return 0


def default_width(file=None) -> int:
    file = sys.stdout if file is None else file
    return shutil.get_terminal_size((100, 24)).columns if file.isatty() else 100


def cmd_top(opts) -> int:
    """`fg-bus top [RUN] [--once] [--width N]`."""
    if not opts.once and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("fg-bus: error: top needs a terminal (stdin and stdout); `fg-bus top --once` prints one "
              "plain-text frame", file=sys.stderr)
        return 2
    follower = Follower(opts.run, follow=not opts.once)
    detail = None if opts.run is None else follower._only.run_id
    if opts.once:
        return once(follower, detail, opts.width or default_width())
    return run_screen(follower, detail)
