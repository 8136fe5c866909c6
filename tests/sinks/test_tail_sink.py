"""TailSink fed records directly, writing to a StringIO."""

from __future__ import annotations

import io
import math

from fg_bus.records import decode
from sinks.tail_sink import TailSink

RUN_ID = "tail-20260101-000000-abcd"
ESC = "\x1b["


def rec(seq: int, event: str, step: int = 0, metrics: dict | None = None, **extra) -> dict:
    record = {"v": 1, "run": RUN_ID, "rank": 0, "seq": seq, "timestamp": "2026-01-01T00:00:00+00:00",
              "event": event, "global_step": step, "epoch": step / 4, "metrics": metrics or {}}
    record.update(extra)
    return record


def a_run() -> list[dict]:
    meta = {"name": "tiny-demo", "model": {"factory": "tests:TinyRegression"}, "num_parameters": 12345,
            "max_steps": 8}
    return [
        rec(0, "on_train_begin", 0, meta=meta),
        rec(1, "on_step_begin", 0),
        rec(2, "on_step_end", 1, {"loss": 2.0}),
        rec(3, "on_log", 2, {"loss": 1.9, "learning_rate": 0.001, "grad_norm": 1.35, "epoch": 0.5}),
        rec(4, "heartbeat", 2),
        rec(5, "on_log", 4, {"eval_loss": 1.25, "eval_accuracy": 0.75, "eval_runtime": 0.5,
                             "eval_samples_per_second": 99.0}),
        rec(6, "on_save", 4, checkpoint="out/checkpoint-4"),
        rec(7, "textgen", 4, prompt="Once upon", text=" a time", prompt_index=0),
        rec(8, "control", 4, cmd="save", applied=True),
        rec(9, "control", 4, cmd="set_lr", applied=False, reason="lr must be positive"),
        rec(10, "on_log", 8, {"train_loss": 1.7, "train_runtime": 12.5, "train_steps_per_second": 0.64}),
        rec(11, "on_train_end", 8),
        rec(12, "end", 8, status="completed"),
    ]


def run_tail(recs: list[dict], **kwargs) -> list[str]:
    stream = io.StringIO()
    sink = TailSink(stream=stream, **kwargs)
    for r in recs:
        sink.handle(r)
    sink.close()
    text = stream.getvalue()
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def test_the_default_view():
    lines = run_tail(a_run())
    # shown: train begin, log, eval, save, sample, two controls, done, end; not step begin/end, heartbeat,
    # on_train_end
    assert len(lines) == 9, lines
    begin, log, evaluation, save, sample, applied, refused, done, end = lines

    assert RUN_ID in begin and "tiny-demo" in begin and "tests:TinyRegression" in begin
    assert "12,345 parameters" in begin and "8 steps" in begin

    assert "step 2" in log and "epoch 0.5" in log
    assert "loss 1.9" in log and "lr 1.00e-03" in log and "grad_norm 1.35" in log

    assert "step 4" in evaluation and "eval" in evaluation
    assert "eval_loss 1.25" in evaluation and "eval_accuracy 0.75" in evaluation
    assert "runtime" not in evaluation and "per_second" not in evaluation

    assert "saved" in save and "out/checkpoint-4" in save
    assert "sample" in sample and "Once upon" in sample and " a time" in sample

    assert "control save applied" in applied
    assert "control set_lr refused" in refused and "(lr must be positive)" in refused

    assert "train_loss 1.7" in done and "12.5 s" in done

    assert "step 8" in end and "end: completed" in end


def test_end_shows_a_bad_status():
    lines = run_tail([rec(0, "end", 3, status="failed")])
    assert len(lines) == 1 and "end: failed" in lines[0] and "step 3" in lines[0]


def test_a_nan_loss_is_shown():
    lines = run_tail([rec(0, "on_log", 1, {"loss": math.nan, "grad_norm": math.inf})])
    assert len(lines) == 1 and "loss nan" in lines[0] and "grad_norm inf" in lines[0]


def test_train_begin_without_parameters():
    lines = run_tail([rec(0, "on_train_begin", 0, meta={"name": "x"})])
    assert lines == [f"run {RUN_ID} started"]


def test_events_outside_the_default_set_print_nothing():
    assert run_tail([rec(0, "on_step_begin"), rec(1, "on_step_end", 1, {"loss": 1.0}), rec(2, "heartbeat"),
                     rec(3, "on_train_end")]) == []


def test_named_events_narrow_the_view_but_keep_the_end():
    lines = run_tail(a_run(), events=["on_save"])
    assert len(lines) == 2, lines
    assert "saved" in lines[0] and "out/checkpoint-4" in lines[0]
    assert "end: completed" in lines[1]


def test_named_events_can_include_others():
    lines = run_tail(a_run(), events=["on_step_end"])
    assert len(lines) == 2, lines
    assert "on_step_end" in lines[0] and "loss=2" in lines[0]
    assert "end: completed" in lines[1]


def test_colour():
    plain = run_tail(a_run(), colour=False)
    assert plain and not any(ESC in line for line in plain)
    coloured = run_tail(a_run(), colour=True)
    assert len(coloured) == len(plain)
    assert all(ESC in line for line in coloured)  # every line has at least its dim step prefix
    assert any("\x1b[0m" in line for line in coloured)  # and resets


def test_a_stringio_defaults_to_no_colour():
    stream = io.StringIO()
    sink = TailSink(stream=stream)
    assert sink.colour is False
    for r in a_run():
        sink.handle(r)
    assert stream.getvalue() and ESC not in stream.getvalue()


def test_a_terminal_defaults_to_colour():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    sink = TailSink(stream=stream)
    assert sink.colour is True
    sink.handle(rec(0, "on_save", 4, checkpoint="c"))
    assert ESC in stream.getvalue()


def test_json_prints_every_record():
    recs = a_run() + [rec(13, "on_log", 9, {"loss": math.nan})]
    lines = run_tail(recs, as_json=True)
    assert len(lines) == len(recs)  # with --json every record, on_step_begin and heartbeat too
    for line, r in zip(lines, recs):
        assert ESC not in line
        got = decode(line)
        if r["seq"] == 13:
            assert math.isnan(got["metrics"]["loss"])
            got["metrics"]["loss"] = r["metrics"]["loss"] = 0.0
        assert got == r


def test_json_with_named_events():
    lines = run_tail(a_run(), as_json=True, events=["on_log"])
    got = [decode(line) for line in lines]
    assert [r["seq"] for r in got] == [3, 5, 10, 12]
    assert [r["event"] for r in got] == ["on_log", "on_log", "on_log", "end"]


def test_json_ignores_colour():
    lines = run_tail(a_run()[:4], as_json=True, colour=True)
    assert len(lines) == 4 and not any(ESC in line for line in lines)


def test_a_skipped_sample_says_why():
    import io

    from sinks.tail_sink import TailSink

    stream = io.StringIO()
    TailSink(stream=stream, colour=False).handle(
        {"v": 1, "run": "r", "rank": 0, "seq": 4, "timestamp": "t", "event": "textgen", "global_step": 50,
         "epoch": 0.5, "prompt": "The ", "text": None, "skipped": "the snapshot was rotated away before generation"})
    assert stream.getvalue() == ("[step 50 | epoch 0.5] sample skipped 'The ': "
                                 "the snapshot was rotated away before generation\n")


# -- issue 13: progress, every metric, system lines, stalls, stragglers, the status line --------------------

import os  # noqa: E402
import pty  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from sinks.cli import build_sink, parser  # noqa: E402

T0 = datetime(2026, 12, 1, 18, 0, 0, tzinfo=timezone.utc)


class Tty(io.StringIO):
    def isatty(self):
        return True


def timed(seq: int, event: str, step: int, seconds: float, metrics: dict | None = None, rank: int = 0, **extra):
    r = rec(seq, event, step, metrics, **extra)
    r.update(rank=rank, timestamp=(T0 + timedelta(seconds=seconds)).isoformat())
    if event in ("warning", "heartbeat", "end"):  # bus records: a step, no epoch
        del r["epoch"], r["metrics"]
    return r


def steps_of(first: int, last: int, step_time: float = 0.1, rank: int = 0, seq: int = 100, t: float = 0.0):
    out = []
    for step in range(first, last + 1):
        out.append(timed(seq, "on_step_begin", step - 1, t, rank=rank))
        t += step_time
        out.append(timed(seq + 1, "on_step_end", step, t, {"loss": 2.0}, rank=rank))
        seq += 2
    return out


def begin(max_steps: int = 100, world_size: int = 1, rank: int = 0) -> dict:
    meta = {"name": "m", "model": {"factory": "f"}, "num_parameters": 10, "max_steps": max_steps,
            "world_size": world_size, "args": {"max_steps": max_steps}}
    return timed(0, "on_train_begin", 0, 0.0, rank=rank, meta=meta)


LOG = {"loss": 1.234567, "grad_norm": 0.5, "learning_rate": 3e-4, "epoch": 0.25, "zeta_custom": 7.0,
       "alpha_custom": 0.125, "tokens_per_second": 12345.0, "samples_per_second": 80.0, "step_time": 0.05,
       "num_input_tokens_seen": 64000, "peak_memory_mb": 812.0, "mfu": 0.31}


def test_a_log_line_has_progress_every_metric_in_order_the_rate_and_the_eta():
    recs = [begin(100)] + steps_of(1, 25) + [timed(999, "on_log", 25, 2.5, LOG)]
    line = run_tail(recs)[-1]
    assert line.startswith("[step 25 | epoch 6.25] ")
    order = ["loss 1.235", "grad_norm 0.5", "lr 3.00e-04", "12.3k tok/s", "80 samples/s", "step 50ms",
             "tokens 64k", "peak 812 MB", "mfu 31.0%", "alpha_custom 0.125", "zeta_custom 7"]
    positions = [line.index(part) for part in order]
    assert positions == sorted(positions), line
    assert "epoch 0.25" not in line  # the log's epoch key is the prefix's epoch
    assert line.endswith("| 25/100 25%, 10 steps/s, ETA 8s")  # 75 steps left at 10 steps/s (on_step_end 0.1 s apart)


def test_a_logged_step_rate_is_the_one_rate_shown():
    recs = [begin(100)] + steps_of(1, 5) + [timed(999, "on_log", 5, 0.5, {"loss": 1.0, "steps_per_second": 9.5})]
    line = run_tail(recs)[-1]
    assert "9.5 steps/s" in line and line.count("steps/s") == 1 and line.endswith("| 5/100 5%, ETA 10s")


def test_an_eval_line_shows_every_eval_metric():
    line = run_tail([begin(), timed(1, "on_log", 50, 1.0, {"eval_loss": 1.5, "eval_zcustom": 3.0, "eval_acc": 0.9,
                                                           "eval_runtime": 0.25, "eval_samples_per_second": 400.0,
                                                           "eval_steps_per_second": 50.0, "epoch": 1.0})])[-1]
    assert "eval  eval_loss 1.5  eval_acc 0.9  eval_zcustom 3  (250ms, 400 samples/s)" in line


SYSTEM = {"cpu_percent": 97.6, "host_cpu_percent": 50.0, "rss_mb": 2048.0, "host_memory_used_mb": 8192.0,
          "host_memory_total_mb": 16384.0, "host_memory_percent": 50.0, "disk_free_gb": 120.4,
          "gpu0_utilization": 99.0, "gpu0_memory_used_mb": 40960.0, "gpu0_memory_total_mb": 81920.0,
          "gpu0_power_w": 312.4, "gpu0_temperature_c": 71.0, "gpu0_sm_clock_mhz": 1980.0, "gpu0_throttle": 4.0}


def system_records(times, rank=0):
    return [timed(50 + i, "system", 10, t, SYSTEM, rank=rank,
                  gpus=[{"index": 0, "name": "H200", "throttle_reasons": ["sw_power_cap"]}]) for i, t in enumerate(times)]


def test_system_lines_are_compact_and_at_most_one_per_rank_per_30_s():
    lines = run_tail([begin()] + system_records([1, 11, 21, 31, 45, 62]), ranks="all")[1:]
    assert len(lines) == 3, lines  # at 1, 31 and 62 s
    assert lines[0] == ("[rank 0 | step 10 | epoch 2.5] system  cpu 98%  rss 2048 MB  host mem 8.0/16.0 GB  "
                        "disk 120 GB free  gpu0 99% 40.0/80 GB 312W 71C throttled: sw_power_cap")
    both = run_tail([begin()] + system_records([1, 11]) + system_records([2, 12], rank=1), ranks="all")[1:]
    assert [line.split(" |")[0] for line in both] == ["[rank 0", "[rank 1"]
    assert len(run_tail([begin()] + system_records([1, 2, 3]), system_every=0)) == 4


def test_stalled_and_stall_cleared_lines_are_marked():
    recs = [begin(), timed(1, "warning", 30, 130.0, kind="stalled", stalled_for=125.0, message="no step since 30"),
            timed(2, "heartbeat", 30, 131.0, stalled_for=126.0),
            timed(3, "warning", 31, 140.0, kind="stall-cleared", stalled_for=135.0, message="steps resumed")]
    lines = run_tail(recs)
    assert lines[1] == "[step 30] STALLED  no step since 30"
    assert lines[2] == "[step 31] stall cleared  steps resumed" and len(lines) == 3
    red = run_tail(recs, colour=True)
    assert "\x1b[31mSTALLED\x1b[0m" in red[1]
    bare = run_tail([timed(1, "warning", 30, 130.0, kind="stalled", stalled_for=125.0),
                     timed(2, "warning", 31, 140.0, kind="stall-cleared", stalled_for=135.0)])
    assert bare == ["[step 30] STALLED  no progress for 2m05s", "[step 31] stall cleared  after 2m15s"]


def test_a_straggler_is_named_once():
    recs = [begin(world_size=2), begin(world_size=2, rank=1)]
    for step in range(1, 41):
        recs += steps_of(step, step, 0.1, rank=0, seq=10 * step, t=step)
        recs += steps_of(step, step, 0.3, rank=1, seq=10 * step, t=step)
    lines = [line for line in run_tail(recs, ranks="all") if "STRAGGLER" in line]
    assert lines == ["[rank 1 | step 20 | epoch 5] STRAGGLER  rank 1 is a straggler: median step 300ms against "
                     "100ms on the other ranks"]


def test_record_text_in_metric_names_is_escaped():
    lines = run_tail([rec(0, "on_log", 1, {"evil\x1b]0;x\x07": 1.0, "loss": 1.0})], colour=True)
    assert "\x1b]" not in lines[0] and "\\x1b]0;x\\x07" in lines[0]


def test_the_status_line_on_a_terminal():
    stream = Tty()
    sink = TailSink(stream=stream, colour=False, progress=True)
    for r in [begin(100)] + steps_of(1, 25):
        sink.handle(r)
    sink._status_drawn = 0.0  # the redraw is rate-limited by the wall clock; the test does not wait
    sink.handle(steps_of(26, 26, t=2.5)[1])
    drawn = stream.getvalue()
    assert "\rstep 26/100 26% | 10 steps/s | ETA 7s | \r" not in drawn  # no loss yet: no trailing separator
    assert "\rstep 26/100 26% | 10 steps/s | ETA 7s" in drawn
    sink.handle(timed(999, "on_log", 26, 2.6, {"loss": 1.5}))
    tail = stream.getvalue()[len(drawn):]
    width = len("step 26/100 26% | 10 steps/s | ETA 7s")
    # cleared (spaces over it), the line, then the status line drawn again below it, with the loss
    assert tail.startswith("\r" + " " * width + "\r[step 26 | epoch 6.5] loss 1.5  | 26/100 26%, 10 steps/s, ETA 7s\n")
    assert tail.endswith("\rstep 26/100 26% | 10 steps/s | ETA 7s | loss 1.5\r")
    sink.handle(timed(1000, "end", 26, 3.0, status="completed"))
    assert stream.getvalue().endswith("end: completed\n")  # cleared for good at the end, not drawn again
    sink.close()
    assert stream.getvalue().endswith("end: completed\n")


def test_no_status_line_when_piped_or_in_json():
    recs = [begin(100)] + steps_of(1, 25) + [timed(999, "on_log", 25, 2.5, {"loss": 1.0})]
    assert "\r" not in "".join(run_tail(recs, progress=True))
    stream = Tty()
    sink = TailSink(stream=stream, as_json=True, progress=True)
    for r in recs:
        sink.handle(r)
    assert "\r" not in stream.getvalue()


def test_the_tail_options():
    opts = parser().parse_args(["tail", "--progress", "--system-every", "5"])
    sink = build_sink(opts)
    assert sink.system_every == 5.0 and sink.progress is False  # asked for, but stdout here is not a terminal
    assert build_sink(parser().parse_args(["tail"])).system_every == 30.0
    assert "system" in build_sink(parser().parse_args(["tail"])).events


def test_fg_train_sinks_tail_in_a_terminal_keeps_a_status_line(tmp_path):
    """The real path: fg-train's stdout is a terminal (a pty), so its tail sink gets --progress."""
    master, slave = pty.openpty()
    env = {**os.environ, "FG_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fg-train"), str(Path(__file__).parents[1] / "e2e" /
                             "tiny.yaml"), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
                             "--max-steps", "60", "--system-interval", "0", "--sinks", "tail"],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the pty has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(60) == 0, proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    text = out.decode(errors="replace")
    assert "end: completed" in text, text[-2000:]
    assert "\rstep " in text, text[-2000:]  # the status line was drawn
    assert "/60 " in text.split("\rstep ", 1)[1].split("\r", 1)[0]


def test_the_status_line_says_stalled_from_the_heartbeats():
    sink = TailSink(stream=Tty(), colour=False, progress=True)
    for r in [begin(100)] + steps_of(1, 20) + [timed(900, "heartbeat", 20, 130.0, stalled_for=128.0)]:
        sink.handle(r)
    assert sink.status_line() == "step 20/100 20% | 10 steps/s | ETA 8s | STALLED 2m08s"
    sink.handle(timed(901, "heartbeat", 20, 131.0))
    assert "STALLED" not in sink.status_line()
