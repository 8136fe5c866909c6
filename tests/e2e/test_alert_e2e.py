"""`fg-sink alert` as a user runs it beside a real `fg-train`: the trainer is killed, the sink says the run died
with one POST to a webhook on 127.0.0.1, a restarted sink sends nothing again, and a webhook that is down is
one clear line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fg_bus import registry

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")
WAIT = 120  # seconds: every wait on a process


class Webhook:
    def __init__(self):
        self.bodies: list[dict] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_trainer_raises_one_alert_once(tmp_path, fg_home):
    env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out"
    hook = Webhook()
    log = open(tmp_path / "train.log", "wb")
    train = subprocess.Popen([str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(out),
                              "--max-steps", "100000"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + WAIT
        while not list((out / "fg-bus").glob("*/journal.rank0.jsonl")) or \
                list((out / "fg-bus").glob("*/journal.rank0.jsonl"))[0].read_bytes().count(b"\n") < 100:
            assert train.poll() is None, (tmp_path / "train.log").read_text()
            assert time.monotonic() < deadline, "fg-train wrote fewer than 100 records"
            time.sleep(0.05)
        bus_dir = list((out / "fg-bus").glob("*/run.json"))[0].parent
        run_id = registry.load_run(bus_dir).run_id
        # Only the rule this test makes happen: no stall or throughput alert from a loaded machine.
        command = [str(BIN / "fg-sink"), "alert", "--run", str(bus_dir), "--dead-after", "1", "--nice", "0",
                   "--disable", "stalled,throughput-drop,eval-plateau"]
        sink = subprocess.Popen([*command, "--webhook", f"http://127.0.0.1:{hook.port}/x"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        train.kill()
        train.wait(WAIT)
        _, err = sink.communicate(timeout=WAIT)
        assert sink.returncode == 3, err  # the trainer died: the runner's exit status, alert or not
        assert [b["rule"] for b in hook.bodies] == ["run-end"], err
        gone = {"text": f"its process (pid {train.pid}) is gone without ending the run"}
        assert hook.bodies[0]["details"] == {"status": "dead", "reason": gone} and hook.bodies[0]["run"] == run_id
        assert sum("ALERT [run-end]" in line for line in err.splitlines()) == 1, err
        logged = (out / "alerts" / f"{run_id}.jsonl").read_text().splitlines()
        assert [json.loads(line)["key"] for line in logged] == [hook.bodies[0]["key"]]

        again = subprocess.run([*command, "--webhook", f"http://127.0.0.1:{hook.port}/x"], env=env,
                               capture_output=True, text=True, timeout=WAIT)
        assert again.returncode == 3, again.stderr
        assert len(hook.bodies) == 1 and "ALERT" not in again.stderr, again.stderr
        assert (out / "alerts" / f"{run_id}.jsonl").read_text().splitlines() == logged

        down = subprocess.run([*command, "--alert-log", str(tmp_path / "down.jsonl"), "--webhook",
                               f"http://127.0.0.1:{closed_port()}/x"], env=env, capture_output=True, text=True,
                              timeout=WAIT)
        assert down.returncode == 3, down.stderr
        failed = [line for line in down.stderr.splitlines() if "could not deliver" in line]
        assert len(failed) == 1 and "[run-end] to the webhook at 127.0.0.1:" in failed[0], down.stderr
        assert "Traceback" not in down.stderr
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(WAIT)
        log.close()
        hook.close()
