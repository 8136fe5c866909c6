"""The wire format, defined once: schema v1 records, their encoding, and the ZeroMQ frame layout.

A record is one JSON object (orjson) per event. The same bytes go on the wire, into the journal, and
(one per line) into JSON logs. ZeroMQ messages are two frames, `[event, record]`, so a subscriber can
filter by event name with a prefix subscription.

Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity" (orjson alone would write
null and a diverging loss would vanish) and decoded back to floats in `metrics` and `epoch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from itertools import repeat
from operator import contains, itemgetter
from typing import Any

import orjson

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("v", "run", "rank", "seq", "timestamp", "event")
#: Events the bus itself emits (beside the fifteen trainer events).
HEARTBEAT = "heartbeat"
END = "end"
CONTROL = "control"
#: The longest record (encoded, without its newline) a reader accepts: a longer journal line or replay
#: line is skipped as malformed ("too-large") without being held whole in memory.
MAX_RECORD_BYTES = 16 << 20

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class RecordError(ValueError):
    """A record or message that cannot be accepted; `reason` is a short category for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class EncodeError(TypeError):
    """A value that cannot be encoded; the message names its key path."""


def now() -> datetime:
    """The record timestamp: an aware UTC datetime, written by orjson as ISO 8601."""
    return datetime.now(timezone.utc)


def _scalar(obj: Any) -> Any:
    """orjson's fallback: 0-d / one-element torch tensors and anything with `.item()` become Python numbers."""
    item = getattr(obj, "item", None)
    if item is not None and getattr(obj, "numel", lambda: 1)() == 1:
        return item()
    raise TypeError


def _sanitize(obj: Any, path: str) -> Any:
    """A copy with non-finite floats as strings and scalar tensors as numbers; EncodeError names a bad leaf."""
    if isinstance(obj, float) or type(obj).__name__.startswith("float"):
        value = float(obj)
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(1 << 63) <= obj < (1 << 64):
        raise EncodeError(f"cannot encode {path or 'record'}: integer {obj} does not fit in 64 bits")
    if obj is None or isinstance(obj, (str, int, bool, datetime)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise EncodeError(f"cannot encode {path or 'record'}: key {key!r} is not a string")
            out[key] = _sanitize(value, f"{path}.{key}" if path else key)
        return out
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return _sanitize(obj.tolist(), path)
    try:
        return _sanitize(_scalar(obj), path)
    except TypeError:
        raise EncodeError(f"cannot encode {path or 'record'}: {type(obj).__module__}.{type(obj).__qualname__} "
                          "is not a JSON value (use numbers, strings, lists and dicts)") from None


def encode(record: Mapping[str, Any]) -> bytes:
    """Encode a record. Fast path: one orjson call; only a record that held a null (possibly a NaN that
    orjson turned into null) or an unsupported type is walked and encoded again."""
    try:
        data = orjson.dumps(record, default=_scalar, option=_OPTIONS)
    except TypeError:
        data = None
    if data is None or b"null" in data:
        data = orjson.dumps(_sanitize(record, ""), option=_OPTIONS)
    return data


def _restore(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def validate(record: Any, restore: bool = True) -> dict:
    """Check a decoded value is a v1 record; restore non-finite floats (`restore=False`: the caller knows
    the bytes held none). Raises RecordError with a reason."""
    if type(record) is not dict:
        raise RecordError("not-an-object", f"a record must be a JSON object, got {type(record).__name__}")
    try:
        version, seq, rank, event, run = record["v"], record["seq"], record["rank"], record["event"], record["run"]
        record["timestamp"]
    except KeyError:
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        raise RecordError("missing-field", f"record lacks {', '.join(missing)}") from None
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RecordError("unknown-version", f"schema version {version!r}; this reader knows {SCHEMA_VERSION}")
    if type(seq) is not int or seq < 0:
        raise RecordError("bad-field", f"seq must be an integer >= 0, got {seq!r}")
    if type(rank) is not int or rank < 0:
        raise RecordError("bad-field", f"rank must be an integer >= 0, got {rank!r}")
    if type(event) is not str or not event:
        raise RecordError("bad-field", f"event must be a non-empty string, got {event!r}")
    if type(run) is not str:
        raise RecordError("bad-field", f"run must be a string, got {run!r}")
    metrics = record.get("metrics")
    if metrics is not None:
        if type(metrics) is not dict:
            raise RecordError("bad-field", f"metrics must be an object, got {type(metrics).__name__}")
        if restore:
            record["metrics"] = _restore(metrics)
    if restore and type(record.get("epoch")) is str:
        record["epoch"] = _restore(record["epoch"])
    return record


_VERSION, _RUN, _RANK, _SEQ, _EVENT = map(itemgetter, ("v", "run", "rank", "seq", "event"))
_METRICS_TYPES = frozenset({dict, type(None)})


def all_valid(values: list) -> bool:
    """Whether every value of a parsed chunk is a record `validate` accepts, with nothing to restore (the
    caller knows the bytes held no non-finite float). Checked field by field over the whole list with `map`
    and `set` (C loops) instead of one Python call per record (about 10% less time per record, chunk parse
    included, measured side by side). False says only that some value is not: the caller then validates
    record by record, for the reasons."""
    if not values or set(map(type, values)) != {dict}:
        return False
    try:
        versions, runs, ranks = list(map(_VERSION, values)), list(map(_RUN, values)), list(map(_RANK, values))
        seqs, events = list(map(_SEQ, values)), set(map(_EVENT, values))
    except KeyError:
        return False
    return (all(map(contains, values, repeat("timestamp")))
            and set(map(type, versions)) == {int} and set(versions) == {SCHEMA_VERSION}
            and set(map(type, runs)) == {str}
            and set(map(type, ranks)) == {int} and min(ranks) >= 0
            and set(map(type, seqs)) == {int} and min(seqs) >= 0
            and set(map(type, events)) == {str} and "" not in events
            and set(map(type, map(dict.get, values, repeat("metrics")))) <= _METRICS_TYPES)


def may_hold_nonfinite(data: bytes) -> bool:
    """Whether encoded bytes could hold a non-finite float (written as "NaN", "Infinity", "-Infinity").
    First a search for their capitals, one byte each (memchr, about 10x faster than a substring search,
    which was a tenth of a decoded replay's time): most records have neither. Then the needles, which end
    on letters that are rare in records, not on the frequent `"`, so the search skips ahead further."""
    if b"N" not in data and b"I" not in data:
        return False
    return b'"NaN' in data or b'Infinity' in data


# -- the raw path: records checked on their bytes, for sinks that store them as they are ------------------
#
# `encode` writes a record's fields in one order: v, run, rank, seq, timestamp, event, then the rest. A line
# that starts so, for the (run, rank) followed and the seq expected, that ends with `}`, and holds no NUL
# and only UTF-8, is what `encode` wrote: it is stored as it is, without being parsed. Anything else is
# decoded and validated as usual (and, when it is a record, stored as `encode` writes it).

#: A top-level field after the head (never inside a string: `encode` writes a quote in a string as \").
_EVENT_KEY = b'","event":"'
#: The end record's event; without its closing quote, so that the search skips ahead on a rarer last byte
#: (a longer event name that starts so only sends its chunk down the decoding path).
_END_EVENT = b'"event":"end'


def raw_head(run: str, rank: int) -> bytes:
    """The first bytes of every record of (run, rank) as `encode` writes it, up to its seq's digits."""
    return b'{"v":%d,"run":%s,"rank":%d,"seq":' % (SCHEMA_VERSION, orjson.dumps(run), rank)


def raw_run_length(body: bytes, head: bytes, first: int) -> int:
    """n when `body` is n whole lines that are records seq first .. first+n-1 of `head`'s (run, rank) as
    `encode` writes them, none of them the `end` record; else 0 (then decode them). A few C passes over the
    bytes, no parse and no object per line: between two lines is always `}`, newline, the head (their
    count is n - 1); the first line has seq `first` and the last `first + n - 1` (the journal writes seq i
    as its line i, so the lines between hold the seqs between, and a line that is not a record, or a
    missing newline, breaks the count); each line has one non-empty event; the bytes hold no NUL and only
    UTF-8. A line garbled after its head and event, its closing brace intact, is not seen: it is stored."""
    n = body.count(b"}\n" + head) + 1
    last = body.rfind(b"\n", 0, -1) + 1  # where the last line starts
    if (len(body) > MAX_RECORD_BYTES or body[-2:] != b"}\n"
            or not body.startswith(b'%s%d,"timestamp":"' % (head, first))
            or not body.startswith(b'%s%d,"timestamp":"' % (head, first + n - 1), last)
            or body.count(_EVENT_KEY) != n or b'","event":""' in body or _END_EVENT in body or b"\0" in body):
        return 0
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            return 0
    return n


def decode(data: bytes | bytearray | memoryview | str) -> dict:
    """Decode and validate one record."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RecordError("not-json", str(e)) from None
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return validate(value, restore=may_hold_nonfinite(raw))


# -- frames ----------------------------------------------------------------------------------------------

def frames(event: str, data: bytes) -> list[bytes]:
    """The multipart message for one encoded record."""
    return [event.encode(), data]


def parse_frames(parts: list[bytes]) -> dict:
    """Check and decode `[event, record]`; the topic must match the record's event."""
    if len(parts) != 2:
        raise RecordError("frame-count", f"expected 2 frames [event, record], got {len(parts)}")
    record = decode(parts[1])
    if parts[0] != record["event"].encode():
        raise RecordError("topic-mismatch", f"topic {bytes(parts[0])[:40]!r} != event {record['event']!r}")
    return record


# -- why a run ended: the `reason` of the end record (and of run.json) -----------------------------------
#
# A dict with `text`, one line for a person, always; and by status:
#   stopped:     by: "ctl" (cmd, source, origin {user, host, pid}), "callback" (callback), or "rank" (another
#                rank's vote, agreed over the ranks)
#   interrupted: signal ("SIGINT", "SIGTERM")
#   failed:      exception {type, message, traceback: the last frames, each {file, line, function, code}}

#: frames of a failure's traceback kept in its reason (the innermost ones)
TRACEBACK_FRAMES = 8


def end_reason(text: str, **fields: Any) -> dict:
    return {"text": text, **{k: v for k, v in fields.items() if v is not None}}


def failure_reason(error: BaseException, frames: int = TRACEBACK_FRAMES) -> dict:
    """A failed run's reason: the exception's type, message and its innermost `frames` frames."""
    import traceback

    stack = traceback.extract_tb(error.__traceback__)[-frames:] if error.__traceback__ is not None else []
    message = str(error)[:2000]
    kind = type(error).__qualname__
    return end_reason(f"{kind}: {message}" if message else kind,
                      exception={"type": kind, "message": message,
                                 "traceback": [{"file": f.filename, "line": f.lineno, "function": f.name,
                                                "code": (f.line or "")[:200]} for f in stack]})


def describe_end(status: str | None, reason: Any) -> str:
    """"stopped: fg-bus ctl stop (alice@gpu1)" — a status and its reason's text, for a line or a cell."""
    status = status or "?"
    text = reason.get("text") if isinstance(reason, Mapping) else None
    return f"{status}: {text}" if isinstance(text, str) and text and text != status else status
