"""The system sampler: host metrics through psutil for real; the NVML mapping through a fake `pynvml` module
(so it runs on every machine), checked against the real module's names; NVML for real where a GPU is."""

from __future__ import annotations

import logging
import sys
import time
import types

import pytest

from fg_bus import Publisher, read_journal, registry
from fg_bus._system import INSTALL_HINT, SystemSampler, throttle_names

HOST_KEYS = {"cpu_percent", "host_cpu_percent", "rss_mb", "host_memory_used_mb", "host_memory_total_mb",
             "host_memory_percent", "disk_free_gb"}
GPU_KEYS = {"utilization", "memory_used_mb", "memory_total_mb", "power_w", "temperature_c", "sm_clock_mhz",
            "mem_clock_mhz", "throttle"}
UUIDS = ["GPU-0a0a0a0a-0000-0000-0000-000000000000", "GPU-1b1b1b1b-1111-1111-1111-111111111111"]


def fake_nvml(fail: frozenset = frozenset()) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's `pynvml`, with the same names: two GPUs; `fail` names queries that raise
    NVMLError (as on boards that do not report them)."""
    nvml = types.ModuleType("pynvml")
    nvml.calls = []

    class NVMLError(Exception):
        pass

    def query(name, value):
        def call(handle, *args):
            nvml.calls.append((name, handle, *args))
            if name in fail:
                raise NVMLError(f"{name}: Not Supported")
            return value(handle, *args)
        call.__name__ = name
        return call

    nvml.NVMLError = NVMLError
    nvml.NVML_TEMPERATURE_GPU, nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM = 0, 1, 2
    nvml.nvmlInit = lambda: nvml.calls.append(("nvmlInit",))
    nvml.nvmlShutdown = lambda: nvml.calls.append(("nvmlShutdown",))
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: f"handle{UUIDS.index(uuid)}"
    nvml.nvmlDeviceGetIndex = lambda handle: int(handle[-1])
    nvml.nvmlDeviceGetUUID = lambda handle: UUIDS[int(handle[-1])].encode()  # older versions return bytes
    nvml.nvmlDeviceGetName = lambda handle: f"NVIDIA Fake {handle[-1]}"
    nvml.nvmlDeviceGetUtilizationRates = query("utilization", lambda h: types.SimpleNamespace(gpu=87, memory=40))
    nvml.nvmlDeviceGetMemoryInfo = query("memory", lambda h: types.SimpleNamespace(
        used=3 * 2**30, total=80 * 2**30, free=77 * 2**30))
    nvml.nvmlDeviceGetPowerUsage = query("power", lambda h: 312_500)  # milliwatts
    nvml.nvmlDeviceGetTemperature = query("temperature", lambda h, sensor: 64)
    nvml.nvmlDeviceGetClockInfo = query("clock", lambda h, kind: {1: 1980, 2: 2619}[kind])
    nvml.nvmlDeviceGetCurrentClocksEventReasons = query("throttle", lambda h: 0x4 | 0x40)
    return nvml


def test_the_fake_nvml_uses_the_real_modules_names():
    real = pytest.importorskip("pynvml", reason="nvidia-ml-py (the gpu extra) is not installed")
    fake = fake_nvml()
    for name in vars(fake):
        if name.startswith(("nvml", "NVML")):
            assert hasattr(real, name), name


def test_host_metrics_are_sane(tmp_path):
    sampler = SystemSampler(1.0, tmp_path)
    sampler.setup()
    sum(i * i for i in range(200_000))  # some CPU time for this process between the priming and the sample
    sample = sampler.sample()
    m = sample["metrics"]
    assert set(m) == HOST_KEYS and "gpus" not in sample
    assert all(isinstance(v, float) for v in m.values())
    assert m["cpu_percent"] >= 0 and 0 <= m["host_cpu_percent"] <= 100 and 0 < m["host_memory_percent"] <= 100
    assert 10 < m["rss_mb"] < m["host_memory_total_mb"] and 0 < m["host_memory_used_mb"] <= m["host_memory_total_mb"]
    assert m["disk_free_gb"] > 0
    assert 0 < sampler.last_sample_s < 60  # measured (what it costs is in bench/run.py: system_sample_us_max)


def test_the_nvml_mapping_with_a_fake_pynvml(tmp_path, monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    # torch's device UUID has no "GPU-" prefix: it is matched to NVML's by value; an int is an NVML index
    sampler = SystemSampler(1.0, tmp_path, gpus=[UUIDS[1][4:].upper()])
    sampler.setup()
    sample = sampler.sample()
    m = sample["metrics"]
    assert set(m) == HOST_KEYS | {f"gpu1_{k}" for k in GPU_KEYS}  # NVML's index 1: only this rank's GPU
    assert m["gpu1_utilization"] == 87.0 and m["gpu1_memory_used_mb"] == 3 * 1024.0
    assert m["gpu1_memory_total_mb"] == 80 * 1024.0 and m["gpu1_power_w"] == 312.5
    assert m["gpu1_temperature_c"] == 64.0 and m["gpu1_sm_clock_mhz"] == 1980.0 and m["gpu1_mem_clock_mhz"] == 2619.0
    assert m["gpu1_throttle"] == 0x44 and type(m["gpu1_throttle"]) is int
    assert sample["gpus"] == [{"index": 1, "name": "NVIDIA Fake 1",
                               "throttle_reasons": ["sw_power_cap", "hw_thermal_slowdown"]}]
    assert {c[1] for c in nvml.calls if len(c) > 1} == {"handle1"}  # GPU 0 is never queried
    assert ("clock", "handle1", 1) in nvml.calls and ("temperature", "handle1", 0) in nvml.calls
    sampler.nvml.close()
    assert nvml.calls[-1] == ("nvmlShutdown",)


def test_a_value_the_gpu_does_not_report_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail=frozenset({"power", "throttle"})))
    sampler = SystemSampler(1.0, tmp_path, gpus=[0, 1])
    sampler.setup()
    sample = sampler.sample()
    for i in (0, 1):
        assert {k for k in sample["metrics"] if k.startswith(f"gpu{i}_")} == \
            {f"gpu{i}_{k}" for k in GPU_KEYS - {"power_w", "throttle"}}
    assert [g["throttle_reasons"] for g in sample["gpus"]] == [[], []]


def test_nvml_missing_on_a_gpu_run_warns_once_naming_the_extra(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with caplog.at_level(logging.DEBUG, logger="fg_bus._system"):
        sampler = SystemSampler(1.0, tmp_path, gpus=["GPU-0a0a"])
        sampler.setup()
        sample = sampler.sample()
    assert set(sample["metrics"]) == HOST_KEYS
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and INSTALL_HINT in warnings[0].getMessage()


def test_a_cpu_run_says_host_metrics_only_without_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with caplog.at_level(logging.DEBUG, logger="fg_bus._system"):
        sampler = SystemSampler(1.0, tmp_path)
        sampler.setup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("host metrics only" in r.getMessage() for r in caplog.records)


def test_a_gpu_nvml_does_not_list_leaves_host_metrics(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    with caplog.at_level(logging.WARNING, logger="fg_bus._system"):
        sampler = SystemSampler(1.0, tmp_path, gpus=["GPU-ffffffff"])
        sampler.setup()
        assert set(sampler.sample()["metrics"]) == HOST_KEYS
    assert "GPU-ffffffff" in caplog.text and sampler.nvml is None


def test_throttle_names():
    assert throttle_names(0) == [] and throttle_names(0x1) == ["gpu_idle"]
    assert throttle_names(0x8 | 0x80 | 0x10000) == ["hw_slowdown", "hw_power_brake_slowdown", "0x10000"]


def test_the_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="interval"):
        SystemSampler(0, tmp_path)
    with pytest.raises(ValueError, match="system_interval"):
        Publisher(tmp_path, "r", system_interval=-1)


def test_the_publisher_publishes_system_records_from_its_sampler(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    pub = Publisher(tmp_path / "bus", registry.new_run_id("sys"), system_interval=0.05, gpus=[0]).start()
    try:
        pub.publish("on_step_end", 7, 0.1)
        deadline = time.monotonic() + 60
        while pub.sampler.samples < 3:
            assert time.monotonic() < deadline, "no samples within 60 s"
            time.sleep(0.02)
    finally:
        pub.close()
    assert pub.sampler._thread.name == "fg-bus-system-rank0" and not pub.sampler._thread.is_alive()
    system = [r for r in read_journal(pub.bus_dir / "journal.rank0.jsonl") if r["event"] == "system"]
    assert len(system) >= 2  # the last sample may be taken after the close
    for record in system:
        assert record["global_step"] == 7 and set(record["metrics"]) == HOST_KEYS | {f"gpu0_{k}" for k in GPU_KEYS}
        assert record["gpus"] == [{"index": 0, "name": "NVIDIA Fake 0",
                                   "throttle_reasons": ["sw_power_cap", "hw_thermal_slowdown"]}]


def _real_gpu():
    try:
        import pynvml
    except ImportError:
        pytest.skip("no NVIDIA GPU: nvidia-ml-py is not installed (pip install fg-bus[gpu])")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no NVIDIA GPU: NVML does not start here ({e})")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("no NVIDIA GPU: NVML sees none")
        return pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()


def test_nvml_for_real_on_a_gpu(tmp_path):
    uuid = _real_gpu()
    sampler = SystemSampler(1.0, tmp_path, gpus=[uuid if isinstance(uuid, str) else uuid.decode()])
    sampler.setup()
    try:
        assert sampler.nvml is not None and sampler.nvml.indices == [0]
        sample = sampler.sample()
    finally:
        sampler.nvml.close()
    m = sample["metrics"]
    assert 0 <= m["gpu0_utilization"] <= 100 and 0 < m["gpu0_memory_used_mb"] <= m["gpu0_memory_total_mb"]
    assert 0 < m["gpu0_sm_clock_mhz"] and 0 < m["gpu0_temperature_c"] < 120
    assert sample["gpus"][0]["index"] == 0 and sample["gpus"][0]["name"]
    assert 0 < sampler.last_sample_s < 60


def test_the_trainer_names_its_gpu_by_uuid_and_a_cpu_run_none(monkeypatch):
    import torch

    from trainer.bus_callback import _gpus_of

    assert _gpus_of(types.SimpleNamespace(device=torch.device("cpu"))) == []
    uuid = UUIDS[1][4:]  # torch's form: no "GPU-"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=f"{uuid}"))
    assert _gpus_of(types.SimpleNamespace(device=torch.device("cuda", 1), n_gpu=1)) == [uuid]
