"""The training thread's side of publishing: publish() appends what the event gave, the bus thread gives the
seq (in queue order), formats the timestamp and builds the record. The stream must come out as before:
seq 0, 1, 2, ... without a hole, in the order of publishing (several threads included), the timestamp of
the publish() call, the record's fields and their order unchanged, nothing after the end record."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
import torch
from conftest import RegressionDataset, TinyRegression

import trainer as fg
from fg_bus import Publisher, read_journal, records, registry

HEADER = ["v", "run", "rank", "seq", "timestamp", "event"]


@pytest.fixture
def publisher(fg_home, tmp_path):
    pub = Publisher(tmp_path / "bus" / "r1", registry.new_run_id("t")).start()
    yield pub
    pub.close()


def journal(pub: Publisher) -> list[dict]:
    return list(read_journal(pub.bus_dir / f"journal.rank{pub.rank}.jsonl"))


def test_records_keep_their_fields_in_order_and_the_end_record_its_last_step(publisher):
    publisher.publish("on_step_end", 3, 0.5, metrics={"loss": 1.5})
    publisher.publish("on_save", 3, 0.5, checkpoint="out/checkpoint-3")
    publisher._publish_from_bus("warning", {"message": "m", "global_step": 3})  # the bus's own, in line
    publisher.publish("on_step_begin", 4, 0.75)
    publisher.close()
    got = journal(publisher)
    assert [list(r) for r in got] == [
        HEADER + ["global_step", "epoch", "metrics"],
        HEADER + ["global_step", "epoch", "metrics", "checkpoint"],
        HEADER + ["message", "global_step"],
        HEADER + ["global_step", "epoch", "metrics"],
        HEADER + ["status", "reason", "global_step"],
    ]
    assert [r["seq"] for r in got] == [0, 1, 2, 3, 4]
    assert got[0]["metrics"] == {"loss": 1.5} and got[3]["metrics"] == {}
    assert got[-1]["event"] == records.END and got[-1]["global_step"] == 4  # the last step drained
    assert publisher.publish("on_log", 5) is False  # closed: nothing queued


def test_publish_step_event_writes_the_record_publish_writes(publisher):
    publisher.publish("on_step_begin", 4, 0.75)
    publisher.publish_step_event("on_step_begin", 4, 0.75)
    publisher.publish("on_log", 4, 0.75, {"loss": 1.5, "learning_rate": 1e-3})
    publisher.publish_step_event("on_log", 4, 0.75, {"loss": 1.5, "learning_rate": 1e-3})
    publisher.close()
    assert publisher.publish_step_event("on_step_begin", 5, 1.0) is False  # closed: nothing queued
    got = journal(publisher)
    for by_publish, by_step_event in (got[0:2], got[2:4]):
        assert list(by_publish) == list(by_step_event)
        del by_publish["seq"], by_publish["timestamp"], by_step_event["seq"], by_step_event["timestamp"]
        assert by_publish == by_step_event
    assert got[3]["metrics"] == {"loss": 1.5, "learning_rate": 1e-3} and got[1]["metrics"] == {}


def test_the_timestamp_is_the_time_of_publishing_not_of_encoding(publisher):
    """A record whose values are not ready yet is encoded later; its timestamp is still the call's."""
    release = threading.Event()
    before = time.time()
    assert publisher.publish_when_ready(release.is_set, "on_step_end", 1, 0.1, metrics={"loss": 1.0}) is True
    publisher.publish("on_step_begin", 2, 0.2)  # waits behind it: the order (and seq) is the call order
    after = time.time()
    time.sleep(0.05)  # not synchronisation: a gap the timestamps must not show
    release.set()
    publisher.close()
    first, second = journal(publisher)[:2]
    assert (first["seq"], first["event"], second["seq"], second["event"]) == (0, "on_step_end", 1, "on_step_begin")
    stamped = datetime.fromisoformat(first["timestamp"]).timestamp()
    assert before - 1e-3 <= stamped <= after + 1e-3


def test_metrics_are_copied_at_publish_and_tensors_read_by_the_bus_thread(publisher):
    metrics = {"loss": 2.0}
    publisher.publish("on_log", 1, 0.1, metrics=metrics)
    metrics["loss"] = 99.0  # a later callback changes the logs dict: the record keeps what was published
    publisher.publish_when_ready(lambda: True, "on_step_end", 1, 0.1,
                                 metrics={"loss": torch.tensor(0.25), "nan": torch.tensor(float("nan"))})
    publisher.close()
    got = journal(publisher)
    assert got[0]["metrics"] == {"loss": 2.0}
    assert got[1]["metrics"]["loss"] == 0.25 and got[1]["metrics"]["nan"] != got[1]["metrics"]["nan"]  # NaN stays NaN


def test_several_publishing_threads_get_every_seq_once_each_in_its_own_order(publisher):
    """No lock on the publishing side: deque.append is atomic, and the queue's order is the seq order."""
    per_thread, threads = 3000, 4
    start = threading.Barrier(threads)

    def publish(k):
        start.wait()
        for i in range(per_thread):
            publisher.publish("on_log", i, metrics={"thread": k, "i": i})

    workers = [threading.Thread(target=publish, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    publisher.close()
    got = journal(publisher)
    assert [r["seq"] for r in got] == list(range(threads * per_thread + 1))
    for k in range(threads):
        assert [r["metrics"]["i"] for r in got[:-1] if r["metrics"]["thread"] == k] == list(range(per_thread))
    assert got[-1]["event"] == records.END


def test_a_thread_publishing_while_another_closes_never_gets_a_record_past_the_end(fg_home, tmp_path):
    for attempt in range(5):
        pub = Publisher(tmp_path / "bus" / str(attempt), registry.new_run_id("t")).start()
        go = threading.Event()

        def publish():
            # Until publish() says the bus is closed, as a publishing thread does. (A thread that went on
            # spinning in pure Python past that would hold the GIL against the bus thread, whose every
            # socket send then waits out the interpreter's 5 ms switch interval: close() would time out.)
            go.set()
            i = 0
            while pub.publish("on_log", i):
                i += 1

        worker = threading.Thread(target=publish)
        worker.start()
        go.wait(10)
        pub.close()
        worker.join(10)
        assert not worker.is_alive()
        got = journal(pub)
        assert got[-1]["event"] == records.END
        assert [r["seq"] for r in got] == list(range(len(got)))


def test_the_bus_callback_step_values_are_the_same_on_its_first_and_later_steps(fg_home, tmp_path):
    """on_step_end asks what its values are at the first step, then takes a flat path: the records of
    both (our Trainer, on the CPU) carry the same keys, the loss and grad norm as the trainer had them,
    and data_time to the microsecond."""
    class Keep(fg.TrainerCallback):
        def __init__(self):
            self.values = []

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            self.values.append((t.step_loss.item(), t.step_grad_norm.item(), t.step_data_time))

    bus, keep = fg.BusCallback(system_interval=0), Keep()
    args = fg.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, max_steps=4,
                                logging_steps=2, per_device_train_batch_size=4, save_strategy="no",
                                report_to="none")
    trainer = fg.Trainer(TinyRegression(), args, train_dataset=RegressionDataset(), event_bus=bus, callbacks=[keep])
    keep.trainer = trainer
    trainer.train()
    bus.close()
    got = list(read_journal(registry.resolve(bus.run_id).journal_path()))
    assert [r["seq"] for r in got] == list(range(len(got)))
    ends = [r["metrics"] for r in got if r["event"] == "on_step_end"]
    assert [list(m) for m in ends] == [["loss", "grad_norm", "data_time"]] * 4
    for m, (loss, grad_norm, data_time) in zip(ends, keep.values):
        assert m["loss"] == pytest.approx(loss, rel=1e-6) and m["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        assert m["data_time"] == round(data_time, 6)
