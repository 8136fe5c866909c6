"""`fg-bus`: list runs, read a run's records, control a running job, make CURVE keys."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys

from . import control, records, registry, security
from .monitor import end_text, failure_frame, format_duration, format_value, reason_text
from .publisher import CONTROL_COMMANDS
from .subscriber import Subscriber

EPILOG = """\
examples:
  fg-bus ls                         runs, newest last: status (live / stalled / paused? / completed /
                                    stopped / interrupted / failed / dead) and why it ended, step/max,
                                    %, step rate, ETA, last loss, best eval
  fg-bus ls --json                  the same as JSON
  fg-bus cat latest --from 0        every record of the newest live run, then follow it to its end
  fg-bus ctl RUN stop               stop at the next step boundary (with a final checkpoint)
  fg-bus ctl RUN save|evaluate|save-and-stop
  fg-bus ctl RUN abort              stop at the next step boundary WITHOUT saving anything
  fg-bus gc                         list what dead runs left behind (socket dirs, registry entries,
                                    seals a crash cut short); --yes removes it
  fg-bus top                        live dashboard of every run (fg-bus top RUN: one run in detail)
  fg-bus keys                       make CURVE keys for tcp buses ($FG_HOME/keys)
RUN is `latest`, a run id (or a unique prefix), or a run / output directory (one whose run.json is gone
is read from its journal alone).
"""

CAT_EPILOG = """\
exit status:
  0  the run's records, complete, to its end record (completed, stopped, interrupted or failed; the
     last line on stderr says which and why)
  1  no such run (or it cannot be read)
  2  bad usage (an option's value, a rank the run does not have)
  3  the trainer died: every record it wrote, but no end record
  6  the output is incomplete (this wins over 3): records missing for good (holes: a garbled, emptied
     or cut journal; or lost with a journal that could not be written) or malformed lines skipped; the
     summary on stderr names them
"""
EPILOG += "\nfg-bus cat " + CAT_EPILOG

TOP_DESCRIPTION = """\
A full-screen dashboard of this user's runs: status (live / stalled / paused / completed / stopped /
interrupted / failed / dead), progress and ETA, step rate, last loss, best eval, GPU use; for a run that
is over, why it ended (a failure's exception and where). Enter shows one run in detail: progress,
charts of loss and eval loss, learning rate, grad norm and throughput, system metrics per rank, text
samples, warnings and control records, every metric the logs carry. It follows runs as a sink does (their
history from the journal, then live) and keeps going when a run ends or dies."""

TOP_EPILOG = """\
keys:
  up/down, j/k   select a run            enter        show it in detail
  esc, backspace back to the runs        q, Ctrl-C    quit
  s  save a checkpoint   e  evaluate   x  stop (asks y/n)   -- as `fg-bus ctl RUN save|evaluate|stop`
examples:
  fg-bus top                   every run
  fg-bus top latest            the newest live run in detail
  fg-bus top RUN --once        one plain-text frame of RUN (for scripts; --width N to set its width)
"""

LS_DESCRIPTION = """\
Every run registered for this user, oldest first:
  STATUS     live, stalled (heartbeats go on, steps do not), paused? (its process is alive but silent);
             once over: completed (max_steps or its epochs), stopped (`fg-bus ctl stop`, a callback),
             interrupted (a signal), failed (an exception), dead (gone without an end record)
  STEP DONE  the last step / the run's max steps, and the share done
  STEP/S     the recent step rate        ETA     the time left at that rate (live runs only)
  LOSS       the last logged loss        BEST EVAL  the best evaluation so far (metric_for_best_model,
             default eval_loss), with its step
  END        why it ended, cut to fit ("`fg-bus ctl stop` from alice@gpu1 (pid 12) at step 40",
             "ValueError: ...", "no heartbeat for 40 s"); --json has it whole as `end_reason`
These come from the run's run.json, refreshed every second while it runs; "-" where a run has none
(runs from before this version)."""

GC_DESCRIPTION = """\
List (and with --yes remove) what dead runs of this user left behind:
  socket dirs       $XDG_RUNTIME_DIR/fg/<id>/ or /tmp/fg-<uid>/<id>/ of trainers that died without closing
                    their bus (SIGKILL, OOM): no process listens on their sockets and no live or paused
                    run names them
  registry entries  $FG_HOME/runs/<run_id>.json whose run directory is gone (its output dir deleted)
A live or paused run is never touched, nor any run's output (checkpoints, journals, run.json): a dead
run whose directory is there stays in `fg-bus ls`. fg-train does this at its start."""

#: `fg-bus cat`: the output misses records (holes, lost, or malformed lines skipped).
EXIT_INCOMPLETE = 6
MAX_SEQ = (1 << 63) - 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fg-bus", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list runs", description=LS_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table (the same fields, with "
                                                        "progress as 0..1, eta_s in seconds, and end_reason: why "
                                                        "it ended, a dict with `text`, null while it runs)")
    cat = sub.add_parser("cat", help="print a run's records as JSON lines (history, then live, to its end)",
                         epilog=CAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cat.add_argument("run", nargs="?", default="latest")
    cat.add_argument("--from", dest="from_seq", default=0, type=_from_seq, metavar="SEQ|now",
                     help="first seq (default 0: the whole history; now: only what comes next)")
    cat.add_argument("--events", help="comma-separated event names to print")
    cat.add_argument("--wait", type=float, default=None, metavar="S",
                     help="with `latest`: seconds to wait for a run to start (default: forever)")
    cat.add_argument("--rank", type=_rank, default=0, metavar="N", help="which rank's stream of a torchrun job "
                                                                       "(default 0)")
    ctl = sub.add_parser("ctl", help="ask a running job to stop / save / evaluate at its next step boundary")
    ctl.add_argument("run")
    ctl.add_argument("cmd", choices=CONTROL_COMMANDS,
                     help="stop (with a final checkpoint), save, evaluate, save-and-stop, or abort (stop, saving "
                          "nothing: no checkpoint, no final model)")
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait this long for the trainer")
    ctl.add_argument("--rank", type=_rank, default=0, metavar="N",
                     help="send it to this rank of a torchrun job (default 0); every rank applies it at the same step")
    top = sub.add_parser("top", help="live full-screen dashboard of the runs (or of one run in detail)",
                         description=TOP_DESCRIPTION, epilog=TOP_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("run", nargs="?", default=None,
                     help="show this run in detail (`latest`, a run id or prefix, a directory); default: every run")
    top.add_argument("--once", action="store_true",
                     help="print one plain-text frame and exit (no colours unless stdout is a terminal)")
    top.add_argument("--width", type=_width, default=None, metavar="N",
                     help="with --once: columns (default: the terminal's, or 100 when piped)")
    gc = sub.add_parser("gc", help="remove what dead runs left behind (a dry run unless --yes)",
                        description=GC_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    gc.add_argument("--yes", action="store_true", help="remove them (default: only list what would go)")
    keys = sub.add_parser("keys", help="make CURVE keypairs for tcp buses")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    return p


def _from_seq(text: str) -> int | None:
    if text == "now":
        return None
    if text.isascii() and text.isdigit():
        if int(text) > MAX_SEQ:
            raise argparse.ArgumentTypeError(f"a seq fits in 63 bits (at most {MAX_SEQ}), got {text[:40]}")
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a seq (0, 1, ...) or 'now', got {text[:40]!r}")


def _width(text: str) -> int:
    if text.isascii() and text.isdigit() and 20 <= int(text) <= 1000:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a width in columns (20 .. 1000), got {text[:40]!r}")


def _rank(text: str) -> int:
    if text.isascii() and text.isdigit() and int(text) < 1 << 20:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a rank (0, 1, ...), got {text[:40]!r}")


def _fail(message: str, code: int = 1) -> int:
    print(f"fg-bus: error: {message}", file=sys.stderr)
    return code


def _started(value) -> str:
    try:
        return dt.datetime.fromtimestamp(value).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return "?"


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _progress(data: dict, status: str) -> dict:
    """The `ls` fields from run.json's `progress` (written at each heartbeat; absent in runs from before it,
    or of the wrong shape if edited: None then)."""
    raw = data.get("progress") if isinstance(data.get("progress"), dict) else {}
    step, max_steps = _number(raw.get("global_step")), _number(raw.get("max_steps"))
    if step is None:
        step = _number(data.get("last_step"))
    best = raw.get("best_eval")
    best = ({"name": str(best["name"]), "value": best["value"], "step": best.get("step")}
            if isinstance(best, dict) and isinstance(best.get("name"), str) and _number(best.get("value")) is not None
            else None)
    live = status in (registry.LIVE, registry.STALLED, registry.PAUSED)
    return {"max_steps": max_steps if max_steps and max_steps > 0 else None,
            "progress": min(1.0, step / max_steps) if step is not None and max_steps and max_steps > 0 else None,
            "steps_per_second": _number(raw.get("steps_per_second")),
            "eta_s": _number(raw.get("eta_s")) if live else None,  # an ended run has none left
            "last_loss": _number(raw.get("last_loss")), "best_eval": best,
            "stalled_since": _number(data.get("stalled_since"))}


def _cells(r: dict) -> tuple[str, ...]:
    step = "-" if r["last_step"] is None else str(r["last_step"])
    if r["max_steps"]:
        step += f"/{r['max_steps']:g}"
    best = r["best_eval"]
    return (step, "-" if r["progress"] is None else f"{r['progress'] * 100:.0f}%",
            "-" if r["steps_per_second"] is None else f"{r['steps_per_second']:.3g}", format_duration(r["eta_s"]),
            format_value("loss", r["last_loss"]),
            "-" if best is None else f"{best['name']}={format_value(best['name'], best['value'])}"
                                     + (f"@{best['step']}" if best.get("step") is not None else ""))


#: the most characters of a reason the END column shows (`ls --json` has it whole)
END_WIDTH = 60


def _end_cell(r: dict) -> str:
    """The END column: why the run ended, on one line, cut to END_WIDTH ("-" while it runs, or where the
    reason says no more than the status: a run from before reasons)."""
    text = reason_text(r["end_reason"], END_WIDTH)
    return "-" if text is None or text == r["status"] else _printable(text)


def _printable(text: str) -> str:
    """`text` with every control (and other unprintable) character escaped: safe on a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_ls(opts) -> int:
    rows = []
    for info in registry.list_runs():  # entries of the wrong shape are skipped, each with a warning
        d = info.data
        status = info.status
        rows.append({"run_id": info.run_id, "status": status, "end_reason": info.end_reason, "pid": d.get("pid"),
                     "started": _started(d.get("started", 0)), "last_step": d.get("last_step"),
                     **_progress(d, status), "run_dir": str(info.bus_dir)})
    if opts.json:
        return _print_all(json.dumps(rows, indent=1) + "\n")
    if not rows:
        return _print_all(f"no runs registered in {registry.registry_dir()}\n")
    header = ("RUN", "STATUS", "PID", "STARTED", "STEP", "DONE", "STEP/S", "ETA", "LOSS", "BEST EVAL", "END",
              "RUN DIR")
    # "paused?": its pid is alive here but its heartbeat stopped (a guess: stopped, suspended, or hung)
    table = [header] + [(r["run_id"], r["status"] + ("?" if r["status"] == registry.PAUSED else ""),
                         str(r["pid"]), r["started"], *_cells(r), _end_cell(r), r["run_dir"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return _print_all("".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] + "\n"
                              for row in table))


def _print_all(text: str) -> int:
    """Write `text` to stdout; piped into `head`, end quietly (exit 0) when the reader has gone."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's flush at exit then writes nowhere
        os.close(devnull)
    return 0


class _Usage(ValueError):
    """A request the run cannot answer (exit 2)."""


RANK_WAIT = 30.0


def _run_to_read(opts) -> registry.RunInfo:
    """The run and rank `fg-bus cat` reads: a rank the run does not have is refused at once; one it has
    that has not registered yet is waited for (saying so)."""
    info = registry.wait_for_run(opts.run, opts.wait) if opts.run == "latest" else registry.resolve(opts.run)
    if info is None:
        raise registry.RunNotFound(f"no run {opts.run!r}")
    if opts.rank >= info.world_size:
        raise _Usage(f"run {info.run_id} has no rank {opts.rank}: its ranks are {info.rank_names()}")
    if opts.rank and not info.data.get("orphan") and not (info.bus_dir / registry.rank_file(opts.rank)).exists():
        print(f"fg-bus: waiting up to {RANK_WAIT:g} s for rank {opts.rank} of run {info.run_id} to start "
              f"({info.bus_dir / registry.rank_file(opts.rank)})", file=sys.stderr, flush=True)
    return info


def cmd_cat(opts) -> int:
    from_seq = opts.from_seq
    events = opts.events.split(",") if opts.events else None
    sub = Subscriber(_run_to_read(opts), from_seq=from_seq, events=events, rank=opts.rank, rank_wait=RANK_WAIT)
    out = sys.stdout.buffer
    try:
        for record in sub:
            out.write(records.encode(record) + b"\n")
            out.flush()
    except BrokenPipeError:
        return 0
    stats = sub.stats
    print(f"fg-bus: run {sub.run_id}: {stats.live} live, {stats.replayed} replayed, "
          f"{stats.gaps_repaired} gaps repaired, {stats.holes} holes{_ranges(stats.hole_ranges)}, "
          f"{stats.malformed_total} malformed{_reasons(stats.malformed)}"
          + (f", {stats.lost} lost" if stats.lost else "")
          + (f", {stats.paused_s:.1f} s paused" if stats.paused_s else ""), file=sys.stderr)
    # the last line: how the run ended, and why ("run X stopped: `fg-bus ctl stop` from alice@gpu1 ...")
    print(f"fg-bus: run {sub.run_id} {_printable(end_text(sub.status, sub.end_reason))}", file=sys.stderr)
    frame = failure_frame(sub.end_reason) if sub.status == registry.FAILED else None
    if frame:
        print(f"fg-bus:   at {_printable(frame[:400])}", file=sys.stderr)
    if stats.holes or stats.lost or stats.malformed_total:
        print("fg-bus: the output is incomplete: records are missing (see above)", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0 if sub.status != registry.DEAD else 3


def _ranges(ranges: list[tuple[int, int]], shown: int = 5) -> str:
    if not ranges:
        return ""
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges[:shown])
    return f" (seq {text}{', ...' if len(ranges) > shown else ''})"


def _reasons(malformed: dict[str, int]) -> str:
    return f" ({', '.join(f'{n} {reason}' for reason, n in sorted(malformed.items()))})" if malformed else ""


def cmd_ctl(opts) -> int:
    info = registry.resolve(opts.run)
    if info is None:
        return _fail("no live run (`fg-bus ls` lists the runs)")
    result = control.send_control(info, opts.cmd, rank=opts.rank, timeout=opts.timeout, source="fg-bus ctl")
    if not result.ok:
        return _fail(result.message)
    print(f"fg-bus: {result.message}")
    return 0


def cmd_top(opts) -> int:
    from . import top  # rich is imported only here: the other commands start without it

    return top.cmd_top(opts)


def cmd_gc(opts) -> int:
    from . import gc

    garbage = gc.find()
    lines = garbage.describe()
    if not lines:
        return _print_all("fg-bus: nothing to remove: no leftovers of dead runs\n")
    if not opts.yes:
        return _print_all("".join(f"would remove {line}\n" for line in lines)
                          + f"fg-bus: {len(lines)} to remove; run `fg-bus gc --yes` to remove them\n")
    dirs, entries, seals, errors = gc.remove(garbage)
    _print_all("".join(f"removed {line}\n" for line in lines) if not errors else "")
    for error in errors:
        print(f"fg-bus: error: {error}", file=sys.stderr)
    print(f"fg-bus: removed {gc.summary(dirs, entries, seals)}", file=sys.stderr)
    return 1 if errors else 0


def cmd_keys(opts) -> int:
    try:
        directory = security.make_keys(force=opts.force)
    except FileExistsError as e:
        return _fail(str(e))
    print(f"fg-bus: keys written to {directory}; clients whose public key is in {directory / 'authorized'} "
          "may connect to tcp buses started after this")
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"ls": cmd_ls, "cat": cmd_cat, "ctl": cmd_ctl, "top": cmd_top, "keys": cmd_keys,
                "gc": cmd_gc}
    try:
        return handlers[opts.command](opts)
    except _Usage as e:
        return _fail(str(e), 2)
    except registry.RunNotFound as e:
        return _fail(str(e))
    except registry.UnsafeDirectory as e:
        return _fail(str(e))
    except TimeoutError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
