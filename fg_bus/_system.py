"""The system sampler: host metrics (psutil) and this rank's GPUs (NVML), every `interval` seconds.

It runs in a thread of its own that sleeps between samples, and hands each finished sample to the bus
thread (`take()`), which publishes it as a `system` record. Why not sample on the bus thread itself: one
NVML call is usually tens of microseconds, but `nvmlInit` takes from tens of milliseconds to seconds (no
persistence daemon), and a query can block for milliseconds while the driver is busy; the bus thread
drains the training thread's records every few milliseconds and must never wait that long. The thread
takes the GIL once per interval for well under a millisecond of Python (the NVML and /proc reads release
it), so the training thread does not notice it.

The record's `metrics` is a flat dict of numbers (for sinks that write scalars):

  cpu_percent            this process, in % of one core (psutil's convention: 250 = two and a half cores)
  host_cpu_percent       the whole host, 0..100 over all its cores
  rss_mb                 this process's resident memory (MiB)
  host_memory_used_mb, host_memory_total_mb, host_memory_percent
  disk_free_gb           free space where the run writes (GiB)
  gpu{i}_utilization     % of the last sample period a kernel ran (NVML's "gpu" utilization)
  gpu{i}_memory_used_mb, gpu{i}_memory_total_mb, gpu{i}_power_w, gpu{i}_temperature_c,
  gpu{i}_sm_clock_mhz, gpu{i}_mem_clock_mhz
  gpu{i}_throttle        the clock event (throttle) reasons bitmask, 0 when none

where i is the GPU's NVML index (as `nvidia-smi` numbers it, whatever CUDA_VISIBLE_DEVICES says), and
only the GPUs this rank uses are sampled. Beside `metrics`, `gpus` lists them: `{"index", "name",
"throttle_reasons": [names]}`. A value a GPU does not report (power on some boards, most of them on a MIG
slice) is left out rather than faked. The first sample comes one interval after the start (the CPU
percentages are differences since the previous call: the start primes them).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MIB = float(1 << 20)
_GIB = float(1 << 30)

#: NVML's clock event ("throttle") reason bits, by the names nvidia-smi prints (lower case).
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

INSTALL_HINT = "pip install fg-bus[gpu]"


def throttle_names(mask: int) -> list[str]:
    """The reasons set in a throttle bitmask; an unknown bit as its hex value."""
    names = []
    bit = 1
    while bit <= mask:
        if mask & bit:
            names.append(THROTTLE_REASONS.get(bit, hex(bit)))
        bit <<= 1
    return names


class HostProbe:
    """psutil: this process and the host. The constructor primes the CPU percentages."""

    def __init__(self, disk_path: str | os.PathLike):
        import psutil

        self._psutil = psutil
        self.disk_path = Path(disk_path)
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the clock: it returns 0.0
        psutil.cpu_percent(None)

    def sample(self, metrics: dict[str, float]) -> None:
        psutil = self._psutil
        metrics["cpu_percent"] = float(self._process.cpu_percent(None))
        metrics["host_cpu_percent"] = float(psutil.cpu_percent(None))
        metrics["rss_mb"] = self._process.memory_info().rss / _MIB
        memory = psutil.virtual_memory()
        metrics["host_memory_used_mb"] = memory.used / _MIB
        metrics["host_memory_total_mb"] = memory.total / _MIB
        metrics["host_memory_percent"] = float(memory.percent)
        try:
            metrics["disk_free_gb"] = shutil.disk_usage(self.disk_path).free / _GIB
        except OSError:
            pass  # the output directory is gone: nothing to say about its disk


class NvmlProbe:
    """NVML for the GPUs named in `devices`: NVML indices (int) or UUIDs (str, "GPU-..." or the bare hex, as
    torch's device properties give it). `nvml` is the pynvml module (a fake one in tests)."""

    def __init__(self, nvml: Any, devices: list[int | str]):
        self.nvml = nvml
        nvml.nvmlInit()
        self._handles: list[tuple[int, Any, str]] = []  # (NVML index, handle, name)
        try:
            for device in devices:
                index, handle = self._resolve(device)
                self._handles.append((index, handle, _text(nvml.nvmlDeviceGetName(handle))))
        except BaseException:
            self.close()
            raise
        self._reasons = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                         or getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        self._missing: set[str] = set()

    def _resolve(self, device: int | str) -> tuple[int, Any]:
        nvml = self.nvml
        if isinstance(device, int):
            return device, nvml.nvmlDeviceGetHandleByIndex(device)
        wanted = _bare_uuid(device)
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if _bare_uuid(_text(nvml.nvmlDeviceGetUUID(handle))) == wanted:
                return index, handle
        for uuid in (f"GPU-{wanted}", f"MIG-{wanted}"):  # not a whole GPU: a MIG slice is found by its UUID only
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            except nvml.NVMLError:
                continue
            try:
                return nvml.nvmlDeviceGetIndex(handle), handle
            except nvml.NVMLError:
                return 0, handle
        raise LookupError(f"no GPU with UUID {device} among the {nvml.nvmlDeviceGetCount()} NVML sees")

    @property
    def indices(self) -> list[int]:
        return [index for index, _, _ in self._handles]

    def sample(self, metrics: dict[str, float]) -> list[dict]:
        nvml, read = self.nvml, self._read
        gpus = []
        for index, handle, name in self._handles:
            p = f"gpu{index}_"
            util = read("utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
            if util is not None:
                metrics[p + "utilization"] = float(util.gpu)
            memory = read("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                metrics[p + "memory_used_mb"] = memory.used / _MIB
                metrics[p + "memory_total_mb"] = memory.total / _MIB
            power = read("power", nvml.nvmlDeviceGetPowerUsage, handle)
            if power is not None:
                metrics[p + "power_w"] = power / 1000.0  # NVML reports milliwatts
            temperature = read("temperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            if temperature is not None:
                metrics[p + "temperature_c"] = float(temperature)
            for key, clock in (("sm_clock_mhz", nvml.NVML_CLOCK_SM), ("mem_clock_mhz", nvml.NVML_CLOCK_MEM)):
                value = read(key, nvml.nvmlDeviceGetClockInfo, handle, clock)
                if value is not None:
                    metrics[p + key] = float(value)
            reasons: list[str] = []
            mask = read("throttle", self._reasons, handle) if self._reasons is not None else None
            if mask is not None:
                metrics[p + "throttle"] = int(mask)
                reasons = throttle_names(int(mask))
            gpus.append({"index": index, "name": name, "throttle_reasons": reasons})
        return gpus

    def _read(self, what: str, query, *args):
        """One NVML query; a value this GPU does not report (NVMLError) is left out, said once at debug."""
        try:
            return query(*args)
        except self.nvml.NVMLError as e:
            if what not in self._missing:
                self._missing.add(what)
                logger.debug("NVML: no %s for this GPU (%s); the system records leave it out", what, e)
            return None

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bare_uuid(uuid: str) -> str:
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix):]
    return uuid


def load_nvml(gpus_in_use: bool):
    """The pynvml module, or None: missing, a warning when GPUs are in use (naming the extra to install),
    else a debug line."""
    try:
        import pynvml
    except ImportError:
        if gpus_in_use:
            logger.warning("system metrics: this run uses a GPU but nvidia-ml-py is not installed, so the GPU's "
                           "utilization, memory, power and clocks are not sampled (`%s`); host metrics only",
                           INSTALL_HINT)
        else:
            logger.debug("system metrics: nvidia-ml-py is not installed; host metrics only")
        return None
    return pynvml


class SystemSampler:
    """Samples every `interval` s in its own thread; the bus thread publishes what `take()` returns.

    `gpus`: the GPUs this rank uses (see NvmlProbe), empty for a CPU run (no NVML then). `nvml`: the pynvml
    module to use (default: imported when there are GPUs; tests pass a fake)."""

    def __init__(self, interval: float, disk_path: str | os.PathLike, gpus: list[int | str] | None = None,
                 nvml: Any = None, name: str = "fg-bus-system"):
        if not interval > 0:
            raise ValueError(f"system sampler: interval must be > 0 seconds, got {interval!r}")
        self.interval = float(interval)
        self.disk_path = disk_path
        self.gpus = list(gpus or [])
        self._nvml_module = nvml
        self.name = name
        self._ready: collections.deque = collections.deque(maxlen=1)  # a sample not yet taken is replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.host: HostProbe | None = None
        self.nvml: NvmlProbe | None = None
        self.samples = 0
        self.last_sample_s = 0.0  # seconds the last sample took, and the longest
        self.max_sample_s = 0.0
        self.errors = 0
        self.error: str | None = None  # the last error a sample met (the sampler goes on)

    # -- lifecycle (the bus thread) -----------------------------------------------------------------------

    def start(self) -> "SystemSampler":
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a hung NVML call: the daemon thread is left behind, not waited for

    @property
    def ready(self) -> bool:
        return bool(self._ready)

    def take(self) -> dict | None:
        """The latest finished sample, `{"metrics": {...}, "gpus": [...]}` (gpus only with NVML), or None."""
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    # -- the sampler thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001 - no psutil, /proc unreadable: no system records, training goes on
            logger.warning("system metrics are off: the sampler could not start (%s: %s)", type(e).__name__, e)
            return
        try:
            while not self._stop.wait(self.interval):
                try:
                    self._ready.append(self.sample())
                except Exception as e:  # noqa: BLE001 - one bad read; the next interval tries again
                    self.errors += 1
                    self.error = f"{type(e).__name__}: {e}"
                    if self.errors <= 3:
                        logger.warning("system metrics: a sample failed (%s); trying again in %g s", self.error,
                                       self.interval)
        finally:
            if self.nvml is not None:
                self.nvml.close()

    def setup(self) -> None:
        """Open the probes (primes the CPU counters). NVML failing leaves host metrics only, said once."""
        self.host = HostProbe(self.disk_path)
        if not self.gpus:
            logger.info("system metrics: no GPU in use; host metrics only")
            return
        nvml = self._nvml_module if self._nvml_module is not None else load_nvml(gpus_in_use=True)
        if nvml is None:
            return
        try:
            self.nvml = NvmlProbe(nvml, self.gpus)
        except Exception as e:  # noqa: BLE001 - NVMLError (no driver library), a GPU NVML does not list, ...
            logger.warning("system metrics: NVML cannot sample the GPU(s) %s (%s: %s); host metrics only",
                           self.gpus, type(e).__name__, e)
            self.nvml = None

    def sample(self) -> dict:
        """One sample now, timed (`last_sample_s`, `max_sample_s`)."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        self.host.sample(metrics)
        out: dict = {"metrics": metrics}
        if self.nvml is not None:
            out["gpus"] = self.nvml.sample(metrics)
        self.last_sample_s = time.perf_counter() - t0
        self.max_sample_s = max(self.max_sample_s, self.last_sample_s)
        self.samples += 1
        return out
