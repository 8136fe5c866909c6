"""`fg-sink alert`: the rules fed synthetic records through the sink class, deliveries to a real HTTP server on
127.0.0.1, a restart that sends nothing twice, and the command's exit status and errors."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fg_bus import registry
from fg_bus.records import encode
from fg_bus.registry import RunInfo
from sinks.alert_sink import AlertSink, webhook_host
from conftest import dead_pid, explain

FG_SINK = os.path.join(os.path.dirname(sys.executable), "fg-sink")
RUN = "alerts-20260101-000000-a1b2"


class Webhook:
    """An HTTP server on 127.0.0.1 that answers POSTs with the next status of `statuses` (then 200), and keeps
    what it received."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.received: list[dict] = []  # {"path", "body", "headers", "status"}
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = hook.statuses.pop(0) if hook.statuses else 200
                hook.received.append({"path": self.path, "body": json.loads(body), "headers": dict(self.headers),
                                      "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def delivered(self) -> list[dict]:
        return [r["body"] for r in self.received if r["status"] == 200]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def webhook():
    hooks = []

    def make(statuses=None):
        hooks.append(Webhook(statuses))
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info_for(tmp_path: Path, run_id: str = RUN) -> RunInfo:
    bus_dir = tmp_path / "out" / registry.BUS_DIRNAME / run_id
    bus_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(bus_dir, {"run_id": run_id, "world_size": 1})


class Feed:
    """Records of one run with increasing seqs and timestamps (`at`: seconds into the run)."""

    def __init__(self, run_id: str = RUN):
        self.run_id = run_id
        self.seq = 0

    def __call__(self, event: str, at: float = 0.0, step: int = 1, metrics: dict | None = None, **fields) -> dict:
        minutes, seconds = divmod(at, 60)
        record = {"v": 1, "run": self.run_id, "rank": 0, "seq": self.seq, "event": event, "global_step": step,
                  "timestamp": f"2026-01-01T00:{int(minutes):02d}:{seconds:09.6f}+00:00", "metrics": metrics or {},
                  **fields}
        self.seq += 1
        return record


def sink_for(tmp_path: Path, **kwargs) -> tuple[AlertSink, io.StringIO]:
    err = io.StringIO()
    sink = AlertSink(stream=err, **kwargs)
    sink.open_run(info_for(tmp_path))
    return sink, err


def feed_all(sink: AlertSink, recs: list[dict], status: str = registry.COMPLETED) -> None:
    for record in recs:
        sink.handle(record)
    sink.end_run(status)
    sink.close()


def alert_log(tmp_path: Path) -> list[dict]:
    path = tmp_path / "out" / "alerts" / f"{RUN}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rules(sink: AlertSink) -> list[str]:
    return [a.rule for a in sink.raised]


# -- the rules --------------------------------------------------------------------------------------------


def test_a_non_finite_loss_alerts_once_until_the_loss_is_finite_again(tmp_path, webhook):
    hook = webhook()
    sink, err = sink_for(tmp_path, webhook=hook.url(), min_interval=0)
    r = Feed()
    feed_all(sink, [r("on_step_end", 1, metrics={"loss": 2.0}), r("on_step_end", 2, metrics={"loss": math.nan}),
                    r("on_log", 3, metrics={"loss": math.nan}), r("on_step_end", 4, metrics={"loss": 1.0}),
                    r("on_log", 5, metrics={"loss": math.inf})])
    assert rules(sink) == ["nonfinite-loss", "nonfinite-loss"]
    assert [b["seq"] for b in hook.delivered] == [1, 4]
    assert hook.delivered[0]["rule"] == "nonfinite-loss" and "nan" in hook.delivered[0]["message"]
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fg-sink alert: ALERT [nonfinite-loss] run " + RUN)
    assert [a["key"] for a in alert_log(tmp_path)] == [a.key for a in sink.raised]


def test_trainer_alerts_are_forwarded_and_stalls_raise_one(tmp_path, webhook):
    hook = webhook()
    sink, _ = sink_for(tmp_path, webhook=hook.url())
    r = Feed()
    feed_all(sink, [r("alert", 1, kind="divergence", message="loss EMA 9.1 is 3x its best 3.0", global_step=40,
                      action="stop", value=math.inf),
                    r("warning", 70, kind="stalled", message="no progress for 60 s", stalled_for=60.0),
                    r("warning", 90, kind="stall-cleared", message="after 80 s")])
    assert rules(sink) == ["trainer-alert", "stalled"]
    first = hook.delivered[0]
    assert first["details"] == {"kind": "divergence", "action": "stop", "value": "inf"}  # strict JSON
    assert first["message"] == "loss EMA 9.1 is 3x its best 3.0 (action: stop)" and first["global_step"] == 40
    assert hook.delivered[1]["message"] == "no progress for 60 s"


def test_eval_not_improving_for_patience_evaluations(tmp_path):
    sink, _ = sink_for(tmp_path, eval_patience=2, min_interval=0)
    r = Feed()
    recs = []
    for i, loss in enumerate([3.0, 2.5, 2.6, 2.7, 2.8, 2.4, 2.5, 2.5]):
        for event in ("on_log", "on_evaluate"):  # both carry an evaluation's metrics: counted once
            recs.append(r(event, i, step=10 * (i + 1), metrics={"eval_loss": loss}))
    feed_all(sink, recs)
    assert [(a.rule, a.global_step) for a in sink.raised] == [("eval-plateau", 40), ("eval-plateau", 80)]
    assert sink.raised[0].details["best"] == 2.5


def test_eval_metric_greater_is_better(tmp_path):
    sink, _ = sink_for(tmp_path, eval_patience=1, eval_metric="accuracy", greater_is_better=True)
    r = Feed()
    feed_all(sink, [r("on_evaluate", 0, step=10, metrics={"eval_accuracy": 0.5}),
                    r("on_evaluate", 1, step=20, metrics={"eval_accuracy": 0.6}),
                    r("on_evaluate", 2, step=30, metrics={"eval_accuracy": 0.55})])
    assert [(a.rule, a.global_step) for a in sink.raised] == [("eval-plateau", 30)]


def test_throughput_below_a_fraction_of_its_median(tmp_path):
    sink, _ = sink_for(tmp_path, min_interval=0)
    r = Feed()
    recs = [r("on_log", 0, step=1, metrics={"loss": 3.0, "samples_per_second": 10.0})]  # slow first logs: no
    recs += [r("on_log", i, step=i + 1, metrics={"loss": 3.0, "samples_per_second": 500.0}) for i in range(1, 10)]
    recs += [r("on_log", 10, step=11, metrics={"loss": 3.0, "samples_per_second": 200.0}),  # < 0.5 x 500
             r("on_log", 11, step=12, metrics={"loss": 3.0, "samples_per_second": 150.0}),  # still low: once
             r("on_log", 12, step=13, metrics={"eval_loss": 3.0, "eval_samples_per_second": 1.0}),  # eval: ignored
             r("on_log", 13, step=14, metrics={"loss": 3.0, "samples_per_second": 480.0}),  # recovered
             r("on_log", 14, step=15, metrics={"loss": 3.0, "samples_per_second": 100.0})]
    feed_all(sink, recs)
    assert [(a.rule, a.global_step) for a in sink.raised] == [("throughput-drop", 11), ("throughput-drop", 15)]
    assert sink.raised[0].details["median"] == 500.0


def test_a_dead_run_alerts_a_completed_one_does_not_a_failed_one_once(tmp_path):
    r = Feed()
    sink, _ = sink_for(tmp_path / "dead")
    feed_all(sink, [r("on_log", 0, step=7, metrics={"loss": 2.0})], status=registry.DEAD)
    assert [(a.rule, a.global_step, a.details["status"]) for a in sink.raised] == [("run-end", 7, "dead")]

    sink, _ = sink_for(tmp_path / "done")
    feed_all(sink, [r("end", 1, status="completed")], status=registry.COMPLETED)
    assert sink.raised == []

    sink, _ = sink_for(tmp_path / "failed")
    feed_all(sink, [r("end", 1, status="failed", error={"type": "RuntimeError", "message": "CUDA error"})],
             status=registry.FAILED)
    assert [(a.rule, a.message) for a in sink.raised] == [("run-end", "the run failed: RuntimeError: CUDA error")]


def test_rate_limited_per_rule_with_the_suppressed_counted(tmp_path, webhook):
    hook = webhook()
    sink, _ = sink_for(tmp_path, webhook=hook.url(), min_interval=60)
    r = Feed()
    feed_all(sink, [r("alert", 0, kind="spike", message="a"), r("alert", 10, kind="spike", message="b"),
                    r("alert", 20, kind="spike", message="c"),
                    r("warning", 30, kind="stalled", message="stalled"),  # another rule: its own limit
                    r("alert", 100, kind="spike", message="d")])
    assert [(b["rule"], b["message"], b["suppressed"]) for b in hook.delivered] == [
        ("trainer-alert", "a", 0), ("stalled", "stalled", 0), ("trainer-alert", "d", 2)]


def test_rules_can_be_disabled(tmp_path):
    sink, _ = sink_for(tmp_path, disable=["nonfinite-loss", "run-end"], throughput_drop=0)
    r = Feed()
    feed_all(sink, [r("on_log", 0, metrics={"loss": math.nan})], status=registry.DEAD)
    assert sink.raised == []


# -- restart ----------------------------------------------------------------------------------------------


def test_a_restarted_sink_sends_nothing_it_already_sent(tmp_path, webhook):
    hook = webhook()
    r = Feed()
    recs = [r("on_log", 0, metrics={"loss": math.nan}), r("alert", 1, kind="divergence", message="x"),
            r("alert", 2, kind="divergence", message="rate-limited")]
    sink, _ = sink_for(tmp_path, webhook=hook.url())
    assert sink.open_run(info_for(tmp_path)) == 0  # the whole history: the rules need it
    feed_all(sink, recs[:2])
    logged = alert_log(tmp_path)
    assert len(hook.delivered) == 2 and len(logged) == 2

    sink, err = sink_for(tmp_path, webhook=hook.url())  # restarted: the same history, then more
    later = [r("warning", 5, kind="stalled", message="stuck")]
    feed_all(sink, recs + later, status=registry.DEAD)
    assert [b["rule"] for b in hook.delivered] == ["nonfinite-loss", "trainer-alert", "stalled", "run-end"]
    assert alert_log(tmp_path)[:2] == logged and len(alert_log(tmp_path)) == 4
    assert "[nonfinite-loss]" not in err.getvalue()


def test_two_alert_sinks_on_one_log_are_refused(tmp_path):
    from sinks._output import OutputLocked

    first, _ = sink_for(tmp_path)
    with pytest.raises(OutputLocked):
        sink_for(tmp_path)
    first.close()
    first.close()  # idempotent


# -- deliveries -------------------------------------------------------------------------------------------


def test_a_webhook_that_fails_then_recovers_is_retried_and_delivered_once(tmp_path, webhook):
    hook = webhook([500, 503])
    sink, err = sink_for(tmp_path, webhook=hook.url())
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.inf})])
    assert [r["status"] for r in hook.received] == [500, 503, 200]
    assert len(hook.delivered) == 1 and "could not deliver" not in err.getvalue()
    assert alert_log(tmp_path)[0]["delivered"] == {"stderr": True, "webhook": True}


def test_a_webhook_that_is_down_is_one_clear_line_and_the_sink_goes_on(tmp_path):
    sink, err = sink_for(tmp_path, webhook=f"http://127.0.0.1:{closed_port()}/hook", webhook_tries=2,
                         min_interval=0)
    r = Feed()
    feed_all(sink, [r("on_log", 0, metrics={"loss": math.nan}), r("alert", 1, kind="spike", message="m")])
    failures = [line for line in err.getvalue().splitlines() if "could not deliver" in line]
    assert len(failures) == 2 and "[nonfinite-loss] to the webhook at 127.0.0.1:" in failures[0]
    assert "2 tries" in failures[0]
    assert [a["delivered"]["webhook"] for a in alert_log(tmp_path)] == [False, False]
    assert sink.failures == 2


def test_a_webhook_that_refuses_is_not_retried(tmp_path, webhook):
    hook = webhook([404])
    sink, err = sink_for(tmp_path, webhook=hook.url())
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.nan})])
    assert len(hook.received) == 1 and "HTTP 404 (1 try)" in err.getvalue()


def test_slack_and_discord_payloads(tmp_path, webhook):
    for fmt, field in (("slack", "text"), ("discord", "content")):
        hook = webhook()
        sink, _ = sink_for(tmp_path / fmt, webhook=hook.url(), webhook_format=fmt)
        feed_all(sink, [Feed()("on_log", 0, step=3, metrics={"loss": math.nan})])
        assert list(hook.delivered[0]) == [field]
        assert hook.delivered[0][field].startswith(f"ALERT [nonfinite-loss] run {RUN} step 3: loss is nan")


def test_the_webhook_url_secrets_never_show(tmp_path, webhook):
    hook = webhook()
    url = f"http://bot:hunter2@127.0.0.1:{hook.port}/services/T000/SECRETTOKEN?key=abc"
    sink, err = sink_for(tmp_path, webhook=url)
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.nan})])
    assert hook.received[0]["path"] == "/services/T000/SECRETTOKEN?key=abc"
    assert hook.received[0]["headers"]["Authorization"].startswith("Basic ")
    shown = err.getvalue() + (tmp_path / "out" / "alerts" / f"{RUN}.jsonl").read_text()
    for secret in ("hunter2", "SECRETTOKEN", "abc", "bot"):
        assert secret not in shown
    assert webhook_host(url) == f"127.0.0.1:{hook.port}"


def test_exec_gets_the_alert_on_stdin_and_a_failing_command_is_one_line(tmp_path):
    got = tmp_path / "got.json"
    sink, err = sink_for(tmp_path / "ok", exec_cmd=f"cat > {got}")
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.nan})])
    assert json.loads(got.read_text())["rule"] == "nonfinite-loss"
    assert "could not deliver" not in err.getvalue()

    sink, err = sink_for(tmp_path / "bad", exec_cmd="exit 3")
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.nan})])
    assert "could not deliver alert [nonfinite-loss] with --exec: exit status 3" in err.getvalue()

    sink, err = sink_for(tmp_path / "slow", exec_cmd="sleep 30", exec_timeout=0.5)
    feed_all(sink, [Feed()("on_log", 0, metrics={"loss": math.nan})])
    assert "still running after 0.5 s: killed" in err.getvalue()


def test_bad_options_fail_when_built():
    for kwargs, field in (({"webhook": "ftp://x/y"}, "webhook"), ({"webhook_format": "teams"}, "webhook_format"),
                          ({"throughput_drop": 1.5}, "throughput_drop"), ({"disable": ["nan"]}, "disable"),
                          ({"eval_patience": -1}, "eval_patience")):
        with pytest.raises(ValueError, match=field):
            AlertSink(**kwargs)


# -- the command ------------------------------------------------------------------------------------------


def ended_run(root: Path, run_id: str = RUN) -> RunInfo:
    """A completed run on disk (its trainer gone) whose journal has a NaN loss."""
    bus_dir = root / registry.BUS_DIRNAME / run_id
    bus_dir.mkdir(parents=True)
    pid = dead_pid()
    data = {"run_id": run_id, "name": "done", "pid": pid, "host": socket.gethostname(), "started": 1_767_225_600.0,
            "status": registry.COMPLETED, "world_size": 1, "last_step": 2,
            "ranks": {"0": {"pub": f"ipc:///nonexistent/{run_id}/pub", "replay": f"ipc:///nonexistent/{run_id}/replay",
                            "inbox": f"ipc:///nonexistent/{run_id}/inbox", "pid": pid}}}
    registry.write_json_atomic(bus_dir / registry.RUN_FILE, data)
    info = RunInfo(bus_dir, data)
    r = Feed(run_id)
    recs = [r("on_train_begin", 0, step=0), r("on_log", 1, step=1, metrics={"loss": 2.0}),
            r("on_log", 2, step=2, metrics={"loss": math.nan}), r("end", 3, step=2, status="completed")]
    info.journal_path(0).write_bytes(b"".join(encode(rec) + b"\n" for rec in recs))
    return info


def fg_sink(fg_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FG_HOME=str(fg_home), PYTHONUNBUFFERED="1")
    return subprocess.run([FG_SINK, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_command_with_a_webhook_that_is_down_still_exits_0(fg_home, tmp_path):
    info = ended_run(tmp_path / "out")
    done = fg_sink(fg_home, "alert", "--run", str(info.bus_dir), "--webhook",
                   f"http://127.0.0.1:{closed_port()}/x")
    assert done.returncode == 0, explain(done)
    lines = done.stderr.splitlines()
    assert sum("ALERT [nonfinite-loss]" in line for line in lines) == 1, explain(done)
    assert sum("could not deliver alert [nonfinite-loss] to the webhook at 127.0.0.1:" in line
               for line in lines) == 1, explain(done)
    assert "Traceback" not in done.stderr
    logged = (tmp_path / "out" / "alerts" / f"{RUN}.jsonl").read_text().splitlines()
    assert len(logged) == 1 and json.loads(logged[0])["delivered"]["webhook"] is False


@pytest.mark.parametrize("args, says", [
    (["--throughput-drop", "2"], "fraction"), (["--disable", "nan"], "unknown rule 'nan'"),
    (["--webhook", "ftp://example.com/x"], "http:// or https://"), (["--webhook-format", "teams"], "invalid choice"),
    (["--eval-patience", "-1"], "whole number")])
def test_the_command_refuses_bad_options(fg_home, capsys, args, says):
    from sinks.cli import main

    try:
        code = main(["alert", "--nice", "0", *args])
    except SystemExit as e:  # argparse's usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
