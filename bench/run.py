"""The benchmark suite: what logging costs the training step, side by side with the alternatives.

    python bench/run.py [--quick] [--device cpu|cuda] [--json FILE]

Prints a table, and as its last line one JSON object with every figure. Ratios come from the two sides
measured in the same run, interleaved (A B A B ...), summarised by the median over rounds.

  publish_us_median/p99, floor_us_median   bench/hotpath.py: BusCallback per event vs orjson.dumps + PUB send
  step_ratio_sinks    mean time per step of the default char GPT (logging every step) with the tb, json,
                      textgen (every 50 steps) and tail sinks attached, over the same run with publishing off
  step_ratio_inline   the same logging inside the training process (a SummaryWriter callback, a JSON-file
                      callback, generation inline every 50 steps), over publishing off
  loop_ratio_raw      this Trainer with publishing off, over a plain PyTorch loop (same model, data,
                      optimizer, schedule, clipping)
  step_ratio_monitoring   mean time per step with the monitoring on (a `system` record every 0.1 s, far more
                      often than the default 10 s, stall detection, and the throughput keys on every log:
                      log_throughput, log_tokens, log_peak_memory, log_mfu) over the same run with all of it
                      off; the bus publishes on both sides. system_records: how many the on side published;
                      system_sample_us_max: the longest one sample took (in the sampler's thread)
  tb_sink_records_per_s, summarywriter_records_per_s   bench/tb_throughput.py
  replay_records_per_s    a Subscriber replaying a live run's journal of N records (1M; 100k with --quick),
                      decoded and validated into dicts, in its own process (as a sink is);
                      parse_floor_records_per_s: bare orjson.loads of the same lines, for scale;
                      json_sink_raw_records_per_s: the json sink writing the same N records through the raw path
                      (a raw Subscriber's RawLines into JsonSink.handle_raw), its output checked byte for byte
                      against the journal; the two sides alternate, `rounds` times each, medians reported
  journal_bytes_per_record, bus_rss_mb    journal size per record; fg-train's resident memory at the end
                      of a run with the bus on minus off (VmRSS, separate processes)
  journal_bytes_per_step, replay_compressed_records_per_s   bench/journal_size.py: the whole journal (sealed
                      compressed segments + the live one) per step of the default model, and a replay of N records
                      (1M; 100k with --quick) from compressed segments, over the same replay plain
  control_share_new / control_share_old   bench/control_agreement.py: the training thread's wait per step for the
                      control agreement under torchrun (2 gloo ranks, a 20 ms busy step), new async votes (agreed
                      every control_every steps, auto) and the old synchronous all-reduce, alternated, as a share
                      of the step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hotpath  # noqa: E402
import journal_size  # noqa: E402
from _report import emit  # noqa: E402
import tb_throughput  # noqa: E402

from fg_bus import registry  # noqa: E402
from trainer import InfoCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from trainer.bus_callback import BusCallback  # noqa: E402
from trainer.chargpt import char_gpt_for  # noqa: E402
from trainer.data import CharCorpus, EpochSampler, default_data_collator  # noqa: E402
from trainer.sink_callbacks import JsonLogger, TBLogger, TextgenCallback  # noqa: E402

GENERATE_EVERY = 50
#: The monitoring side's system interval: aggressive, so that a cost the sampler has shows in the step time.
SYSTEM_INTERVAL = 0.1
#: The TrainingArguments switches of the throughput keys on training logs.
THROUGHPUT_SWITCHES = ("log_throughput", "log_tokens", "log_peak_memory", "log_mfu")


class StepClock(TrainerCallback):
    """Wall time from the first step's begin to the last step's end, skipping `warmup` steps."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.start = self.end = None
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.steps += 1
            self.end = time.perf_counter()

    def on_log(self, args, state, control, **kwargs):
        if self.start is not None:
            self.end = time.perf_counter()  # logging done after a step belongs to it

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


class InlineSummaryWriter(TrainerCallback):
    """The usual way: a SummaryWriter in the training process, HF's tag names."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and key != "epoch":
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, value, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.writer.close()


class InlineJson(TrainerCallback):
    """The usual way: one JSON line per log event, written by the training process."""

    def __init__(self, path: str):
        self.file = open(path, "w")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.file.write(json.dumps({"event": "on_log", "global_step": state.global_step, "epoch": state.epoch,
                                    "metrics": logs}) + "\n")
        self.file.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.file.close()


class InlineTextgen(TrainerCallback):
    """The usual way: generation inside the training step every N steps."""

    def __init__(self, tokenizer, every: int, max_new_tokens: int = 60):
        self.tokenizer, self.every, self.max_new_tokens = tokenizer, every, max_new_tokens

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            model.eval()
            ids = torch.tensor([self.tokenizer.encode("The ")], device=args.device)
            model.generate(ids, max_new_tokens=self.max_new_tokens, temperature=0.8, top_p=0.95)
            model.train()


#: the char GPT's config for the in-process runs (--model changes it: on a GPU, a model with 10-50 ms steps)
MODEL: dict = {"block_size": 64}


def _model_option(text: str) -> dict:
    """--model n_layer=12,n_head=12,n_embd=768: the char GPT's width and depth (its block stays the corpus's)."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in ("n_layer", "n_head", "n_embd") or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: NAME=N with NAME n_layer, n_head or n_embd and N >= 1")
        out[name] = int(value)
    if out.get("n_embd", 128) % out.get("n_head", 4):
        raise argparse.ArgumentTypeError(f"{text!r}: n_embd must be a multiple of n_head")
    return out


def _trainer(corpus, out: Path, steps: int, device: str, callbacks=(), event_bus=None, **extra_args) -> Trainer:
    torch.manual_seed(0)
    model = char_gpt_for(corpus.tokenizer, **MODEL)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             use_cpu=device == "cpu", report_to="none", **extra_args)
    trainer = Trainer(model, args, train_dataset=corpus.train_dataset, processing_class=corpus.tokenizer,
                      callbacks=list(callbacks), event_bus=event_bus)
    trainer.remove_callback(InfoCallback)  # no printing inside the measurement
    trainer.remove_callback(PrinterCallback)
    return trainer


def step_ratios(corpus, steps: int, rounds: int, device: str) -> dict:
    """Three sides per round (publishing off, four sinks, the same logging inline), in an order rotated each
    round so that none always runs first (or last) on a machine that drifts."""
    work = Path(tempfile.mkdtemp(prefix="fg-bench-steps-"))

    def off(r: int) -> float:
        clock = StepClock()
        _trainer(corpus, work / f"off{r}", steps, device, [clock]).train()
        return clock.per_step

    def sinks(r: int) -> float:
        return sinks_attached(corpus, work / f"sinks{r}", steps, device, f"bench-sinks-{r}")

    def inline(r: int) -> float:
        clock = StepClock()
        callbacks = [clock, InlineSummaryWriter(str(work / f"inline{r}" / "tb")),
                     InlineJson(str(work / f"inline{r}.jsonl")), InlineTextgen(corpus.tokenizer, GENERATE_EVERY)]
        _trainer(corpus, work / f"inline{r}", steps, device, callbacks).train()
        return clock.per_step

    times = _interleaved({"off": off, "sinks": sinks, "inline": inline}, rounds)
    return {
        "step_ms_off": statistics.median(times["off"]) * 1e3,
        "step_ms_sinks": statistics.median(times["sinks"]) * 1e3,
        "step_ms_inline": statistics.median(times["inline"]) * 1e3,
        "step_ratio_sinks": statistics.median([s / o for s, o in zip(times["sinks"], times["off"])]),
        "step_ratio_inline": statistics.median([i / o for i, o in zip(times["inline"], times["off"])]),
    }


def sinks_attached(corpus, out: Path, steps: int, device: str, name: str) -> float:
    """Seconds per step with the tb, json, textgen and tail sinks attached, as separate processes."""
    clock = StepClock()
    bus = BusCallback(run_name=name)
    callbacks = [clock, TBLogger(), JsonLogger(), TextgenCallback(generation_steps=GENERATE_EVERY)]
    trainer = _trainer(corpus, out, steps, device, callbacks, event_bus=bus)
    tail = subprocess.Popen([sys.executable, "-m", "sinks", "tail", "--run", str(bus.publisher.bus_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer.train()
    bus.close()
    tail.wait(120)
    return clock.per_step


def _interleaved(sides: dict, rounds: int) -> dict[str, list[float]]:
    """Each side once per round, the order rotated by one each round (A B C, B C A, C A B, ...)."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(sides[name](r))
    return times


def monitoring_ratio(corpus, steps: int, rounds: int, device: str) -> dict:
    """The monitoring on (system records every SYSTEM_INTERVAL s, stall detection, the throughput keys on
    every log) against off, the bus publishing on both sides, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="fg-bench-monitor-"))
    switches = [name for name in THROUGHPUT_SWITCHES if name in TrainingArguments.__dataclass_fields__]
    on_side = {"system_records": [], "sample_s": []}

    def side(on: bool):
        def run(r: int) -> float:
            clock = StepClock()
            bus = BusCallback(run_name=f"bench-monitor-{'on' if on else 'off'}-{r}",
                              system_interval=SYSTEM_INTERVAL if on else 0, stall_after=120 if on else 0)
            trainer = _trainer(corpus, work / f"{'on' if on else 'off'}{r}", steps, device, [clock],
                               event_bus=bus, **{name: on for name in switches})
            trainer.train()
            bus.close()
            if on:
                on_side["system_records"].append(bus.publisher.sampler.samples)
                on_side["sample_s"].append(bus.publisher.sampler.max_sample_s)
            return clock.per_step
        return run

    times = _interleaved({"off": side(False), "on": side(True)}, rounds)
    return {"step_ms_monitor_off": statistics.median(times["off"]) * 1e3,
            "step_ms_monitor_on": statistics.median(times["on"]) * 1e3,
            "step_ratio_monitoring": statistics.median([a / b for a, b in zip(times["on"], times["off"])]),
            "system_records": min(on_side["system_records"]),
            "system_sample_us_max": max(on_side["sample_s"]) * 1e6,
            "throughput_switches": switches}


def loop_ratio(corpus, steps: int, rounds: int, device: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fg-bench-loop-"))

    def ours(r: int) -> float:
        clock = StepClock()
        _trainer(corpus, work / f"t{r}", steps, device, [clock]).train()  # logging every step, as above
        return clock.per_step

    times = _interleaved({"ours": ours, "raw": lambda r: _raw_loop(corpus, steps, device)}, rounds)
    return {"step_ms_trainer": statistics.median(times["ours"]) * 1e3,
            "step_ms_raw": statistics.median(times["raw"]) * 1e3,
            "loop_ratio_raw": statistics.median([o / w for o, w in zip(times["ours"], times["raw"])])}


def _raw_loop(corpus, steps: int, device: str, warmup: int = 3) -> float:
    """A plain loop: same model, data order, AdamW, linear schedule, clipping; loss read every step, as the
    Trainer's logging_steps=1 does."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = char_gpt_for(corpus.tokenizer, **MODEL).to(dev)
    loader = torch.utils.data.DataLoader(corpus.train_dataset, batch_size=32, collate_fn=default_data_collator,
                                         sampler=EpochSampler(len(corpus.train_dataset), seed=42))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    step, start = 0, None
    while step < steps:
        for batch in loader:
            if step == warmup:
                start = time.perf_counter()
            batch = {k: v.to(dev) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            step += 1
            if step >= steps:
                break
    return (time.perf_counter() - start) / (steps - warmup)


_REPLAY_TRAINER = """
import sys, time
from pathlib import Path
from fg_bus import Publisher, registry
n, work = int(sys.argv[1]), Path(sys.argv[2])
pub = Publisher(work / "fg-bus" / "replay", registry.new_run_id("bench-replay")).start()
metrics = {"loss": 2.345, "grad_norm": 0.8, "learning_rate": 3e-4}
for i in range(n):
    pub.publish("on_step_end", i, i / 1000, metrics=metrics)
journal = registry.resolve(pub.run_id).journal_path()
while journal.read_bytes().count(b"\\n") < n:
    time.sleep(0.05)
print(pub.run_id, flush=True)
sys.stdin.read()  # stay live until the benchmark is done
pub.close()
"""


_REPLAY_READER = """
import sys, time
from fg_bus import Subscriber, registry
from sinks.json_sink import JsonSink
run_id, n, side, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
if side == "decoded":
    sub = Subscriber(run_id, from_seq=0, dead_after=60)
    got = 0
    while got < n:
        got += len(sub.poll(1.0))
else:  # what fg-sink json does per poll: RawLines into handle_raw
    sink = JsonSink(out=out)
    sink.open_run(registry.resolve(run_id))
    sub = Subscriber(run_id, from_seq=0, dead_after=60, raw=True)
    while sink.written < n:
        for lines in sub.poll(1.0):
            sink.handle_raw(lines.data, 0, lines.first_seq, lines.last_seq)
    sink.close()
print(n / (time.perf_counter() - t0), flush=True)
sub.close()
"""


def replay_rate(n: int, rounds: int = 2) -> dict:
    """A live run with n records in its journal, in its own process (as a trainer is); a reader from seq 0,
    in a fresh process of its own (as a sink is: no trainer's heap for the collector to walk), times the
    replay of all of them through the run's replay socket: decoded into dicts, and through the json sink's
    raw path, alternating."""
    work = Path(tempfile.mkdtemp(prefix="fg-bench-replay-"))
    # One plain segment (no sealing): this is the decode side's figure; journal_figures times compressed ones.
    trainer = subprocess.Popen([sys.executable, "-c", _REPLAY_TRAINER, str(n), str(work)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "FG_JOURNAL_SEGMENT_BYTES": str(1 << 40)})
    rates: dict[str, list[float]] = {"decoded": [], "raw": []}
    try:
        run_id = trainer.stdout.readline().strip()
        if not run_id:
            raise RuntimeError("the replay benchmark's publisher did not start")
        journal = registry.resolve(run_id).journal_path()
        for r in range(rounds):
            for side in ("decoded", "raw"):
                out = work / f"raw{r}.jsonl"
                proc = subprocess.run([sys.executable, "-c", _REPLAY_READER, run_id, str(n), side, str(out)],
                                      capture_output=True, text=True, timeout=600, cwd=ROOT)
                if proc.returncode != 0:
                    raise RuntimeError(f"the replay benchmark's {side} reader failed: {proc.stderr[-2000:]}")
                rates[side].append(float(proc.stdout.split()[-1]))
                if side == "raw" and out.read_bytes() != _first_lines(journal, n):
                    raise RuntimeError(f"the json sink's raw output {out} differs from the journal's lines")
        size = journal.stat().st_size
    finally:
        trainer.stdin.close()
        trainer.wait(60)
    return {"replay_records": n, "replay_records_per_s": statistics.median(rates["decoded"]),
            "json_sink_raw_records_per_s": statistics.median(rates["raw"]),
            "journal_bytes_per_record": size / n, "parse_floor_records_per_s": n / _parse_floor(journal)}


def _first_lines(journal: Path, n: int) -> bytes:
    data = journal.read_bytes()
    end = 0
    for _ in range(n):
        end = data.index(b"\n", end) + 1
    return data[:end]


def _parse_floor(journal: Path) -> float:
    """Seconds for bare `orjson.loads` of every line of the journal (no sockets, no checks): the least
    any reader that hands out records as dicts pays."""
    t0 = time.perf_counter()
    with open(journal, "rb") as f:
        for line in f:
            orjson.loads(line)
    return time.perf_counter() - t0


def bus_rss(steps: int, runs: int) -> dict:
    """Resident memory of fg-train at the end of a run with the bus on, minus off (each its own process,
    VmRSS read after training; the smallest of `runs` runs each)."""

    def rss(*extra: str) -> float:
        code = ("import sys; from trainer.cli import main; main(sys.argv[1:]); "
                "print('RSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')))")
        out = tempfile.mkdtemp(prefix="fg-bench-rss-")
        proc = subprocess.run([sys.executable, "-c", code, "--max-steps", str(steps), "--device", "cpu",
                               "--output-dir", out, "--no-progress", *extra],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "FG_HOME": tempfile.mkdtemp(prefix="fg-bench-home-")})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RSS")), None)
        if line is None:
            raise RuntimeError(f"fg-train failed in the RSS measurement: {proc.stderr[-2000:]}")
        return int(line.split()[1]) / 1024  # kB -> MB

    off = [rss("--no-bus") for _ in range(runs)]
    on = [rss() for _ in range(runs)]
    return {"rss_mb_bus_off": min(off), "rss_mb_bus_on": min(on), "bus_rss_mb": min(on) - min(off)}


def control_figures(calls: int) -> dict:
    """bench/control_agreement.py on a 20 ms host step between 2 ranks (its own processes), old and new path."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("control_agreement.py")), "--calls",
                           str(calls), "--steps-ms", "20"], capture_output=True, text=True, timeout=600, check=True)
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])["steps"]
    return {"control_us_new": row["new_us_mean"], "control_us_old": row["old_us_mean"],
            "control_share_new": row["new_share_of_step"], "control_share_old": row["old_share_of_step"],
            "control_every": row["every"]}


def journal_figures(corpus, device: str, steps: int, replay_records: int, rounds: int) -> dict:
    """bench/journal_size.py's figures, the step's records taken from a short real run of the default model
    (bus on, logging every step)."""
    bus = BusCallback(run_name="bench-journal")
    _trainer(corpus, Path(tempfile.mkdtemp(prefix="fg-bench-journal-run-")), 8, device, event_bus=bus).train()
    bus.close()
    return journal_size.figures(bus.publisher.bus_dir / "journal.rank0.jsonl", steps, replay_records, rounds)


def _missing_switches(figures: dict) -> str:
    missing = [name for name in THROUGHPUT_SWITCHES if name not in figures["throughput_switches"]]
    return f"; not in TrainingArguments: {', '.join(missing)}" if missing else ""


#: what each part measures over, per mode (journal_steps: past one 8 MiB segment, so one is sealed)
SIZES = {"full": {"events": 100_000, "steps": 300, "rounds": 3, "tb_records": 20_000, "replay": 1_000_000,
                  "rss_steps": 100, "rss_runs": 2, "journal_steps": 100_000, "control_calls": 300},
         "quick": {"events": 20_000, "steps": 60, "rounds": 2, "tb_records": 5_000, "replay": 100_000,
                   "rss_steps": 20, "rss_runs": 2, "journal_steps": 20_000, "control_calls": 100},
         "smoke": {"events": 2_000, "steps": 10, "rounds": 1, "tb_records": 500, "replay": 10_000,
                   "rss_steps": 3, "rss_runs": 1, "journal_steps": 7_000, "control_calls": 50}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes on 2 CPU cores")
    size.add_argument("--smoke", action="store_true",
                      help="the smallest sizes that still run every part (the test suite's smoke test): the figures "
                           "are too noisy to mean anything")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", type=_model_option, default={}, metavar="NAME=INT,...",
                   help="the char GPT's size for the step and loop ratios, e.g. n_layer=12,n_head=12,n_embd=768 "
                        "(default: fg-train's default model; on a GPU pick one whose step takes 10-50 ms)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--only", choices=("replay",), help="only this part: replay (replay_records_per_s, "
                   "json_sink_raw_records_per_s, parse_floor_records_per_s; about 20 s with --quick)")
    opts = p.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-bench-home-"))
    MODEL.update(opts.model)
    q = opts.quick
    sizes = SIZES["smoke" if opts.smoke else "quick" if q else "full"]
    figures: dict = {"quick": q, "smoke": opts.smoke, "device": opts.device, "model": dict(MODEL)}
    t_all = time.perf_counter()
    if opts.only == "replay":
        figures.update(replay_rate(sizes["replay"], sizes["rounds"]))
        figures["seconds"] = time.perf_counter() - t_all
        return emit(figures, opts.json)
    hot = hotpath.run(sizes["events"])
    figures.update({k: hot[k] for k in ("publish_us_median", "publish_us_p99", "floor_us_median")})
    corpus = CharCorpus(block_size=64)
    figures.update(step_ratios(corpus, sizes["steps"], sizes["rounds"], opts.device))
    figures.update(loop_ratio(corpus, sizes["steps"], sizes["rounds"], opts.device))
    figures.update(monitoring_ratio(corpus, sizes["steps"], sizes["rounds"], opts.device))
    records = tb_throughput.make_records(sizes["tb_records"])
    sink_s, writer_s = [], []
    for _ in range(sizes["rounds"]):
        sink_s.append(tb_throughput.run_sink(records))
        writer_s.append(tb_throughput.run_summarywriter(records))
    figures["tb_sink_records_per_s"] = len(records) / statistics.median(sink_s)
    figures["summarywriter_records_per_s"] = len(records) / statistics.median(writer_s)
    figures.update(replay_rate(sizes["replay"], sizes["rounds"]))
    figures.update(bus_rss(sizes["rss_steps"], sizes["rss_runs"]))
    figures.update(journal_figures(corpus, opts.device, sizes["journal_steps"], sizes["replay"], sizes["rounds"]))
    figures.update(control_figures(sizes["control_calls"]))
    figures["seconds"] = time.perf_counter() - t_all

    rows = [
        ("publish per event (median / p99)", f"{figures['publish_us_median']:.2f} / {figures['publish_us_p99']:.1f} us"),
        ("floor per event (median)", f"{figures['floor_us_median']:.2f} us"),
        ("step, publishing off", f"{figures['step_ms_off']:.2f} ms"),
        ("step ratio, 4 sinks attached", f"{figures['step_ratio_sinks']:.3f}x"),
        ("step ratio, same logging inline", f"{figures['step_ratio_inline']:.3f}x"),
        ("Trainer vs plain loop", f"{figures['loop_ratio_raw']:.3f}x"),
        (f"step ratio, monitoring on (system every {SYSTEM_INTERVAL:g} s)",
         f"{figures['step_ratio_monitoring']:.3f}x ({figures['system_records']} system records, a sample <= "
         f"{figures['system_sample_us_max']:.0f} us{_missing_switches(figures)})"),
        ("tb sink / SummaryWriter records/s", f"{figures['tb_sink_records_per_s']:,.0f} / "
                                              f"{figures['summarywriter_records_per_s']:,.0f}"),
        (f"replay of {figures['replay_records']:,} records", f"{figures['replay_records_per_s']:,.0f} records/s"),
        ("bare orjson.loads of the same lines", f"{figures['parse_floor_records_per_s']:,.0f} records/s"),
        ("json sink, raw path, same records", f"{figures['json_sink_raw_records_per_s']:,.0f} records/s"),
        ("journal bytes per record", f"{figures['journal_bytes_per_record']:.0f}"),
        ("journal bytes per step: whole / plain / sealed",
         f"{figures['journal_bytes_per_step']:.0f} / {figures['journal_plain_bytes_per_step']:.0f} / "
         f"{figures['journal_sealed_bytes_per_step']:.0f} ({figures['journal_steps']:,} steps, "
         f"{figures['journal_segments']} segments)"),
        (f"replay of {figures['replay_compressed_records']:,} records, compressed segments",
         f"{figures['replay_compressed_records_per_s']:,.0f} records/s "
         f"({figures['replay_compressed_over_plain']:.2f}x the time plain)"),
        ("trainer RSS, bus on - off", f"{figures['bus_rss_mb']:.1f} MB"),
        ("control agreement, 20 ms step, 2 ranks: new / old",
         f"{figures['control_us_new']:.0f} / {figures['control_us_old']:.0f} us "
         f"({100 * figures['control_share_new']:.2f}% / {100 * figures['control_share_old']:.1f}% of the step; "
         f"votes agreed every {figures['control_every']} steps)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return emit(figures, opts.json)


if __name__ == "__main__":
    sys.exit(main())
