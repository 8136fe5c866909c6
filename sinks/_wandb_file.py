"""Reading back what wandb wrote: a run's `.wandb` files (its transaction log), record by record.

wandb 0.31 no longer ships a Python reader for them (`wandb.sdk.internal.datastore` is gone: wandb-core,
in Go, writes them), so this is the framing, as wandb-core writes it: a 7-byte header (`:W&B`, the magic
0xBEE1, version 0), then LevelDB-log chunks in 32 KiB blocks, each `crc32 (of type + data), length u16,
type u8` (full, first, middle, last), carrying one serialized `wandb.proto.wandb_internal_pb2.Record` each.
The records are decoded with wandb's own protobuf classes. A torn tail (a writer killed mid-chunk) ends the
scan.

An offline run resumed in a new process (`wandb.init(id=ID, resume="allow")`) starts a new run directory,
`offline-run-TIME-ID`, rather than appending to the old one; `wandb sync` uploads them one after another
into the same run. `segments()` lists them in that order.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def segments(wandb_dir: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of run `run_id` under `wandb_dir` (WANDB_DIR/wandb), oldest first."""
    files = [d / f"run-{run_id}.wandb" for d in wandb_dir.glob(f"*-run-*-{run_id}") if d.is_dir()]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.parent.name.split("-")[2])


def records(path: Path) -> Iterator[Any]:
    """The `Record` protobufs of one `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path} is not a .wandb file (header {data[:7]!r})")
    pos, pending = len(_HEADER), b""
    while pos + _CHUNK <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK:  # a block's last bytes, too short for a chunk header: padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK])
        chunk = data[pos + _CHUNK:pos + _CHUNK + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return  # zero padding, or a torn / garbled tail: what follows was never written whole
        pos += _CHUNK + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict]:
    """The history rows of one `.wandb` file, each a dict of its keys' JSON-decoded values (`_step`,
    `_timestamp`, ... included)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's config as one `.wandb` file sets it (its run record, then its config updates), without
    wandb's own `_wandb` entry."""
    out: dict = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        for item in updates:
            out[_key(item)] = json.loads(item.value_json)
    out.pop("_wandb", None)
    return out


def display_name(path: Path) -> str | None:
    """The run's name as one `.wandb` file's run record gives it."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run" and record.run.display_name:
            return record.run.display_name
    return None
