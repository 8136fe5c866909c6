"""The system sampler on a real NVIDIA GPU: a short check to run where one is lent.

    python bench/gpu_check.py [--steps N] [--rounds R] [--out DIR]

It trains the default char GPT on cuda:0 for N steps, with the monitoring off and on (a `system` record
every 0.2 s, stall detection, the throughput keys on every log), interleaved R times, and checks what the
`on` runs published: every system record carries this rank's GPU under its NVML index (found from torch's
device UUID), with utilization, memory, power, temperature, clocks and the throttle mask; the GPU was busy
in some of them; the training logs carry peak_memory_mb. It also times nvmlInit and one sample, and runs
the NVML tests of tests/fg_bus/test_system.py when pytest is there.

Writes into DIR (default $OUT, else a new temporary directory): `system.jsonl` (the last `on` run's system
records), `logs.jsonl` (its training on_log records), `figures.json`; prints the figures as its last line.
Exits 1 if a check failed (they are listed under "failed"), 2 if there is no CUDA GPU or no nvidia-ml-py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fg_bus import read_journal  # noqa: E402
from fg_bus._system import NvmlProbe, SystemSampler  # noqa: E402
from trainer import InfoCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from trainer.bus_callback import BusCallback, _gpus_of  # noqa: E402
from trainer.chargpt import char_gpt_for  # noqa: E402
from trainer.data import CharCorpus  # noqa: E402

SYSTEM_INTERVAL = 0.2
GPU_KEYS = ("utilization", "memory_used_mb", "memory_total_mb", "power_w", "temperature_c", "sm_clock_mhz",
            "mem_clock_mhz", "throttle")
SWITCHES = ("log_throughput", "log_tokens", "log_peak_memory", "log_mfu")


class Clock(TrainerCallback):
    """Wall time per step after `warmup` steps, with a CUDA sync at both ends only (outside the timed steps'
    own work: the first and the last step end)."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif self.start is not None:
            self.steps += 1
            if state.global_step == state.max_steps:
                torch.cuda.synchronize()
                self.end = time.perf_counter()

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


def train(corpus, out: Path, steps: int, on: bool) -> tuple[float, BusCallback]:
    torch.manual_seed(0)
    switches = {name: on for name in SWITCHES if name in TrainingArguments.__dataclass_fields__}
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=64,
                             learning_rate=3e-3, logging_steps=10, save_strategy="no", disable_tqdm=True,
                             use_cpu=False, report_to="none", **switches)
    clock = Clock()
    bus = BusCallback(run_name=f"gpu-check-{'on' if on else 'off'}", system_interval=SYSTEM_INTERVAL if on else 0,
                      stall_after=120 if on else 0)
    trainer = Trainer(char_gpt_for(corpus.tokenizer, block_size=128), args, train_dataset=corpus.train_dataset,
                      processing_class=corpus.tokenizer, callbacks=[clock], event_bus=bus)
    trainer.remove_callback(InfoCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    bus.close()
    return clock.per_step, bus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    opts = p.parse_args(argv)
    out = opts.out or Path(tempfile.mkdtemp(prefix="fg-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-gpu-check-home-"))
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        import pynvml
    except ImportError:
        print("gpu_check: nvidia-ml-py is not installed (pip install fg-bus[gpu])", file=sys.stderr)
        return 2
    failed: list[str] = []
    figures: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    # NVML alone: init time, which GPU torch's cuda:0 is, one sample's time.
    t0 = time.perf_counter()
    pynvml.nvmlInit()
    figures["nvml_init_ms"] = (time.perf_counter() - t0) * 1e3
    figures["nvml_device_count"] = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    device_args = type("Args", (), {"device": torch.device("cuda", 0), "n_gpu": 1})()
    gpus = _gpus_of(device_args)
    figures["gpus_of_cuda0"] = gpus
    probe = NvmlProbe(pynvml, gpus)
    index = probe.indices[0]
    figures["nvml_index_of_cuda0"] = index
    private = getattr(torch.cuda, "_get_nvml_device_index", None)
    if private is not None and private(0) != index:
        failed.append(f"torch maps cuda:0 to NVML index {private(0)}, the UUID to {index}")
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        probe.sample({})
        times.append(time.perf_counter() - t0)
    probe.close()
    figures["nvml_sample_us_median"] = statistics.median(times) * 1e6
    figures["nvml_sample_us_max"] = max(times) * 1e6
    sampler = SystemSampler(1.0, out, gpus)
    sampler.setup()
    sampler.sample()
    figures["full_sample_us"] = sampler.last_sample_s * 1e6
    if sampler.nvml is not None:
        sampler.nvml.close()

    # Training, monitoring off and on, interleaved.
    corpus = CharCorpus(block_size=128)
    off, on, last_bus, sampler_max = [], [], None, []
    for r in range(opts.rounds):
        for side in ((False, True) if r % 2 == 0 else (True, False)):
            per_step, bus = train(corpus, out / "runs" / f"{'on' if side else 'off'}{r}", opts.steps, side)
            (on if side else off).append(per_step)
            if side:
                last_bus = bus
                sampler_max.append(bus.publisher.sampler.max_sample_s)
    figures.update({"step_ms_monitor_off": statistics.median(off) * 1e3,
                    "step_ms_monitor_on": statistics.median(on) * 1e3,
                    "step_ratio_monitoring": statistics.median([a / b for a, b in zip(on, off)]),
                    "sampler_sample_us_max": max(sampler_max) * 1e6})

    records = list(read_journal(last_bus.publisher.bus_dir / "journal.rank0.jsonl"))
    system = [r for r in records if r["event"] == "system"]
    logs = [r for r in records if r["event"] == "on_log" and "loss" in r.get("metrics", {})]
    (out / "system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in system))
    (out / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    figures["system_records"] = len(system)
    if not system:
        failed.append("no system record")
    for r in system:
        missing = [k for k in GPU_KEYS if f"gpu{index}_{k}" not in r["metrics"]]
        if missing:
            failed.append(f"system seq {r['seq']} lacks gpu{index}_ {missing}")
            break
        if [g["index"] for g in r.get("gpus", [])] != [index] or not r["gpus"][0]["name"]:
            failed.append(f"system seq {r['seq']}: gpus is {r.get('gpus')}")
            break
    busy = [r["metrics"].get(f"gpu{index}_utilization", 0) for r in system]
    figures["gpu_utilization_max"] = max(busy, default=None)
    figures["gpu_memory_used_mb_max"] = max((r["metrics"].get(f"gpu{index}_memory_used_mb", 0) for r in system),
                                            default=None)
    figures["gpu_power_w_max"] = max((r["metrics"].get(f"gpu{index}_power_w", 0) for r in system), default=None)
    figures["throttle_reasons_seen"] = sorted({name for r in system for g in r.get("gpus", [])
                                               for name in g["throttle_reasons"]})
    if not any(u > 0 for u in busy):
        failed.append("the GPU's utilization was 0 in every system record of a training run")
    log_keys = sorted(set().union(*(r["metrics"] for r in logs))) if logs else []
    figures["on_log_keys"] = log_keys
    if "log_peak_memory" in TrainingArguments.__dataclass_fields__ and "peak_memory_mb" not in log_keys:
        failed.append("the training logs carry no peak_memory_mb on CUDA")

    if importlib.util.find_spec("pytest") is None:
        figures["pytest_nvml"] = "pytest not installed: not run"
    else:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "fg_bus" / "test_system.py"), "-k", "nvml"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        figures["pytest_nvml"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        (out / "pytest_nvml.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            failed.append(f"pytest -k nvml: {figures['pytest_nvml']}")

    figures["failed"] = failed
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
