"""The wire format: schema v1 records, their encoding (non-finite floats, numpy, torch) and validation."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fg_bus import records
from fg_bus.records import EncodeError, RecordError, decode, encode, frames, parse_frames

TS = "2026-01-01T00:00:00+00:00"


def make_record(**overrides) -> dict:
    record = {"v": 1, "run": "run-20260101-000000-abcd", "rank": 0, "seq": 0, "timestamp": TS,
              "event": "on_log", "global_step": 10, "epoch": 0.5, "metrics": {"loss": 1.25}}
    record.update(overrides)
    return record


def same(a, b) -> bool:
    """Structural equality with NaN == NaN and exact types (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- round trip -------------------------------------------------------------------------------------------

def test_full_record_round_trip():
    record = make_record(
        seq=42, rank=3, global_step=1234, epoch=2.75,
        metrics={"loss": 0.125, "lr": 3e-4, "grad_norm": 1.5, "step_count": 7, "ok": True, "tag": "x",
                 "nested": {"a": [1, 2.5, "b"], "b": {"c": None}}},
        meta={"args": ["--lr", "0.1", 3], "description": "a test run", "world_size": 1,
              "versions": {"torch": "2.x"}},
        checkpoint="/tmp/ckpt-1234",
    )
    data = encode(record)
    assert isinstance(data, bytes)
    assert b"\n" not in data  # one record per journal line
    back = decode(data)
    assert same(back, record)
    # decoding accepts bytes-likes and str as well
    assert same(decode(bytearray(data)), record)
    assert same(decode(memoryview(data)), record)
    assert same(decode(data.decode()), record)


def test_datetime_timestamp_is_written_as_iso_8601():
    stamp = records.now()
    assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    back = decode(encode(make_record(timestamp=stamp)))
    assert back["timestamp"] == stamp.isoformat()
    assert datetime.fromisoformat(back["timestamp"]) == stamp
    fixed = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert decode(encode(make_record(timestamp=fixed)))["timestamp"] == TS


# -- non-finite floats ------------------------------------------------------------------------------------

def test_non_finite_metrics_top_level_round_trip_as_floats():
    record = make_record(metrics={"loss": math.nan, "grad_norm": math.inf, "margin": -math.inf, "lr": 0.1})
    data = encode(record)
    assert b'"loss":"NaN"' in data
    assert b'"grad_norm":"Infinity"' in data
    assert b'"margin":"-Infinity"' in data
    assert b"null" not in data  # plain orjson would have silently written null
    m = decode(data)["metrics"]
    assert isinstance(m["loss"], float) and math.isnan(m["loss"])
    assert m["grad_norm"] == math.inf and isinstance(m["grad_norm"], float)
    assert m["margin"] == -math.inf and isinstance(m["margin"], float)
    assert m["lr"] == 0.1


def test_non_finite_metrics_nested_round_trip_as_floats():
    record = make_record(metrics={"eval": {"loss": math.nan, "per_layer": [1.0, math.inf, -math.inf, math.nan]},
                                  "hist": [[math.nan], {"x": math.inf}]})
    data = encode(record)
    assert data.count(b'"NaN"') == 3
    assert data.count(b'"Infinity"') == 2
    assert data.count(b'"-Infinity"') == 1
    assert b"null" not in data
    m = decode(data)["metrics"]
    assert math.isnan(m["eval"]["loss"])
    per_layer = m["eval"]["per_layer"]
    assert per_layer[0] == 1.0 and per_layer[1] == math.inf and per_layer[2] == -math.inf
    assert math.isnan(per_layer[3])
    assert math.isnan(m["hist"][0][0]) and m["hist"][1]["x"] == math.inf
    assert same(decode(data), record)


@pytest.mark.parametrize("value, text", [(math.nan, b'"epoch":"NaN"'), (math.inf, b'"epoch":"Infinity"'),
                                         (-math.inf, b'"epoch":"-Infinity"')])
def test_non_finite_epoch(value, text):
    data = encode(make_record(epoch=value))
    assert text in data
    epoch = decode(data)["epoch"]
    assert isinstance(epoch, float)
    assert same(epoch, value)


def test_null_values_stay_null():
    record = make_record(metrics={"loss": None}, epoch=None)
    back = decode(encode(record))
    assert back["metrics"]["loss"] is None and back["epoch"] is None


def test_string_nan_outside_metrics_stays_a_string():
    for metrics in ({"loss": 1.0}, {"loss": math.nan}):  # fast path and the re-encoding slow path
        record = make_record(metrics=metrics, meta={"description": "NaN", "tags": ["Infinity", "-Infinity"]},
                             note="NaN")
        back = decode(encode(record))
        assert back["meta"]["description"] == "NaN"
        assert back["meta"]["tags"] == ["Infinity", "-Infinity"]
        assert back["note"] == "NaN"
        assert back["run"] == record["run"]


def test_null_inside_a_string_does_not_break_encoding():
    record = make_record(meta={"description": "null and void"}, metrics={"loss": 2.0})
    assert same(decode(encode(record)), record)


# -- numpy and torch --------------------------------------------------------------------------------------

def test_numpy_scalars_are_converted():
    record = make_record(metrics={"f32": np.float32(1.5), "f64": np.float64(0.25), "i64": np.int64(-7),
                                  "i32": np.int32(3), "flag": np.bool_(True), "off": np.bool_(False)},
                         global_step=np.int64(5), epoch=np.float32(0.5))
    back = decode(encode(record))
    m = back["metrics"]
    assert m["f32"] == 1.5 and type(m["f32"]) is float
    assert m["f64"] == 0.25 and type(m["f64"]) is float
    assert m["i64"] == -7 and type(m["i64"]) is int
    assert m["i32"] == 3 and type(m["i32"]) is int
    assert m["flag"] is True and m["off"] is False
    assert back["global_step"] == 5 and type(back["global_step"]) is int
    assert back["epoch"] == 0.5


def test_numpy_non_finite_scalars_and_arrays():
    record = make_record(metrics={"loss": np.float32("nan"), "big": np.float64("inf"),
                                  "arr": np.array([1.0, np.nan, -np.inf], dtype=np.float32),
                                  "ints": np.arange(3, dtype=np.int64),
                                  "mat": np.array([[1, 2], [3, 4]])},
                         epoch=np.float64("nan"))
    data = encode(record)
    assert b"null" not in data
    back = decode(data)
    m = back["metrics"]
    assert math.isnan(m["loss"]) and m["big"] == math.inf
    assert m["arr"][0] == 1.0 and math.isnan(m["arr"][1]) and m["arr"][2] == -math.inf
    assert m["ints"] == [0, 1, 2]
    assert m["mat"] == [[1, 2], [3, 4]]
    assert math.isnan(back["epoch"])


def test_numpy_array_finite_fast_path():
    back = decode(encode(make_record(metrics={"arr": np.array([0.5, 1.5]), "flags": np.array([True, False])})))
    assert back["metrics"] == {"arr": [0.5, 1.5], "flags": [True, False]}


def test_torch_zero_dim_tensors_are_converted():
    record = make_record(metrics={"loss": torch.tensor(0.5), "steps": torch.tensor(3), "ok": torch.tensor(True),
                                  "one": torch.tensor([2.0])},
                         epoch=torch.tensor(1.5, dtype=torch.float64))
    back = decode(encode(record))
    m = back["metrics"]
    assert m["loss"] == 0.5 and type(m["loss"]) is float
    assert m["steps"] == 3 and type(m["steps"]) is int
    assert m["ok"] is True
    assert m["one"] == 2.0
    assert back["epoch"] == 1.5


def test_torch_nan_and_inf_tensors_are_converted():
    record = make_record(metrics={"loss": torch.tensor(float("nan")), "norm": torch.tensor(float("-inf")),
                                  "nested": {"t": torch.tensor(float("inf"), dtype=torch.bfloat16)}})
    data = encode(record)
    assert b'"loss":"NaN"' in data and b'"norm":"-Infinity"' in data and b'"t":"Infinity"' in data
    m = decode(data)["metrics"]
    assert math.isnan(m["loss"]) and m["norm"] == -math.inf and m["nested"]["t"] == math.inf


# -- unencodable values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, path", [
    ({"metrics": {"loss": 1.0, "bad": object()}}, "metrics.bad"),
    ({"meta": {"args": ["a", 1, torch.ones(3)]}}, "meta.args[2]"),
    ({"metrics": {"deep": {"deeper": [0, {"x": {1, 2}}]}}}, "metrics.deep.deeper[1].x"),
    ({"metrics": {"nan_too": math.nan, "bad": object()}}, "metrics.bad"),  # slow path reached via null
])
def test_unencodable_value_names_its_key_path(overrides, path):
    with pytest.raises(EncodeError) as info:
        encode(make_record(**overrides))
    assert path in str(info.value)
    assert isinstance(info.value, TypeError)


def test_multi_element_tensor_is_refused():
    with pytest.raises(EncodeError, match=r"metrics\.weights"):
        encode(make_record(metrics={"weights": torch.ones(2, 2)}))


def test_non_string_key_is_refused():
    with pytest.raises(EncodeError) as info:
        encode(make_record(metrics={"ok": 1.0, 7: 2.0}))
    message = str(info.value)
    assert "metrics" in message and "7" in message


def test_integer_beyond_64_bits_raises_encode_error():
    """orjson cannot write integers beyond 64 bits; that must surface as EncodeError naming the key."""
    with pytest.raises(EncodeError, match=r"metrics\.huge"):
        encode(make_record(metrics={"huge": 2 ** 70}))


# -- decode rejects ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"not json", b'{"v":1,', b"\xff\xfe", b"{'v': 1}", b"[1, 2"])
def test_not_json(data):
    with pytest.raises(RecordError) as info:
        decode(data)
    assert info.value.reason == "not-json"
    assert str(info.value).startswith("not-json")


@pytest.mark.parametrize("data", [b"[1, 2]", b"42", b'"a string"', b"null", b"true"])
def test_not_an_object(data):
    with pytest.raises(RecordError) as info:
        decode(data)
    assert info.value.reason == "not-an-object"


def test_missing_fields_are_named():
    record = make_record()
    del record["seq"], record["event"]
    with pytest.raises(RecordError) as info:
        decode(orjson.dumps(record))
    assert info.value.reason == "missing-field"
    assert "seq" in str(info.value) and "event" in str(info.value)
    assert "rank" not in str(info.value)
    with pytest.raises(RecordError) as info:
        decode(b"{}")
    assert info.value.reason == "missing-field"
    for name in records.REQUIRED_FIELDS:
        assert name in str(info.value)


@pytest.mark.parametrize("version", [2, "1", 0, 1.5, True, None])
def test_unknown_version(version):
    with pytest.raises(RecordError) as info:
        decode(orjson.dumps(make_record(v=version)))
    assert info.value.reason == "unknown-version"


@pytest.mark.parametrize("overrides", [
    {"seq": -1}, {"seq": True}, {"seq": 1.0}, {"seq": "3"},
    {"rank": -2}, {"rank": False}, {"rank": None},
    {"metrics": [1, 2]}, {"metrics": "loss=1"}, {"metrics": 3.5},
    {"event": ""}, {"event": 5}, {"run": 12},
])
def test_bad_field(overrides):
    with pytest.raises(RecordError) as info:
        decode(orjson.dumps(make_record(**overrides)))
    assert info.value.reason == "bad-field"


def test_record_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode(b"nope")


# -- frames -----------------------------------------------------------------------------------------------

def test_frames_round_trip():
    data = encode(make_record(event="on_step_end", metrics={"loss": math.nan}))
    parts = frames("on_step_end", data)
    assert parts == [b"on_step_end", data]
    back = parse_frames(parts)
    assert back["event"] == "on_step_end" and math.isnan(back["metrics"]["loss"])


@pytest.mark.parametrize("count", [0, 1, 3])
def test_parse_frames_rejects_wrong_frame_count(count):
    data = encode(make_record())
    parts = [b"on_log", data, b"extra"][:count]
    with pytest.raises(RecordError) as info:
        parse_frames(parts)
    assert info.value.reason == "frame-count"


def test_parse_frames_rejects_topic_mismatch():
    data = encode(make_record(event="on_log"))
    for topic in (b"on_step_end", b"on_lo", b"on_log_extra", b""):
        with pytest.raises(RecordError) as info:
            parse_frames([topic, data])
        assert info.value.reason == "topic-mismatch"


def test_parse_frames_passes_decode_errors_through():
    with pytest.raises(RecordError) as info:
        parse_frames([b"on_log", b"garbage"])
    assert info.value.reason == "not-json"


# -- properties -------------------------------------------------------------------------------------------

_SPECIAL = {"NaN", "Infinity", "-Infinity"}  # strings that mean non-finite floats inside metrics
json_leaves = (st.floats(allow_nan=True, allow_infinity=True)
               | st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
               | st.booleans() | st.none()
               | st.text(max_size=20).filter(lambda s: s not in _SPECIAL))
json_values = st.recursive(json_leaves,
                           lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=8), children, max_size=5),
                           max_leaves=25)
metrics_dicts = st.dictionaries(st.text(max_size=12), json_values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics=metrics_dicts, epoch=st.floats(allow_nan=True, allow_infinity=True) | st.none())
def test_property_metrics_round_trip(metrics, epoch):
    record = make_record(metrics=metrics, epoch=epoch)
    data = encode(record)
    back = decode(data)
    assert same(back["metrics"], metrics)
    assert same(back["epoch"], epoch)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_property_random_bytes_decode_or_record_error(data):
    try:
        result = decode(data)
    except RecordError as e:
        assert e.reason in {"not-json", "not-an-object", "missing-field", "unknown-version", "bad-field"}
    else:
        assert isinstance(result, dict)


_field_values = st.one_of(json_leaves, st.lists(json_leaves, max_size=3),
                          st.dictionaries(st.text(max_size=5), json_leaves, max_size=3))


@settings(max_examples=500, deadline=None)
@given(fields=st.fixed_dictionaries({}, optional={name: _field_values for name in (
    "v", "run", "rank", "seq", "timestamp", "event", "metrics", "epoch")}),
    fix_version=st.booleans())
def test_property_structured_junk_decode_or_record_error(fields, fix_version):
    """Objects that look like records, with fields of any type, never break decode."""
    if fix_version:
        fields["v"] = 1
    try:
        result = decode(orjson.dumps(fields))
    except RecordError as e:
        assert e.reason in {"missing-field", "unknown-version", "bad-field"}
    else:
        assert result["v"] == 1 and isinstance(result["seq"], int) and result["seq"] >= 0
        assert isinstance(result["rank"], int) and result["rank"] >= 0
        assert isinstance(result["event"], str) and result["event"]
