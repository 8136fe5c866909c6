"""fg_bus: the wire between a training process and its sinks.

Records (schema v1, orjson) go from a `Publisher` (one per rank, owned by a bus thread: journal, PUB
fan-out, ROUTER replay, PULL inbox, heartbeats) to any number of `Subscriber`s, live or late, with gaps
repaired from the journal. This package imports neither `trainer` nor `sinks`, and not torch.
"""

from .journal import read_journal
from .publisher import CONTROL_COMMANDS, Publisher
from .records import SCHEMA_VERSION, EncodeError, RecordError, decode, encode
from .registry import RunInfo, RunNotFound, list_runs, resolve
from .subscriber import Subscriber

__version__ = "0.1.0"

__all__ = [
    "CONTROL_COMMANDS",
    "EncodeError",
    "Publisher",
    "RecordError",
    "RunInfo",
    "RunNotFound",
    "SCHEMA_VERSION",
    "Subscriber",
    "decode",
    "encode",
    "list_runs",
    "read_journal",
    "resolve",
]
