"""RunView fed records shaped as a real fg-train journal writes them (tests/e2e/tiny.yaml, 60 steps), plus the
throughput keys, system records and stall warnings of issue 13."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

from fg_bus.monitor import (SERIES_MAX, RunView, format_duration, format_value, metric_label,
                            ordered_metrics)

RUN = "mon_out-20261201-175609-3cd8"
T0 = datetime(2026, 12, 1, 17, 56, 13, tzinfo=timezone.utc)
META = {"name": "mon_out",
        "args": {"output_dir": "/tmp/mon_out", "max_steps": 60, "logging_steps": 5, "eval_steps": 50,
                 "metric_for_best_model": None, "greater_is_better": None, "learning_rate": 0.001},
        "model": {"factory": "trainer.chargpt:CharGPT", "config": {"vocab_size": 104, "n_layer": 1}},
        "num_parameters": 5232, "max_steps": 60, "world_size": 1, "host": "vm", "pid": 27168,
        "output_dir": "/tmp/mon_out", "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}}


class Stream:
    """One rank's records, with seq and timestamps as the bus writes them."""

    def __init__(self, rank: int = 0, step_time: float = 0.1):
        self.rank, self.seq, self.t, self.step_time = rank, 0, T0, step_time

    def rec(self, event: str, step: int, metrics: dict | None = None, epoch: float | None = None, **extra):
        record = {"v": 1, "run": RUN, "rank": self.rank, "seq": self.seq,
                  "timestamp": self.t.isoformat(), "event": event, "global_step": step,
                  "epoch": step / 6540 if epoch is None else epoch, "metrics": metrics or {}}
        if event in ("end", "heartbeat"):
            del record["epoch"], record["metrics"]
        record.update(extra)
        self.seq += 1
        return record

    def steps(self, first: int, last: int, step_time: float | None = None):
        """on_step_begin .. on_step_end for steps first..last, `step_time` s each."""
        for step in range(first, last + 1):
            yield self.rec("on_step_begin", step - 1)
            yield self.rec("on_pre_optimizer_step", step - 1)
            self.t += timedelta(seconds=self.step_time if step_time is None else step_time)
            yield self.rec("on_step_end", step, {"loss": 4.6, "grad_norm": 1.1})


def log_metrics(step: int) -> dict:
    return {"loss": 4.6 - step / 100, "grad_norm": 1.35, "learning_rate": 0.001 * (1 - step / 60),
            "samples_per_second": 40.0, "steps_per_second": 10.0, "step_time": 0.1, "tokens_per_second": 640.0,
            "num_input_tokens_seen": step * 64, "my_accuracy": 0.5 + step / 200, "epoch": step / 6540}


def a_run(stream: Stream | None = None) -> list[dict]:
    s = stream or Stream()
    out = [s.rec("on_init_end", 0, epoch=0), s.rec("on_train_begin", 0, epoch=0, meta=META),
           s.rec("on_epoch_begin", 0, epoch=0)]
    for step in range(5, 31, 5):
        out += s.steps(step - 4, step)
        out.append(s.rec("on_log", step, log_metrics(step)))
    out.append(s.rec("system", 30, {"cpu_percent": 97.5, "host_cpu_percent": 60.1, "rss_mb": 512.3,
                                    "host_memory_used_mb": 8000.0, "host_memory_total_mb": 16000.0,
                                    "host_memory_percent": 50.0, "disk_free_gb": 123.4,
                                    "gpu0_utilization": 99.0, "gpu0_memory_used_mb": 20480.0,
                                    "gpu0_power_w": 250.0, "gpu0_temperature_c": 65.0},
                     gpus=[{"index": 0, "name": "NVIDIA H200", "throttle_reasons": []}]))
    out.append(s.rec("textgen", 30, prompt="The ", text="quick brown", prompt_index=0))
    out.append(s.rec("on_log", 30, {"eval_loss": 4.18, "eval_runtime": 0.0047, "eval_samples_per_second": 1715.8,
                                    "eval_steps_per_second": 214.5, "epoch": 30 / 6540}))
    out.append(s.rec("on_evaluate", 30, {"eval_loss": 4.18, "eval_runtime": 0.0047,
                                         "eval_samples_per_second": 1715.8, "eval_steps_per_second": 214.5,
                                         "epoch": 30 / 6540}))
    return out


def feed(view: RunView, recs) -> RunView:
    for r in recs:
        view.feed(r)
    return view


def test_formatting():
    assert format_duration(12) == "12s" and format_duration(185) == "3m05s" and format_duration(3725) == "1h02m"
    assert format_duration(2 * 86400 + 3 * 3600) == "2d03h"
    assert format_duration(None) == "-" and format_duration(math.inf) == "-" and format_duration(-3) == "0s"
    assert format_value("learning_rate", 0.001) == "1.00e-03"
    assert format_value("loss", 4.613552856445312) == "4.614"
    assert format_value("loss", math.nan) == "nan" and format_value("grad_norm", math.inf) == "inf"
    assert format_value("tokens_per_second", 12345.6) == "12.3k tok/s"
    assert format_value("samples_per_second", 471.117) == "471 samples/s"
    assert format_value("steps_per_second", 2.5) == "2.5 steps/s"
    assert format_value("step_time", 0.0123) == "12.3ms" and format_value("step_time", 2.5) == "2.5s"
    assert format_value("peak_memory_mb", 812.4) == "812 MB" and format_value("peak_memory_mb", 20480) == "20.0 GB"
    assert format_value("mfu", 0.412) == "41.2%"
    assert format_value("num_input_tokens_seen", 1234567) == "1.23M"
    assert format_value("gpu0_utilization", 97.0) == "97%" and format_value("gpu1_temperature_c", 65.0) == "65C"
    assert format_value("gpu0_power_w", 250.3) == "250W" and format_value("rss_mb", 512.3) == "512 MB"
    assert format_value("my_metric", 0.123456) == "0.1235" and format_value("count", 7) == "7"
    assert format_value("x", None) == "-" and format_value("x", "text") == "text"
    assert metric_label("learning_rate") == "lr" and metric_label("my_metric") == "my_metric"


def test_ordered_metrics():
    names = ["zeta", "learning_rate", "mfu", "alpha", "loss", "tokens_per_second", "grad_norm", "eval_loss",
             "step_time", "loss"]
    assert ordered_metrics(names) == ["loss", "eval_loss", "grad_norm", "learning_rate", "tokens_per_second",
                                      "step_time", "mfu", "alpha", "zeta"]


def test_a_run_in_progress():
    view = feed(RunView(), a_run())
    assert view.run_id == RUN and view.name == "mon_out" and view.status == "live"
    assert view.world_size == 1 and view.max_steps == 60 and view.global_step == 30
    assert view.progress == 0.5
    assert math.isclose(view.steps_per_second, 10.0, rel_tol=1e-6)  # from on_step_end timestamps, 0.1 s apart
    assert math.isclose(view.eta_s, 3.0, rel_tol=1e-6)
    assert math.isclose(view.last_loss, 4.3)
    assert view.best_eval == ("eval_loss", 4.18, 30)
    # every metric of the training log, custom ones too, but not epoch; eval metrics apart
    assert set(view.latest) == {"loss", "grad_norm", "learning_rate", "samples_per_second", "steps_per_second",
                                "step_time", "tokens_per_second", "num_input_tokens_seen", "my_accuracy"}
    assert view.latest["my_accuracy"] == 0.5 + 30 / 200
    assert view.eval_latest["eval_loss"] == 4.18 and "epoch" not in view.eval_latest
    assert [s for s, _ in view.series["loss"]] == [5, 10, 15, 20, 25, 30]
    assert view.series["eval_loss"] == [(30, 4.18)]  # on_log and on_evaluate of the same eval: one point
    assert view.series["tokens_per_second"][-1] == (30, 640.0)
    assert view.system[0]["gpu0_utilization"] == 99.0 and view.system[0]["timestamp"] > 0
    assert view.gpus[0][0]["name"] == "NVIDIA H200"
    assert list(view.samples) == [(30, "The ", "quick brown")]
    assert view.stalled_for is None and view.stragglers == []
    summary = view.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["best_eval"] == {"name": "eval_loss", "value": 4.18, "step": 30}
    assert summary["progress"] == 0.5 and summary["system"]["0"]["rss_mb"] == 512.3


def test_a_stall_and_its_clearing():
    s = Stream()
    view = feed(RunView(), a_run(s))
    view.set_status("live")
    s.t += timedelta(seconds=125)
    view.feed(s.rec("warning", 30, kind="stalled", stalled_for=125.0,
                    message="no step for 125 s (last step 30)"))
    assert view.status == "stalled" and view.stalled_for == 125.0
    s.t += timedelta(seconds=1)
    view.feed(s.rec("heartbeat", 30, stalled_for=126.0))
    assert view.stalled_for == 126.0 and view.status == "stalled"
    kinds = [kind for _, kind, _ in view.events]
    assert kinds[-1] == "stalled"
    feed(view, s.steps(31, 31))
    view.feed(s.rec("warning", 31, kind="stall-cleared", stalled_for=127.0, message="steps resumed after 127 s"))
    assert view.status == "live" and view.stalled_for is None
    assert [kind for _, kind, _ in view.events][-1] == "stall-cleared"
    view.feed(s.rec("heartbeat", 31))
    assert view.status == "live"


def test_a_stalled_heartbeat_alone_marks_a_late_joiner_stalled():
    s = Stream()
    view = feed(RunView(), a_run(s)[:10])
    view.feed(s.rec("heartbeat", 3, stalled_for=300.0))
    assert view.status == "stalled" and view.stalled_for == 300.0
    view.set_status("dead")  # the subscriber says so: a dead run is not "stalled"
    assert view.status == "dead" and view.stalled_for is None


def test_the_end_and_the_final_log():
    s = Stream()
    recs = a_run(s)
    recs += s.steps(31, 60)
    recs.append(s.rec("on_log", 60, {"train_runtime": 6.2, "train_samples_per_second": 38.0,
                                     "train_steps_per_second": 9.6, "total_flos": 0.0, "train_loss": 4.3}))
    recs.append(s.rec("on_save", 60, checkpoint="/tmp/mon_out/checkpoint-60"))
    recs.append(s.rec("on_train_end", 60))
    recs.append(s.rec("end", 60, status="completed"))
    view = feed(RunView(), recs)
    assert view.status == "completed" and view.end_status == "completed" and view.progress == 1.0
    assert view.eta_s is None
    assert view.final["train_loss"] == 4.3 and "train_loss" not in view.latest
    assert [kind for _, kind, _ in view.events][-2:] == ["save", "end"]
    failed = feed(RunView(), [Stream().rec("end", 3, status="failed")])
    assert failed.status == "failed"


def test_best_eval_follows_metric_for_best_model():
    s = Stream()
    meta = {**META, "args": {**META["args"], "metric_for_best_model": "accuracy", "greater_is_better": None}}
    view = feed(RunView(), [s.rec("on_train_begin", 0, meta=meta)])
    for step, acc in ((10, 0.5), (20, 0.7), (30, 0.6), (40, math.nan)):
        view.feed(s.rec("on_evaluate", step, {"eval_loss": 1.0, "eval_accuracy": acc}))
    assert view.best_eval == ("eval_accuracy", 0.7, 20)


def test_series_stay_bounded():
    s = Stream()
    view = RunView()
    for step in range(1, 5 * SERIES_MAX):
        view.feed(s.rec("on_log", step, {"loss": 1.0 / step}))
    points = view.series["loss"]
    assert len(points) <= SERIES_MAX and points[-1] == (5 * SERIES_MAX - 1, 1.0 / (5 * SERIES_MAX - 1))
    assert points[0][0] == 1 and [p[0] for p in points] == sorted(p[0] for p in points)


def test_several_ranks_metrics_from_rank_0_steps_and_system_per_rank():
    r0, r1 = Stream(0), Stream(1)
    view = RunView()
    feed(view, [r0.rec("on_train_begin", 0, meta={**META, "world_size": 2}),
                r1.rec("on_train_begin", 0, meta={**META, "world_size": 2})])
    feed(view, r0.steps(1, 10))
    feed(view, r1.steps(1, 7))
    view.feed(r0.rec("on_log", 10, {"loss": 2.0}))
    view.feed(r1.rec("on_log", 7, {"loss": 9.0, "rank1_only": 1.0}))
    view.feed(r0.rec("system", 10, {"cpu_percent": 10.0}))
    view.feed(r1.rec("system", 7, {"cpu_percent": 20.0, "gpu1_utilization": 50.0}))
    assert view.world_size == 2 and view.steps == {0: 10, 1: 7} and view.global_step == 10
    assert view.latest == {"loss": 2.0}
    assert view.system[0]["cpu_percent"] == 10.0 and view.system[1]["gpu1_utilization"] == 50.0
    view.feed(r1.rec("warning", 7, kind="stalled", stalled_for=130.0, message="stalled"))
    assert view.status == "stalled" and view.stalled_ranks == [1]


def straggler_run(step_times: dict[int, float], steps: int) -> RunView:
    streams = {rank: Stream(rank, t) for rank, t in step_times.items()}
    view = RunView()
    for stream in streams.values():
        view.feed(stream.rec("on_train_begin", 0, meta={**META, "world_size": len(streams)}))
    for step in range(1, steps + 1):
        for stream in streams.values():
            feed(view, stream.steps(step, step))
    return view


def test_a_rank_slower_than_1_5_times_the_others_median_is_a_straggler():
    # 19 steps: not enough yet (at least 20 in the window)
    assert straggler_run({0: 0.1, 1: 0.1, 2: 0.2}, 19).stragglers == []
    view = straggler_run({0: 0.1, 1: 0.1, 2: 0.2}, 20)
    assert view.stragglers == [2]
    assert [text for _, kind, text in view.events if kind == "straggler"] == [
        "rank 2 is a straggler: median step 200ms against 100ms on the other ranks"]
    assert math.isclose(view.step_time_medians()[2], 0.2, rel_tol=1e-6)
    # 1.4x: not a straggler; equal ranks: none; two ranks, one twice as slow: that one
    assert straggler_run({0: 0.1, 1: 0.1, 2: 0.14}, 30).stragglers == []
    assert straggler_run({0: 0.1, 1: 0.1}, 30).stragglers == []
    assert straggler_run({0: 0.1, 1: 0.2}, 30).stragglers == [1]


def test_a_straggler_is_announced_once_and_recovers_after_the_window():
    streams = {0: Stream(0), 1: Stream(1)}
    view = RunView()
    announced = []
    for step in range(1, 41):
        for rank, stream in streams.items():
            for record in stream.steps(step, step, step_time=0.3 if rank == 1 else 0.1):
                view.feed(record)
                announced += view.new_stragglers
    assert announced == [1] and view.stragglers == [1]
    # rank 1 recovers: once most of its last 50 steps are fast, it is no straggler
    for step in range(41, 101):
        for stream in streams.values():
            feed(view, stream.steps(step, step, step_time=0.1))
    assert view.stragglers == []
    assert len([k for _, k, _ in view.events if k == "straggler"]) == 1


def test_under_ddp_the_rank_that_begins_late_is_the_straggler_not_the_ones_waiting_for_it():
    """Synchronous ranks: rank 1's data loader takes 0.1 s more, so it begins each step 0.1 s late; rank 0
    waits for it in the all-reduce, and both end together. Rank 0's steps look slow (0.2 s), rank 1's do not."""
    streams = {0: Stream(0), 1: Stream(1)}
    view = RunView()
    for stream in streams.values():
        view.feed(stream.rec("on_train_begin", 0, meta={**META, "world_size": 2}))
    for step in range(1, 31):
        s0, s1 = streams[0], streams[1]
        view.feed(s0.rec("on_step_begin", step - 1))
        s1.t = s0.t + timedelta(seconds=0.1)
        view.feed(s1.rec("on_step_begin", step - 1))
        s0.t = s1.t = s1.t + timedelta(seconds=0.1)
        view.feed(s0.rec("on_step_end", step))
        view.feed(s1.rec("on_step_end", step))
        s1.t = s0.t
    assert view.stragglers == [1]
    texts = [t for _, k, t in view.events if k == "straggler"]
    assert texts == ["rank 1 is a straggler: it begins its steps a median 100ms after the first rank, and steps "
                     "take 200ms on the others"]
    # a rank slow inside the step: under DDP every rank's step is as long, none begins late: none is named
    assert straggler_run({0: 0.2, 1: 0.2}, 30).stragglers == []


def test_ranks_replayed_one_after_the_other_are_compared_over_the_same_steps():
    """A late join reads rank 0's journal, then rank 1's: rank 1's slow first steps (warm-up, as rank 0's
    were) must not be compared with rank 0's fast last ones."""
    view = RunView()
    for rank in (0, 1):
        stream = Stream(rank)
        view.feed(stream.rec("on_train_begin", 0, meta={**META, "world_size": 2}))
        feed(view, stream.steps(1, 20, step_time=0.3))
        feed(view, stream.steps(21, 80, step_time=0.1))
    assert view.stragglers == [] and not [k for _, k, _ in view.events if k == "straggler"]
    assert math.isclose(view.step_time_medians()[1], 0.1, rel_tol=1e-6)


def ddp_run(data_times: dict[int, float], steps: int, step_time: float = 0.05, slow_steps: dict | None = None,
            replay: bool = False) -> RunView:
    """Synchronous ranks (DDP): every rank's step ends at the same time, one `step_time` after the last (the
    all-reduces make them), and its on_step_end carries its own `data_time` (s it waited for the step's
    batches). From on_step_begin to on_step_end takes half the step, or `slow_steps` {rank: seconds} for
    ranks whose steps look longer; `replay`: rank 0's whole stream, then rank 1's."""
    slow_steps = slow_steps or {}
    streams = {rank: Stream(rank) for rank in data_times}
    view = RunView()
    for stream in streams.values():
        view.feed(stream.rec("on_train_begin", 0, meta={**META, "world_size": len(streams)}))
    order = ([(rank, step) for rank in streams for step in range(1, steps + 1)] if replay else
             [(rank, step) for step in range(1, steps + 1) for rank in streams])
    for rank, step in order:
        s = streams[rank]
        end = T0 + timedelta(seconds=step * step_time)
        s.t = end - timedelta(seconds=slow_steps.get(rank, step_time / 2))
        view.feed(s.rec("on_step_begin", step - 1))
        s.t = end
        view.feed(s.rec("on_step_end", step, {"loss": 4.6, "data_time": data_times[rank]}))
    return view


def test_under_ddp_a_rank_that_waits_longer_for_its_data_is_the_straggler():
    # rank 1 waits 30 ms per step for its batches, rank 0 0.5 ms; both steps take 50 ms (DDP evens them)
    assert ddp_run({0: 0.0005, 1: 0.03}, 19).stragglers == []  # fewer than 20 steps in common
    view = ddp_run({0: 0.0005, 1: 0.03}, 20)
    assert view.stragglers == [1]
    assert [t for _, k, t in view.events if k == "straggler"] == [
        "rank 1 is a straggler: it waits a median 30ms per step for its data against 0.5ms on the other "
        "ranks (steps take 50ms)"]
    assert view.data_time_medians() == {0: 0.0005, 1: 0.03}
    # four ranks, one slow: that one; equal ranks: none
    assert ddp_run({0: 0.001, 1: 0.001, 2: 0.02, 3: 0.001}, 30).stragglers == [2]
    assert ddp_run({0: 0.03, 1: 0.03}, 30).stragglers == []


def test_the_data_rule_needs_both_the_ratio_and_an_excess_over_a_tenth_of_the_step():
    # 1.4x the others: not a straggler, although 12 ms more than them is a quarter of the 50 ms step
    assert ddp_run({0: 0.03, 1: 0.042}, 30).stragglers == []
    # 4x the others, but 3 ms more is 6% of a 50 ms step: noise, not a straggler
    assert ddp_run({0: 0.001, 1: 0.004}, 30).stragglers == []
    # the same 3 ms on a 20 ms step is 15%: a straggler
    assert ddp_run({0: 0.001, 1: 0.004}, 30, step_time=0.02).stragglers == [1]


def test_the_data_rule_names_the_slow_loader_not_the_rank_whose_steps_look_long():
    """Without a collective before on_step_begin, the others wait for the slow-data rank inside their step:
    rank 0's steps look three times as long. The data rule names rank 1 and the timestamp rule is not applied;
    without data times the timestamp rule alone would name rank 0."""
    view = ddp_run({0: 0.0005, 1: 0.06}, 30, step_time=0.1, slow_steps={0: 0.09, 1: 0.03})
    assert view.stragglers == [1]
    assert [t for _, k, t in view.events if k == "straggler"][0].startswith("rank 1 is a straggler: it waits")
    assert straggler_run({0: 0.09, 1: 0.03}, 30).stragglers == [0]


def test_data_times_replayed_one_rank_after_the_other_are_compared_over_the_same_steps():
    view = ddp_run({0: 0.0005, 1: 0.03}, 60, replay=True)
    assert view.stragglers == [1]
    assert view.data_time_medians() == {0: 0.0005, 1: 0.03}
    # a rank whose data is slow only at first (a cold cache): named over those steps, no straggler at the end
    streams = {0: Stream(0), 1: Stream(1)}
    view = RunView()
    for rank, stream in streams.items():
        view.feed(stream.rec("on_train_begin", 0, meta={**META, "world_size": 2}))
        for step in range(1, 81):
            stream.t = T0 + timedelta(seconds=step * 0.05)
            view.feed(stream.rec("on_step_begin", step - 1))
            stream.t += timedelta(seconds=0.025)
            wait = 0.03 if rank == 1 and step <= 20 else 0.0005
            view.feed(stream.rec("on_step_end", step, {"data_time": wait}))
    assert view.stragglers == [] and [k for _, k, _ in view.events if k == "straggler"] == ["straggler"]
