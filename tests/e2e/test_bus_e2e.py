"""The bus with real processes: `fg-train` publishing, subscribers joining late, stopped, killed and
restarted, a trainer killed, control from `fg-bus ctl`, signals, and CURVE on tcp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from fg_bus import Subscriber, read_journal, registry

BIN = Path(sys.executable).parent
TINY = Path(__file__).with_name("tiny.yaml")


class Train:
    """An `fg-train` subprocess on the tiny config, publishing into a private FG_HOME."""

    def __init__(self, tmp_path: Path, fg_home: Path, *args: str, max_steps: int = 1500,
                 start_new_session: bool = False):
        self.out = tmp_path / "out"
        self.log = open(tmp_path / "train.log", "wb")
        # One intra-op thread: on a loaded 2-core machine, torch's thread pool spinning against the other
        # work makes each step many times slower, and these tests are about the bus, not torch.
        self.env = {**os.environ, "FG_HOME": str(fg_home), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [str(BIN / "fg-train"), str(TINY), "--device", "cpu", "--output-dir", str(self.out),
             "--max-steps", str(max_steps), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=start_new_session)

    def run_info(self, timeout: float = 240) -> registry.RunInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = list((self.out / "fg-bus").glob("*/run.json"))
            if runs:
                return registry.load_run(runs[0].parent)
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError("fg-train did not start publishing")

    def journal_lines(self, info: registry.RunInfo) -> int:
        path = info.journal_path()
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def wait_for_records(self, info: registry.RunInfo, n: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while self.journal_lines(info) < n:
            assert time.monotonic() < deadline, f"fewer than {n} records after {timeout} s"
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def train(tmp_path, fg_home):
    started = []

    def start(*args, **kwargs):
        t = Train(tmp_path, fg_home, *args, **kwargs)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def journal(info: registry.RunInfo) -> list[dict]:
    return list(read_journal(info.journal_path()))


def contiguous(records: list[dict]) -> bool:
    return [r["seq"] for r in records] == list(range(len(records)))


def cat(fg_home: Path, run: str, out: Path, *args: str, mode: str = "wb") -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fg-bus"), "cat", run, *args], stdout=open(out, mode),
                            stderr=subprocess.PIPE, env={**os.environ, "FG_HOME": str(fg_home)})


def complete_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    return [orjson.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines()]


def test_a_subscriber_started_mid_run_gets_the_whole_history_then_the_live_stream(train):
    t = train()
    info = t.run_info()
    t.wait_for_records(info, 400)
    sub = Subscriber(info.run_id, from_seq=0, dead_after=10)
    got = list(sub)
    assert t.wait() == 0, t.output()
    assert contiguous(got) and got[-1]["event"] == "end" and sub.status == "completed"
    assert got == journal(info)  # exactly the journal: no hole, no duplicate
    assert sub.stats.replayed >= 400 and sub.stats.live > 0  # history by replay, then live
    begin = next(r for r in got if r["event"] == "on_train_begin")
    assert begin["meta"]["model"]["factory"] == "trainer.chargpt:CharGPT"
    assert begin["meta"]["model"]["config"]["n_embd"] == 16 and begin["meta"]["num_parameters"] > 0
    assert begin["meta"]["args"]["max_steps"] == 1500 and begin["meta"]["tokenizer"]["vocab_size"] > 50
    steps = [r for r in got if r["event"] == "on_step_end"]
    assert len(steps) == 1500 and all(isinstance(r["metrics"]["loss"], float) for r in steps)
    assert all("grad_norm" in r["metrics"] for r in steps)
    saves = [r for r in got if r["event"] == "on_save"]
    assert saves and saves[0]["checkpoint"] == str(t.out / "checkpoint-100")
    names = {r["event"] for r in got}
    assert {"on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_pre_optimizer_step",
            "on_optimizer_step", "on_step_end", "on_log", "on_prediction_step", "on_evaluate", "on_save",
            "on_train_end", "end"} <= names


@pytest.mark.slow
def test_a_stopped_subscriber_does_not_slow_the_trainer_and_catches_up(train, fg_home, tmp_path):
    t = train(max_steps=600)
    info = t.run_info()
    out = tmp_path / "cat.jsonl"
    follower = cat(fg_home, info.run_id, out)
    try:
        while len(complete_lines(out)) < 200:
            assert t.proc.poll() is None and follower.poll() is None
            time.sleep(0.05)
        follower.send_signal(signal.SIGSTOP)
        # The trainer finishes the whole run while its subscriber is frozen: publishing never waits for it.
        assert t.wait() == 0, t.output()
        assert follower.poll() is None
        follower.send_signal(signal.SIGCONT)
        assert follower.wait(300) == 0, follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.send_signal(signal.SIGCONT)
            follower.kill()
    got = complete_lines(out)
    assert contiguous(got) and got[-1]["event"] == "end"
    assert len(got) == len(journal(info))


def test_a_subscriber_killed_and_restarted_from_its_last_seq_ends_complete(train, fg_home, tmp_path):
    t = train(max_steps=600)
    info = t.run_info()
    out = tmp_path / "cat.jsonl"
    first = cat(fg_home, info.run_id, out)
    while len(complete_lines(out)) < 300:
        assert first.poll() is None and t.proc.poll() is None
        time.sleep(0.05)
    first.kill()
    first.wait(10)
    kept = complete_lines(out)
    out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))  # drop a torn last line, if any
    second = cat(fg_home, info.run_id, out, "--from", str(kept[-1]["seq"] + 1), mode="ab")
    assert second.wait(300) == 0, second.stderr.read()
    assert t.wait() == 0
    got = complete_lines(out)
    assert contiguous(got) and got == journal(info)


def test_a_killed_trainer_is_reported_dead_and_its_journal_reads_back(train, fg_home):
    t = train(max_steps=100_000)
    info = t.run_info()
    t.wait_for_records(info, 300)
    sub = Subscriber(info.run_id, from_seq=0, dead_after=3)
    got = sub.poll(1.0)
    t.proc.kill()
    t.proc.wait(10)  # reaped, as a shell would: a zombie still answers kill(pid, 0)
    killed = time.monotonic()
    while not sub.finished:
        got += sub.poll(1.0)
        assert time.monotonic() - killed < 60, "not reported dead: a hang (dead_after is 3 s)"
    assert sub.status == "dead"
    assert sub.end_reason == {"text": f"its process (pid {t.proc.pid}) is gone without ending the run"}
    print(f"reported dead {time.monotonic() - killed:.1f} s after SIGKILL")
    on_disk = journal(info)
    assert contiguous(on_disk) and len(on_disk) >= 300
    assert got == on_disk  # the subscriber ends with everything the journal holds
    ls = subprocess.run([str(BIN / "fg-bus"), "ls", "--json"], capture_output=True, text=True, timeout=30,
                        env=t.env, check=True)
    assert [r["status"] for r in json.loads(ls.stdout) if r["run_id"] == info.run_id] == ["dead"]


def test_fg_bus_ctl_stop_stops_at_a_step_boundary_with_a_final_checkpoint(train):
    t = train(max_steps=100_000)
    info = t.run_info()
    t.wait_for_records(info, 200)
    ctl = subprocess.run([str(BIN / "fg-bus"), "ctl", info.run_id, "stop"], capture_output=True, text=True,
                         timeout=60, env=t.env)
    assert ctl.returncode == 0, ctl.stderr
    assert "applied" in ctl.stdout
    assert t.wait(60) == 0, t.output()
    records = journal(info)
    applied = [r for r in records if r["event"] == "control" and r.get("applied")]
    assert len(applied) == 1 and applied[0]["cmd"] == "stop"
    step = applied[0]["global_step"]
    assert f"at step {step}" in ctl.stdout
    assert (t.out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert records[-1]["event"] == "end" and records[-1]["status"] == "stopped"
    assert records[-1]["reason"]["cmd"] == "stop" and records[-1]["reason"]["source"] == "fg-bus ctl"
    assert [r["event"] for r in records[-2:]] == ["on_train_end", "end"]
    assert max(r["global_step"] or 0 for r in records) == step  # no step after the one that saw the stop


def test_ctrl_c_finishes_the_step_saves_and_ends_the_stream_as_interrupted_with_its_sink_complete(train):
    # As a terminal does: fg-train leads its own process group, and SIGINT goes to the whole group, so the
    # sink it started gets it too unless it runs apart (its own session).
    t = train("--sinks", "json", max_steps=100_000, start_new_session=True)
    info = t.run_info()
    t.wait_for_records(info, 200)
    os.killpg(t.proc.pid, signal.SIGINT)
    assert t.wait(60) == 128 + signal.SIGINT, t.output()
    records = journal(info)
    assert records[-1]["event"] == "end" and records[-1]["status"] == "interrupted"
    step = records[-1]["global_step"]
    assert (t.out / f"checkpoint-{step}").is_dir()
    assert "--resume" in t.output()
    assert registry.load_run(info.bus_dir).status == "interrupted"
    log = t.out / "logs" / f"{info.run_id}.jsonl"
    assert [json.loads(line) for line in log.read_bytes().splitlines()] == json.loads(json.dumps(records))


def test_tcp_with_curve_keys_refuses_a_client_without_an_allowed_key(train, fg_home):
    subprocess.run([str(BIN / "fg-bus"), "keys"], check=True, timeout=30, env={**os.environ, "FG_HOME": str(fg_home)})
    t = train("--bus-tcp", "127.0.0.1:0", max_steps=100_000)
    info = t.run_info()
    assert info.data["curve_server_key"]
    pub = info.ranks["0"]["pub"]
    assert pub.startswith("tcp://127.0.0.1:")

    def heard_within(seconds: float, public=None, secret=None, curve=True) -> bool:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        if curve:
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = info.data["curve_server_key"].encode()
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(pub)
        try:
            return bool(sock.poll(int(seconds * 1000)))
        finally:
            sock.close()
            ctx.term()

    from fg_bus import security

    allowed = security.client_keys()
    assert heard_within(10, allowed.public, allowed.secret)  # the authorized key hears the stream
    stranger_public, stranger_secret = zmq.curve_keypair()
    assert not heard_within(2, stranger_public, stranger_secret)  # a valid CURVE key, but not allowed
    assert not heard_within(2, curve=False)  # no CURVE at all
    with Subscriber(info.run_id, from_seq=0, dead_after=10) as sub:  # the library client uses the allowed key
        assert sub.poll(5.0)

    # Nothing a stranger sends is accepted: a stop on the inbox, a replay request.
    ctx = zmq.Context()
    push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    for sock in (push, dealer):
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = stranger_public, stranger_secret
        sock.curve_serverkey = info.data["curve_server_key"].encode()
    push.connect(info.ranks["0"]["inbox"])
    dealer.connect(info.ranks["0"]["replay"])
    if push.poll(2000, zmq.POLLOUT):  # with no handshake completed, zmq may not even take the message
        push.send(json.dumps({"op": "control", "cmd": "stop", "id": "stranger"}).encode(), flags=zmq.NOBLOCK)
    if dealer.poll(2000, zmq.POLLOUT):
        dealer.send(b'{"op":"replay","from":0}', flags=zmq.NOBLOCK)
    assert not dealer.poll(2000)  # no reply
    push.close()
    dealer.close()
    ctx.term()
    assert t.proc.poll() is None  # still training
    assert not [r for r in journal(t.run_info()) if r.get("id") == "stranger"]
    t.proc.send_signal(signal.SIGTERM)
    assert t.wait(60) == 128 + signal.SIGTERM


def test_the_bus_callback_publishes_from_inside_transformers_trainer(fg_home, tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import RegressionDataset, TinyRegression
    from trainer.bus_callback import BusCallback

    bus = BusCallback(run_name="hf-run")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none",
                                          max_steps=6, logging_steps=2, save_steps=3,
                                          per_device_train_batch_size=2, disable_tqdm=True)
    hf = transformers.Trainer(model=TinyRegression(), args=args, train_dataset=RegressionDataset(8),
                              callbacks=[bus])
    hf.train()
    bus.close()  # under transformers the stream stays open after train() for evaluate() / predict()
    info = registry.resolve(bus.run_id)
    got = list(Subscriber(str(info.bus_dir)))
    assert contiguous(got) and got[-1]["status"] == "completed"
    assert [r["global_step"] for r in got if r["event"] == "on_log" and "loss" in r["metrics"]] == [2, 4, 6]
    assert [r["checkpoint"] for r in got if r["event"] == "on_save"] == \
        [str(tmp_path / "hf" / "checkpoint-3"), str(tmp_path / "hf" / "checkpoint-6")]


def test_a_follower_started_before_the_trainer_waits_for_it_and_gets_the_whole_run(train, fg_home, tmp_path):
    out = tmp_path / "early.jsonl"
    follower = cat(fg_home, "latest", out, "--wait", "60")
    try:
        time.sleep(0.5)  # give it time to be waiting (it polls the registry); correctness does not depend on it
        assert follower.poll() is None
        t = train(max_steps=200)
        assert t.wait() == 0
        assert follower.wait(60) == 0, follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
    got = complete_lines(out)
    info = registry.load_run(next((tmp_path / "out" / "fg-bus").iterdir()))
    assert got == journal(info) and got[0]["event"] == "on_init_end" and got[-1]["status"] == "completed"


def test_an_exception_in_training_ends_the_stream_as_failed(tmp_path):
    from conftest import RegressionDataset, TinyRegression
    from trainer import Trainer, TrainerCallback, TrainingArguments
    from trainer.bus_callback import BusCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    bus = BusCallback()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, disable_tqdm=True, max_steps=10,
                             save_strategy="no")
    trainer = Trainer(TinyRegression(), args, train_dataset=RegressionDataset(8), callbacks=[Boom()],
                      event_bus=bus)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    records = journal(registry.resolve(bus.run_id))
    assert contiguous(records) and records[-1]["event"] == "end" and records[-1]["status"] == "failed"
    assert records[-1]["global_step"] == 3
    assert registry.resolve(bus.run_id).status == "failed"
