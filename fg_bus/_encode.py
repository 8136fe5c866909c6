"""Records built and encoded on the bus thread from what `Publisher.publish()` queued."""

from __future__ import annotations

from datetime import datetime, timezone

from . import records


def queued_record(run_id: str, rank: int, seq: int, fields: tuple) -> bytes:
    """The encoded record; raises records.EncodeError naming a value that cannot be encoded."""
    timestamp, event, global_step, epoch, metrics, extra = fields
    record = {"v": records.SCHEMA_VERSION, "run": run_id, "rank": rank, "seq": seq,
              "timestamp": datetime.fromtimestamp(timestamp, timezone.utc), "event": event,
              "global_step": global_step, "epoch": epoch, "metrics": metrics if metrics is not None else {}}
    if extra:
        record.update(extra)
    data = records.encode(record)
    if len(data) > records.MAX_RECORD_BYTES:
        # Readers skip a line this long as too-large (and count a hole): refuse it here, keeping its seq.
        raise records.EncodeError(f"the {event} record is {len(data):,} bytes, over the "
                                  f"{records.MAX_RECORD_BYTES:,}-byte bound on a record")
    return data


def error_record(run_id: str, rank: int, seq: int, fields: tuple, error: str) -> bytes:
    """The record at `seq` without its values, and why: the stream keeps its seq and says what went wrong."""
    timestamp, event, global_step, epoch = fields[:4]
    keep = {"v": records.SCHEMA_VERSION, "run": run_id, "rank": rank, "seq": seq,
            "timestamp": datetime.fromtimestamp(timestamp, timezone.utc), "event": str(event),
            "global_step": global_step if type(global_step) is int else None,
            "epoch": epoch if type(epoch) in (int, float) else None}
    return records.encode({**keep, "metrics": {}, "error": error})


def bus_record(run_id: str, rank: int, seq: int, timestamp: float, event: str, fields: dict) -> bytes:
    """One of the bus's own records (warning, system, end, a sink's result): `fields` after the header."""
    return records.encode({"v": records.SCHEMA_VERSION, "run": run_id, "rank": rank, "seq": seq,
                           "timestamp": datetime.fromtimestamp(timestamp, timezone.utc), "event": event, **fields})
