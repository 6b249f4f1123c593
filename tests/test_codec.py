"""Table-driven tests for gateway.codec: decoding, seed 002 normalization, timestamps and measurements."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from gateway import codec
from gateway.errors import PayloadError

T0 = 1704067200.0  # 2024-01-01T00:00:00Z


# --- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b'{"battery": 87, "ok": true}', {"battery": 87, "ok": True}),
        (b'  \n{"a": [1, 2.5, null]}\r\n', {"a": [1, 2.5, None]}),
        (b"[1, 2]", [1, 2]),
        (b"42", 42),
        (b"-3.5", -3.5),
        (b"true", True),
        (b"null", None),
        (b'"quoted"', "quoted"),
        # plain text that is not JSON stays text, unstripped (availability payloads)
        (b"online", "online"),
        (b"offline", "offline"),
        (b"  ", "  "),
        (b"hello world", "hello world"),
        ("caf\u00e9".encode(), "caf\u00e9"),
    ],
)
def test_decode_json_and_text(data: bytes, expected: Any) -> None:
    result = codec.decode(data)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value",),
    [
        ({"temp": 21.5, "ids": [1, 2], "name": "x", "none": None},),
        ([1, "two", 3.0],),
        (7,),
        ("online",),
    ],
)
def test_decode_msgpack(value: Any) -> None:
    assert codec.decode(msgpack.packb(value), msgpack_payload=True) == value


def test_decode_msgpack_keeps_bytes_and_integer_keys_for_normalize() -> None:
    data = msgpack.packb({1: b"\x01\xff", "heapFreeKb": 5})
    decoded = codec.decode(data, msgpack_payload=True)
    assert decoded == {1: b"\x01\xff", "heapFreeKb": 5}
    assert codec.normalize(decoded) == {"1": "01ff", "heap_free_kb": 5}


def test_decode_empty_msgpack_is_none() -> None:
    assert codec.decode(b"", msgpack_payload=True) is None


@pytest.mark.parametrize(
    ("data", "as_msgpack", "reason"),
    [
        (b"{bad", False, "bad_json"),
        (b"[1,", False, "bad_json"),
        (b'{"a": 1,}', False, "bad_json"),
        (b"{'a': 1}", False, "bad_json"),
        (b"  {", False, "bad_json"),
        (b"[" * 100_000, False, "bad_json"),  # recursion, not a crash
        (b"\xff\xfe", False, "not_utf8"),
        (b"caf\xe9", False, "not_utf8"),
        (msgpack.packb({"a": 1}), False, "not_utf8"),  # msgpack without the `.mp` flag
        (b"\xc1", True, "bad_msgpack"),  # a reserved type byte
        (b"\x92\x01", True, "bad_msgpack"),  # truncated array
        (b"\x01\x02", True, "bad_msgpack"),  # trailing data
        (b"\xa2\xff\xfe", True, "bad_msgpack"),  # str that is not UTF-8
        (b"\x91" * 5000 + b"\x00", True, "bad_msgpack"),  # nesting too deep
    ],
)
def test_decode_rejects_with_a_reason(data: bytes, as_msgpack: bool, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        codec.decode(data, msgpack_payload=as_msgpack)
    assert info.value.reason == reason


@pytest.mark.parametrize("data", [b"\x81\x90\x01", b"\x81\x80\x01"], ids=["array-key", "map-key"])
def test_decode_msgpack_unhashable_key_is_a_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        codec.decode(data, msgpack_payload=True)
    assert info.value.reason == "bad_msgpack"


# --- normalize (seed 002) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # empty strings -> None
        ("", None),
        ("   ", None),
        ("\t\n", None),
        # numeric strings -> numbers (int stays int)
        ("42", 42),
        ("-7", -7),
        ("+5", 5),
        (" 42 ", 42),
        ("-3.5", -3.5),
        ("5.", 5.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("2.5E-2", 0.025),
        # strings that are not plain decimal numbers stay text
        ("abc", "abc"),
        ("1.2.3", "1.2.3"),
        ("0x10", "0x10"),
        ("1_000", "1_000"),
        ("12abc", "12abc"),
        ("online", "online"),
        # invalid numbers -> None
        (float("nan"), None),
        (float("inf"), None),
        (float("-inf"), None),
        # everything else unchanged; bytes become hex
        (21.5, 21.5),
        (0, 0),
        (True, True),
        (False, False),
        (None, None),
        (b"\x00\xab", "00ab"),
    ],
    ids=repr,
)
def test_normalize_scalars(value: Any, expected: Any) -> None:
    result = codec.normalize(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("value", ["1e400", "-1e999"])
def test_normalize_overflowing_numeric_string_is_none(value: str) -> None:
    assert codec.to_number(value) is None
    assert codec.normalize(value) is None


def test_normalize_nested_payload() -> None:
    payload = {
        "batteryLevel": "87",
        "signalStrength": "",
        "firmwareVersion": "1.2.3",
        "memory": {"heapFreeKb": "123", "heapMinFreeKb": 45},
        "readings": [{"tempC": "21.5"}, {"tempC": float("nan")}, ""],
        "already_snake": "x",
    }
    assert codec.normalize(payload) == {
        "battery_level": 87,
        "signal_strength": None,
        "firmware_version": "1.2.3",
        "memory": {"heap_free_kb": 123, "heap_min_free_kb": 45},
        "readings": [{"temp_c": 21.5}, {"temp_c": None}, None],
        "already_snake": "x",
    }


def test_normalize_bounds_depth_instead_of_recursing_forever() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = {"k": deep}
    result = codec.normalize(deep)
    levels = 0
    while isinstance(result, dict):
        result = result["k"]
        levels += 1
    assert result is None
    assert 30 <= levels <= 40


def test_decode_then_normalize_json_nan_and_infinity() -> None:
    # Python's json accepts the NaN/Infinity literals that some firmware emits; they must not survive
    assert codec.normalize(codec.decode(b'{"t": NaN, "u": -Infinity, "v": 1e400}')) == {
        "t": None,
        "u": None,
        "v": None,
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("heapFreeKb", "heap_free_kb"),
        ("heapMinFreeKb", "heap_min_free_kb"),
        ("batteryLevel", "battery_level"),
        ("deviceID", "device_id"),
        ("signalRSSI", "signal_rssi"),
        ("HTTPResponse", "http_response"),
        ("getHTTPResponseCode", "get_http_response_code"),
        ("firmwareVersion2", "firmware_version2"),
        ("Temperature", "temperature"),
        ("RSSI", "rssi"),
        ("kebab-case", "kebab_case"),
        ("already_snake", "already_snake"),
        ("sequence_id", "sequence_id"),
        ("x", "x"),
        ("", ""),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    assert codec.snake_case(name) == expected
    assert codec.snake_case(expected) == expected  # idempotent


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (True, 1),
        (False, 0),
        (2.5, 2.5),
        ("12", 12),
        ("-0.5", -0.5),
        (" 3 ", 3),
        (float("nan"), None),
        (float("inf"), None),
        ("nan", None),
        ("", None),
        ("abc", None),
        (None, None),
        ([1], None),
        ({"a": 1}, None),
    ],
    ids=repr,
)
def test_to_number(value: Any, expected: Any) -> None:
    result = codec.to_number(value)
    assert result == expected
    assert type(result) is type(expected)


# --- parse_time -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-01T00:00:00Z", T0),
        ("2024-01-01T00:00:00+00:00", T0),
        ("2024-01-01T02:00:00+02:00", T0),
        ("2023-12-31T19:00:00-05:00", T0),
        ("2024-01-01T00:00:00", T0),  # naive: taken as UTC, not local time
        ("2024-01-01T00:00:00.250Z", T0 + 0.25),
        ("2024-01-01 00:00:00Z", T0),
        (int(T0), T0),  # seconds
        (T0 + 0.5, T0 + 0.5),
        (int(T0) * 1000, T0),  # milliseconds
        (int(T0) * 1000 + 250, T0 + 0.25),
        (1.0, 1.0),
    ],
    ids=repr,
)
def test_parse_time(value: Any, expected: float) -> None:
    result = codec.parse_time(value)
    assert isinstance(result, float)
    assert result == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        -T0,
        float("nan"),
        float("inf"),
        "",
        "garbage",
        "2024-13-01T00:00:00Z",
        "yesterday",
        [T0],
        {"t": T0},
    ],
    ids=repr,
)
def test_parse_time_unusable_is_none(value: Any) -> None:
    assert codec.parse_time(value) is None


# --- extract_metrics ------------------------------------------------------------------------------


Metrics = list[tuple[str, float | None]]


@pytest.mark.parametrize(
    ("action", "payload", "metrics", "ts"),
    [
        # {value, time}: one metric named after the action
        ("temperature", {"value": 21.5, "time": T0}, [("temperature", 21.5)], T0),
        ("temperature", {"value": 21, "unit": "C", "device_id": "s1"}, [("temperature", 21.0)], None),
        ("temperature", {"value": 21, "ts": int(T0) * 1000}, [("temperature", 21.0)], T0),
        ("temperature", {"value": 21, "timestamp": "2024-01-01T00:00:00Z"}, [("temperature", 21.0)], T0),
        ("temperature", {"value": None}, [("temperature", None)], None),
        # an object of metrics, nested objects flatten to dotted names
        (
            "telemetry",
            {"temperature": 21.5, "humidity": 40, "time": T0},
            [("temperature", 21.5), ("humidity", 40.0)],
            T0,
        ),
        (
            "telemetry",
            {"env": {"temp": 1, "hum": {"rel": 2}}, "rssi": -60},
            [("env.temp", 1.0), ("env.hum.rel", 2.0), ("rssi", -60.0)],
            None,
        ),
        # "value" plus other metrics is an ordinary object of metrics
        ("telemetry", {"value": 1, "extra": 2}, [("value", 1.0), ("extra", 2.0)], None),
        # non-numeric strings and lists are not measurements; null is an invalid measurement
        ("telemetry", {"temp": 21, "state": "ok", "tags": ["a", 1], "note": "1.2.3"}, [("temp", 21.0)], None),
        ("telemetry", {"battery": None, "temp": 20}, [("battery", None), ("temp", 20.0)], None),
        ("telemetry", {"door_open": True, "alarm": False}, [("door_open", 1.0), ("alarm", 0.0)], None),
        ("telemetry", {"temp": float("nan")}, [("temp", None)], None),
        # identity and time keys at the top level are not metrics
        (
            "telemetry",
            {"device_id": "s1", "sequence_id": 7, "time": T0, "ts": T0, "timestamp": T0, "temp": 1},
            [("temp", 1.0)],
            T0,
        ),
        ("telemetry", {}, [], None),
        # a bare number
        ("temperature", 42, [("temperature", 42.0)], None),
        ("temperature", -0.5, [("temperature", -0.5)], None),
        ("temperature", "42", [("temperature", 42.0)], None),
        # nothing measurable
        ("temperature", None, [], None),
        ("temperature", "online", [], None),
        ("temperature", [1, 2], [], None),
        ("temperature", float("nan"), [], None),
    ],
    ids=lambda v: repr(v)[:50],
)
def test_extract_metrics(action: str, payload: Any, metrics: Metrics, ts: float | None) -> None:
    got, got_ts = codec.extract_metrics(action, payload)
    assert got == metrics
    assert all(v is None or type(v) is float for _, v in got)
    assert got_ts == (None if ts is None else pytest.approx(ts))


def test_extract_metrics_after_decode_and_normalize() -> None:
    raw = b'{"deviceId": "s1", "heapFreeKb": "123", "rssi": "", "tempC": "21.5", "time": "2024-01-01T00:00Z"}'
    metrics, ts = codec.extract_metrics("telemetry", codec.normalize(codec.decode(raw)))
    assert metrics == [("heap_free_kb", 123.0), ("rssi", None), ("temp_c", 21.5)]
    assert ts == T0


def test_extract_metrics_bounds_nesting() -> None:
    deep: Any = 1.0
    for _ in range(50):
        deep = {"k": deep}
    metrics, _ = codec.extract_metrics("telemetry", {"shallow": 2, "deep": deep})
    assert metrics == [("shallow", 2.0)]
