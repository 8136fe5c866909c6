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
  fg-bus ls                         runs, newest last (status: live / ended / failed / dead)
  fg-bus ls --json                  the same as JSON
  fg-bus cat latest --from 0        every record of the newest live run, then follow it to its end
  fg-bus ctl RUN stop               stop at the next step boundary (with a final checkpoint)
  fg-bus ctl RUN save|evaluate|save-and-stop
  fg-bus keys                       make CURVE keys for tcp buses ($FG_HOME/keys)
RUN is `latest`, a run id (or a unique prefix), or a run / output directory.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fg-bus", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="list runs")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cat = sub.add_parser("cat", help="print a run's records as JSON lines (history, then live, to its end)")
    cat.add_argument("run", nargs="?", default="latest")
    cat.add_argument("--from", dest="from_seq", default=0, type=_from_seq, metavar="SEQ|now",
                     help="first seq (default 0: the whole history; now: only what comes next)")
    cat.add_argument("--events", help="comma-separated event names to print")
    cat.add_argument("--wait", type=float, default=None, metavar="S",
                     help="with `latest`: seconds to wait for a run to start (default: forever)")
    cat.add_argument("--rank", type=int, default=0, metavar="N", help="which rank's stream of a torchrun job "
                                                                       "(default 0)")
    ctl = sub.add_parser("ctl", help="ask a running job to stop / save / evaluate at its next step boundary")
    ctl.add_argument("run")
    ctl.add_argument("cmd", choices=CONTROL_COMMANDS)
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait this long for the trainer")
    ctl.add_argument("--rank", type=int, default=0, metavar="N",
                     help="send it to this rank of a torchrun job (default 0); every rank applies it at the same step")
    keys = sub.add_parser("keys", help="make CURVE keypairs for tcp buses")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    return p


def _from_seq(text: str) -> int | None:
    if text == "now":
        return None
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a seq (0, 1, ...) or 'now', got {text!r}")


def _fail(message: str, code: int = 1) -> int:
    print(f"fg-bus: error: {message}", file=sys.stderr)
    return code


def cmd_ls(opts) -> int:
    rows = []
    for info in registry.list_runs():
        d = info.data
        rows.append({"run_id": info.run_id, "status": info.status, "pid": d.get("pid"),
                     "started": dt.datetime.fromtimestamp(d.get("started", 0)).isoformat(timespec="seconds"),
                     "last_step": d.get("last_step"), "run_dir": str(info.bus_dir)})
    if opts.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs registered in {registry.registry_dir()}")
        return 0
    header = ("RUN", "STATUS", "PID", "STARTED", "STEP", "RUN DIR")
    table = [header] + [(r["run_id"], r["status"], str(r["pid"]), r["started"], str(r["last_step"]), r["run_dir"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_cat(opts) -> int:
    from_seq = opts.from_seq
    events = opts.events.split(",") if opts.events else None
    sub = Subscriber(opts.run, from_seq=from_seq, events=events, wait=opts.wait, rank=opts.rank)
    out = sys.stdout.buffer
    try:
        for record in sub:
            out.write(records.encode(record) + b"\n")
            out.flush()
    except BrokenPipeError:
        return 0
    print(f"fg-bus: run {sub.run_id} {sub.status}; {sub.stats.live} live, {sub.stats.replayed} replayed, "
          f"{sub.stats.gaps_repaired} gaps repaired, {sub.stats.malformed_total} malformed", file=sys.stderr)
    return 0 if sub.status != registry.DEAD else 3


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
    except registry.RunNotFound as e:
        return _fail(str(e))
    except TimeoutError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
