"""`fg-bus`: list runs, read a run's records, control a running job, make CURVE keys."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import secrets
import sys
import time

import orjson
import zmq

from . import records, registry, security
from .publisher import CONTROL_COMMANDS
from .subscriber import Subscriber

EPILOG = """\
examples:
  fg-bus ls                         runs, newest last (status: live / paused? / ended / failed / dead)
  fg-bus ls --json                  the same as JSON
  fg-bus cat latest --from 0        every record of the newest live run, then follow it to its end
  fg-bus ctl RUN stop               stop at the next step boundary (with a final checkpoint)
  fg-bus ctl RUN save|evaluate|save-and-stop
  fg-bus keys                       make CURVE keys for tcp buses ($FG_HOME/keys)
RUN is `latest`, a run id (or a unique prefix), or a run / output directory (one whose run.json is gone
is read from its journal alone).
"""

CAT_EPILOG = """\
exit status:
  0  the run's records, complete, to its end record (completed, interrupted or failed)
  1  no such run (or it cannot be read)
  2  bad usage (an option's value, a rank the run does not have)
  3  the trainer died: every record it wrote, but no end record
  6  the output is incomplete (this wins over 3): records missing for good (holes: a garbled, emptied
     or cut journal; or lost with a journal that could not be written) or malformed lines skipped; the
     summary on stderr names them
"""
EPILOG += "\nfg-bus cat " + CAT_EPILOG

#: `fg-bus cat`: the output misses records (holes, lost, or malformed lines skipped).
EXIT_INCOMPLETE = 6
MAX_SEQ = (1 << 63) - 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fg-bus", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list runs")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
    ctl.add_argument("cmd", choices=CONTROL_COMMANDS)
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait this long for the trainer")
    ctl.add_argument("--rank", type=_rank, default=0, metavar="N",
                     help="send it to this rank of a torchrun job (default 0); every rank applies it at the same step")
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


def cmd_ls(opts) -> int:
    rows = []
    for info in registry.list_runs():  # entries of the wrong shape are skipped, each with a warning
        d = info.data
        rows.append({"run_id": info.run_id, "status": info.status, "pid": d.get("pid"),
                     "started": _started(d.get("started", 0)), "last_step": d.get("last_step"),
                     "run_dir": str(info.bus_dir)})
    if opts.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs registered in {registry.registry_dir()}")
        return 0
    header = ("RUN", "STATUS", "PID", "STARTED", "STEP", "RUN DIR")
    # "paused?": its pid is alive here but its heartbeat stopped (a guess: stopped, suspended, or hung)
    table = [header] + [(r["run_id"], r["status"] + ("?" if r["status"] == registry.PAUSED else ""), str(r["pid"]),
                         r["started"], str(r["last_step"]), r["run_dir"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
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
    print(f"fg-bus: run {sub.run_id} {sub.status}; {stats.live} live, {stats.replayed} replayed, "
          f"{stats.gaps_repaired} gaps repaired, {stats.holes} holes{_ranges(stats.hole_ranges)}, "
          f"{stats.malformed_total} malformed{_reasons(stats.malformed)}"
          + (f", {stats.lost} lost" if stats.lost else "")
          + (f", {stats.paused_s:.1f} s paused" if stats.paused_s else ""), file=sys.stderr)
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
    info = info.for_rank(opts.rank)
    if not info.is_live:
        return _fail(f"run {info.run_id} is {info.status}, not running")
    endpoints = info.ranks[str(opts.rank)]
    ctx = zmq.Context()
    sub, push = ctx.socket(zmq.SUB), ctx.socket(zmq.PUSH)
    server_key = info.data.get("curve_server_key")
    try:
        for sock in (sub, push):
            sock.linger = 1000
            if server_key:
                security.make_client(sock, server_key.encode())
        sub.setsockopt(zmq.SUBSCRIBE, records.HEARTBEAT.encode())
        sub.setsockopt(zmq.SUBSCRIBE, records.CONTROL.encode())
        sub.connect(endpoints["pub"])
        deadline = time.monotonic() + opts.timeout
        # A heartbeat first: then our subscription is in place and the acknowledgement cannot be missed.
        if not _wait_for(sub, deadline, lambda r: r["event"] == records.HEARTBEAT):
            return _fail(f"run {info.run_id} sent no heartbeat within {opts.timeout:g} s (is it stopped or dead?)")
        request_id = secrets.token_hex(6)
        push.connect(endpoints["inbox"])
        push.send(orjson.dumps({"op": "control", "cmd": opts.cmd, "id": request_id, "source": "fg-bus ctl"}))
        ack = _wait_for(sub, deadline, lambda r: r["event"] == records.CONTROL and r.get("id") == request_id)
        if ack is None:
            return _fail(f"no acknowledgement from run {info.run_id} within {opts.timeout:g} s")
        if not ack.get("accepted", ack.get("applied")):
            return _fail(f"run {info.run_id} refused {opts.cmd}: {ack.get('reason')}")
        applied = _wait_for(sub, deadline, lambda r: r["event"] == records.CONTROL and r.get("id") == request_id
                            and r.get("applied"))
        if applied is None:
            print(f"fg-bus: {opts.cmd} accepted by run {info.run_id}; it applies at the next step boundary")
        else:
            print(f"fg-bus: {opts.cmd} applied by run {info.run_id} at step {applied['global_step']}")
        return 0
    finally:
        sub.close(linger=0)
        push.close()
        ctx.term()


def _wait_for(sub, deadline: float, match) -> dict | None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sub.poll(int(remaining * 1000)):
            return None
        try:
            record = records.parse_frames(sub.recv_multipart())
        except records.RecordError:
            continue
        if match(record):
            return record


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
    handlers = {"ls": cmd_ls, "cat": cmd_cat, "ctl": cmd_ctl, "keys": cmd_keys}
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
