"""Shared fixtures: a tiny regression model and dataset, and a callback that records every event."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from trainer import EVENTS, TrainerCallback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyRegression(torch.nn.Module):
    """y = w.x + b with an MSE loss; returns a dict with "loss" (one of the three accepted shapes)."""

    def __init__(self, dim: int = 4, dropout: float = 0.0):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, labels=None):
        pred = self.linear(self.dropout(x)).squeeze(-1)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = torch.nn.functional.mse_loss(pred, labels)
        return out


class RegressionDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, dim: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.arange(1.0, dim + 1) + 0.5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class EventRecorder(TrainerCallback):
    """Records (event, global_step) and the keys of logs / metrics for every event it sees."""

    def __init__(self):
        self.events: list[tuple] = []
        self.kwargs_seen: dict[str, set] = {}

    def _record(self, event, state, kwargs):
        self.kwargs_seen.setdefault(event, set()).update(kwargs)
        entry = (event, state.global_step)
        if event == "on_log":
            entry += (tuple(sorted(kwargs["logs"])),)
        elif event in ("on_evaluate", "on_predict"):
            entry += (tuple(sorted(kwargs["metrics"])),)
        self.events.append(entry)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


def _make_event(name):
    def handler(self, args, state, control, **kwargs):
        self._record(name, state, kwargs)
    handler.__name__ = name
    return handler


for _name in EVENTS:
    setattr(EventRecorder, _name, _make_event(_name))


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyRegression()


def _become_subreaper() -> None:
    """Orphans of this test process (a torchrun whose fg-train launcher a test killed, a sink's children)
    become our children instead of init's, so `_no_process_left_behind` can find them (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


_become_subreaper()


#: what marks a process as one of this project's commands (not a library's helper, such as wandb's service,
#: which lives as long as the test process on purpose)
_OUR_COMMANDS = ("fg-train", "fg-sink", "fg-bus", "-m trainer", "torch.distributed.run", "-m sinks", "mlflow server",
                 "mlflow.server")


def _ours(proc) -> bool:
    import psutil

    try:
        command = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(mark in command for mark in _OUR_COMMANDS)


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """Every process a test started (and their orphans) is gone when it ends: a failed test that killed
    only `fg-train` would otherwise leave its torchrun ranks training on, loading the machine for the tests
    after it. Processes started before the test (a module's fixture) are left alone."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before and _ours(p)]
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=30)  # reaps them too (they are our children, or orphans we adopted)


@pytest.fixture(autouse=True)
def fg_home(tmp_path_factory, monkeypatch):
    """A private FG_HOME for every test (and the processes it starts): never the user's registry. Kept out
    of tmp_path, so tests can check what a command wrote there."""
    home = tmp_path_factory.mktemp("fg-home")
    home.chmod(0o700)
    monkeypatch.setenv("FG_HOME", str(home))
    return home


def same(a, b) -> bool:
    """Equality where NaN equals NaN (and int/float types must agree): for records read back."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


T0 = 1_767_225_600.0  # 2026-01-01: the start time of hand-made runs
#: a run's end reason as `fg-bus ctl stop` makes it (trainer/bus_callback.py _control_reason)
CTL_STOPPED = {"text": "`fg-bus ctl stop` from alice@gpu1 (pid 4242) at step 40", "by": "ctl", "cmd": "stop",
               "source": "fg-bus ctl", "origin": {"user": "alice", "host": "gpu1", "pid": 4242}, "step": 40}


def failed_reason(kind: str, message: str, code: str) -> dict:
    """A failed run's end reason with two frames, the innermost in /src/model.py's forward (raising `code`)."""
    return {"text": f"{kind}: {message}",
            "exception": {"type": kind, "message": message,
                          "traceback": [{"file": "/src/trainer/trainer.py", "line": 512, "function": "train",
                                         "code": "self._step(batch)"},
                                        {"file": "/src/model.py", "line": 77, "function": "forward", "code": code}]}}


def make_run(root, run_id: str, *, pid: int | None = None, status: str = "running", started: float = T0,
             last_step: int | None = None, register: bool = True):
    """A fake run: `<root>/fg-bus/<run_id>/run.json` (endpoints that lead nowhere), registered in $FG_HOME."""
    import socket

    from fg_bus import registry

    bus_dir = root / registry.BUS_DIRNAME / run_id
    bus_dir.mkdir(parents=True)
    pid = os.getpid() if pid is None else pid
    data = {"run_id": run_id, "name": run_id.split("-")[0], "pid": pid, "host": socket.gethostname(),
            "started": started, "status": status, "world_size": 1, "last_step": last_step,
            "ranks": {"0": {"pub": f"ipc:///nonexistent/{run_id}/pub", "replay": f"ipc:///nonexistent/{run_id}/replay",
                            "inbox": f"ipc:///nonexistent/{run_id}/inbox", "pid": pid}}}
    registry.write_json_atomic(bus_dir / registry.RUN_FILE, data)
    info = registry.RunInfo(bus_dir, data)
    if register:
        registry.register(info)
    return info


def explain(proc) -> str:
    """A finished subprocess, for assertion messages."""
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def dead_pid() -> int:
    """A pid with no process behind it (for runs whose trainer is gone)."""
    from fg_bus import registry

    for pid in [4_194_303, 4_194_301, 2_000_003, *range(99_999, 1_000, -1)]:
        if not registry.pid_alive(pid):
            return pid
    raise RuntimeError("no free pid found")


def python_bin_dir() -> str:
    return os.path.dirname(sys.executable)
