"""What the hardening of issue 11 costs and bounds, measured on real sockets and files:

- a replay flood: a raw DEALER sends N replay requests to a live Publisher and never reads; the
  publisher's open file descriptors before and after, and how many requests were refused;
- oversize frames: M frames of 10 MB to the replay socket; the publisher process's RSS before and after;
- a journal with one huge line: read_journal's time and peak memory (the line is skipped past 16 MiB);
- checksums.json: the sha256 of a saved checkpoint of the built-in model, against the whole save;
- the one-writer lock (fg_bus.lockfile): acquire + release.

    python bench/hardening.py [--quick] [--json FILE]

Prints one line per figure, then a JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import emit  # noqa: E402
from fg_bus import Publisher, lockfile, records, registry  # noqa: E402
from fg_bus.journal import JournalStats, read_journal  # noqa: E402


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


_FLOOD = """
import sys, time, zmq
endpoint, requests, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context()
flooder = ctx.socket(zmq.DEALER)
flooder.linger, flooder.sndhwm, flooder.rcvhwm = 0, 0, 1  # never reads: the publisher's replies back up
flooder.connect(endpoint)
for _ in range(requests):
    flooder.send(b'{"op":"replay","from":0}')
sys.stdin.readline()  # the measuring side has counted the refusals: now the big frames
frame = b"x" * (10 << 20)
for _ in range(frames):
    big = ctx.socket(zmq.DEALER)  # the publisher drops a peer that sends an oversize frame: a new peer each
    big.linger, big.sndtimeo = 0, 10_000
    big.connect(endpoint)
    big.send(frame, copy=False)
    time.sleep(0.05)
    big.close()
print("sent", flush=True)
sys.stdin.readline()
"""


def replay_flood(work: Path, requests: int, frames: int) -> dict:
    """The flooding client is another process, so this one's fds and RSS are the publisher's alone."""
    pub = Publisher(work / "fg-bus" / "flood", registry.new_run_id("flood")).start()
    for step in range(2000):
        pub.publish("on_log", step, metrics={"loss": 1.0})
    refused = lambda: sum(n for reason, n in pub.rejected.items() if reason.startswith("replay-too-many"))
    client = subprocess.Popen([sys.executable, "-c", _FLOOD, pub.endpoints["replay"], str(requests), str(frames)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fds_before = _fds()
        _wait(lambda: refused() >= requests - 64, 60.0)
        fds_after = _fds()
        rss_before = _rss_mb()
        client.stdin.write("\n")
        client.stdin.flush()
        client.stdout.readline()  # "sent"
        time.sleep(1.0)  # the publisher reads and drops what was sent; there is nothing to poll for
        rss_after = _rss_mb()
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        pub.close()
    return {"flood_requests": requests, "flood_refused": refused(), "flood_fds_before": fds_before,
            "flood_fds_after": fds_after, "frames_10mb": frames, "rss_mb_before_frames": round(rss_before, 1),
            "rss_mb_after_frames": round(rss_after, 1), "bus_errors": pub.bus_errors, "incomplete": pub.incomplete}


def huge_line(work: Path, megabytes: int) -> dict:
    path = work / "huge.jsonl"
    line = lambda seq, pad="": records.encode({"v": 1, "run": "r", "rank": 0, "seq": seq, "timestamp": "t",
                                              "event": "on_log", "metrics": {}, "pad": pad})
    with open(path, "wb") as f:
        f.write(line(0) + b"\n" + line(1, "x" * (megabytes << 20)) + b"\n" + line(2) + b"\n")
    stats = JournalStats()
    tracemalloc.start()
    t0 = time.perf_counter()
    seqs = [r["seq"] for r in read_journal(path, stats=stats)]
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    path.unlink()
    return {"huge_line_mb": megabytes, "huge_line_read_s": round(seconds, 3), "huge_line_peak_mb": round(peak / 2**20, 1),
            "huge_line_seqs_read": seqs, "huge_line_malformed": stats.malformed}


def checksum_cost(work: Path, repeats: int) -> dict:
    from trainer import _checkpoint as ckpt
    from trainer.config import load_config
    from trainer.run_config import build_trainer, default_config_path

    trainer = build_trainer(load_config(default_config_path()), {
        "output_dir": str(work / "ckpt"), "max_steps": 1, "use_cpu": True, "disable_tqdm": True,
        "eval_strategy": "no", "report_to": []})
    trainer.train()
    folder = ckpt.latest_checkpoint(str(work / "ckpt"))
    hash_ms, save_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ckpt.write_checksums(Path(folder))
        hash_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        trainer._save_checkpoint()
        save_ms.append((time.perf_counter() - t0) * 1e3)
    size = sum(p.stat().st_size for p in Path(folder).iterdir())
    return {"checkpoint_mb": round(size / 1e6, 2), "checksum_ms": round(statistics.median(hash_ms), 2),
            "save_ms_with_checksum": round(statistics.median(save_ms), 1)}


def lock_cost(work: Path, repeats: int) -> dict:
    path = work / "bench.lock"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        os.close(lockfile.acquire(path))
        times.append((time.perf_counter() - t0) * 1e6)
    return {"lock_us": round(statistics.median(times), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    opts = p.parse_args(argv)
    os.environ.setdefault("FG_HOME", tempfile.mkdtemp(prefix="fg-bench-home-"))
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="fg-bench-") as tmp:
        work = Path(tmp)
        figures.update(replay_flood(work, requests=500 if opts.quick else 5000, frames=3 if opts.quick else 30))
        print(f"replay flood: {figures['flood_requests']} requests never read, {figures['flood_refused']} refused; "
              f"fds {figures['flood_fds_before']} -> {figures['flood_fds_after']}", flush=True)
        print(f"{figures['frames_10mb']} x 10 MB frames to the replay socket: publisher RSS "
              f"{figures['rss_mb_before_frames']} -> {figures['rss_mb_after_frames']} MB", flush=True)
        figures.update(huge_line(work, 20 if opts.quick else 300))
        print(f"a {figures['huge_line_mb']} MB journal line: read in {figures['huge_line_read_s']} s, peak "
              f"{figures['huge_line_peak_mb']} MB, records read {figures['huge_line_seqs_read']}", flush=True)
        figures.update(checksum_cost(work, repeats=3 if opts.quick else 30))
        print(f"checksums.json: {figures['checksum_ms']} ms for a {figures['checkpoint_mb']} MB checkpoint "
              f"(whole save {figures['save_ms_with_checksum']} ms)", flush=True)
        figures.update(lock_cost(work, repeats=20 if opts.quick else 1000))
        print(f"output lock: {figures['lock_us']} us to take and release", flush=True)
    return emit(figures, opts.json)


if __name__ == "__main__":
    sys.exit(main())
