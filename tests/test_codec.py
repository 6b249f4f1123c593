"""Table-driven tests for gateway.codec: decoding, seed 002 normalization, timestamps and measurements."""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
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


# --- the fast paths agree with the plain reading ----------------------------------------------------------------
# decode, normalize and extract_metrics have fast paths for the common telemetry shapes (a flat JSON object of
# numbers); these are the straightforward versions they replaced, and every input must give the same result,
# the same error reason, or the same exception. One fix since: an int too large for a float is an invalid number
# (None), where float() raised OverflowError into ingest; and JSON with an int of more digits than Python reads
# is bad JSON (ValueError was not caught).


def _reference_decode(data: bytes, msgpack_payload: bool = False) -> Any:
    if not data:
        return None
    if msgpack_payload:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise PayloadError("bad_msgpack", str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("not_utf8", "payload is not UTF-8 text") from None
    stripped = text.strip().lstrip("\ufeff")
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise PayloadError("bad_json", f"payload is not valid JSON: {exc}") from None
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return text


def _finite(number: float | None) -> float | None:
    try:
        return None if number is None or not math.isfinite(float(number)) else float(number)
    except OverflowError:
        return None


def _reference_normalize(value: Any, depth: int = 0, key: str = "") -> Any:
    if depth > 32:
        return None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = codec.snake_case(str(k))
            out[name] = _reference_normalize(v, depth + 1, name)
        return out
    if isinstance(value, list):
        return [_reference_normalize(v, depth + 1, key) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if key and re.fullmatch(r"(.*_)?(version|id|serial|mac|sku|code)$", key):
            return value
        if text.lower() in {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}:
            return None
        if re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
            return codec.to_number(text)
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _reference_flatten(prefix: str, value: Any, out: list[tuple[str, float | None]], depth: int) -> None:
    if depth > 8:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            if depth == 0 and key in {"device_id", "sequence_id", "time", "timestamp", "ts"}:
                continue
            _reference_flatten(f"{prefix}.{key}" if prefix else str(key), inner, out, depth + 1)
        return
    if isinstance(value, list | str) or value is None:
        if value is None and prefix:
            out.append((prefix, None))
        return
    out.append((prefix, _finite(codec.to_number(value))))


def _reference_extract_metrics(action: str, payload: Any) -> tuple[list[tuple[str, float | None]], float | None]:
    time_keys = ("time", "timestamp", "ts")
    if isinstance(payload, dict):
        ts = next((codec.parse_time(payload[k]) for k in time_keys if k in payload), None)
        if "value" in payload and set(payload) <= {"value", *time_keys, "unit", "device_id"}:
            return [(action, _finite(codec.to_number(payload["value"])))], ts
        out: list[tuple[str, float | None]] = []
        _reference_flatten("", payload, out, 0)
        return out, ts
    number = codec.to_number(payload)
    if number is not None:
        return [(action, _finite(number))], None
    return [], None


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """A result as comparable data: values with their exact types (NaN included), or the error and its reason."""
    try:
        return "ok", _typed(fn(*args))
    except PayloadError as exc:
        return "payload_error", exc.reason
    except Exception as exc:
        return "raises", type(exc)


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", [(_typed(k), _typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))  # nan == nan, and -0.0 is not 0.0
    return (type(value).__name__, value)


_PAYLOADS = [
    b"",
    b'{"temperature": 21.53, "humidity": 40.1}    ',
    b'{"temperature": 21.53, "humidity": 40.1}\t\r\n',
    b'{"temperature": "21.53", "humidity": "", "heapFreeKb": 12, "fwVersion": "1.10", "serial": "007"}',
    b'{"a":1,"b":2,"a":3}',
    b'{"a": 1, "A": 2}',
    b'{"a": 123456789012345678901234567890, "b": -18446744073709551616, "c": 18446744073709551615}',
    b'{"a": -0, "b": -0.0, "c": 1E5, "d": 1e-400, "e": 2.2250738585072011e-308, "f": 9007199254740993}',
    b'{"a": 1e400}',
    b'{"a": -1e400}',
    b'{"a": 1.7976931348623159e308}',
    b'{"a": NaN, "b": Infinity, "c": -Infinity}',
    b"[NaN]",
    b'{"a": "\\ud800"}',
    b'{"a": "\\udc00\\ud800"}',
    b'{"a": "\\ud83d\\ude00", "\\u0061": "\\u0000\\/"}',
    b'{"a": "x\x01"}',
    b'{"a": "\t"}',
    b'{"a": "x\x7f"}',
    b'{"a": "\xff"}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xc0\x80"}',
    b'{"a": "\xf4\x90\x80\x80"}',
    '{"caf\u00e9": "\u00e9t\u00e9"}'.encode(),
    b'{"a": 01}',
    b'{"a": 1.}',
    b'{"a": .5}',
    b"[1,]",
    b'{"a":1,}',
    b'{"a":1}\x0b',
    '{"a":1}\x0c\x1c\x1d\x1e\x1f\x85'.encode(),
    '{"a":1}\u00a0\u2028\u3000'.encode(),
    '{"a":1}\ufeff'.encode(),
    b'\xef\xbb\xbf{"a":1}',
    b'\xef\xbb\xbf\xef\xbb\xbf{"a":1}',
    '\ufeff {"a":1}'.encode(),
    ' \ufeff{"a":1}'.encode(),
    b'{"a": 1}{}',
    b'{"a": 1}\x00',
    b'\x00{"a": 1}',
    b'{"a": True}',
    b'{"a": true, "b": false, "c": null, "d": [], "e": {}}',
    b'{"a": ' + b"1" * 4300 + b"}",
    b'{"a": ' + b"1" * 4301 + b"}",
    b'{"a": ' + b"1" * 400 + b".5}",
    b"[" * 100_000,
    b"[" * 990 + b"]" * 990,
    b"[" * 995 + b"]" * 995,
    b"[" * 2000 + b"]" * 2000,
    b'{"a":' * 600 + b"1" + b"}" * 600,
    b"[1, 2.5, null]",
    b"[1E+05, 1e-05, 0e0, -0E-0, 1.0e+1, 0.1e1, 100000000000000000000.0]",
    b"[+1]",
    b"[-]",
    b"[1e]",
    b"[0x10]",
    b'{"a" : 1 , "b":[ ] ,"c" :{ } }',
    b'{"a": "\\x"}',
    b'{"a": "\\u12"}',
    b'{"a": "\\U0041"}',
    b"42",
    b"-3.5",
    b"true",
    b'"quoted"',
    b"online",
    b"  ",
    b"NaN",
    b"1e400",
    b"{bad",
    b"  {",
    b"{'a': 1}",
    b"\xff\xfe",
    b'{"time": 1767322000, "value": "5", "unit": "C"}',
    b'{"ts": "2026-01-02T03:04:05Z", "t": 1, "device_id": "x", "sequence_id": 3}',
    b'{"deviceId": "s1", "heapFreeKb": "123", "rssi": "", "tempC": "21.5", "time": "2024-01-01T00:00Z"}',
    b'{"env": {"tempC": 1, "hum": {"rel": "2"}}, "tags": ["1", 2, {"x": "3"}], "on": true, "n": null}',
    b'{"": 1, "t": {"": 2}, "a-b": 3, "HTTPCode": "4", "x_id": "5", "mac": " 6 "}',
    b'{"big": 123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890'
    + b"1" * 300
    + b"}",
    b'{"b": ' + b"9" * 309 + b"}",
    b'{"value": null}',
    b'{"value": [1]}',
    b'{"value": {"a": 1}, "time": 5}',
]


def _fuzz(rng: random.Random) -> bytes:
    """JSON-ish bytes: valid objects of metrics, then some of them mangled."""
    keys = ["t", "temp", "tempC", "heapFreeKb", "x_id", "time", "ts", "value", "unit", "a-b", "", "\u00e9", "device_id"]
    scalars = [
        lambda: rng.uniform(-1e6, 1e6),
        lambda: rng.randint(-(10**30), 10**30),
        lambda: rng.choice([0, -0.0, 1e-320, 1e308, True, False, None]),
        lambda: rng.choice(["", " 1 ", "1.5e3", "nan", "Infinity", "abc", "007", "\u00e9", "1e999"]),
        lambda: rng.randint(1_577_836_800, 1_800_000_000) * rng.choice([1, 1000]),
    ]

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth < 4 and roll < 0.1:
            return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if depth < 4 and roll < 0.15:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return rng.choice(scalars)()

    doc = {rng.choice(keys): value(1) for _ in range(rng.randint(0, 6))}
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
    data = bytearray(text.encode())
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        at = rng.randrange(len(data) + 1)
        mangle = rng.random()
        if mangle < 0.3 and data:
            del data[min(at, len(data) - 1)]
        elif mangle < 0.6:
            data[at:at] = bytes([rng.randrange(256)])
        else:
            data[at:at] = rng.choice([b"NaN", b"\\u", b'"', b",", b"}", b"]", b" ", b"\xc3", b"\t", b"-", b"e9"])
    return bytes(data)


def _agree(data: bytes, msgpack_payload: bool = False) -> None:
    expected = _outcome(_reference_decode, data, msgpack_payload)
    assert _outcome(codec.decode, data, msgpack_payload) == expected, data[:200]
    if expected[0] != "ok":
        return
    value = _reference_decode(data, msgpack_payload)
    normal = _outcome(_reference_normalize, value)
    assert _outcome(codec.normalize, value) == normal, data[:200]
    for action in ("telemetry", "env.temp"):
        for payload in (value, _reference_normalize(value)):
            want = _outcome(_reference_extract_metrics, action, payload)
            assert _outcome(codec.extract_metrics, action, payload) == want, data[:200]


@pytest.mark.parametrize("data", _PAYLOADS, ids=lambda v: repr(v)[:40])
def test_fast_paths_agree_with_the_reference_on_edge_cases(data: bytes) -> None:
    _agree(data)


def test_fast_paths_agree_with_the_reference_on_random_payloads() -> None:
    rng = random.Random(2024)
    for _ in range(20_000):
        _agree(_fuzz(rng))


def test_fast_paths_agree_with_the_reference_on_msgpack_and_python_values() -> None:
    rng = random.Random(7)
    values: list[Any] = [
        {1: b"\x01", "heapFreeKb": 5, 2.5: float("nan"), None: "x", b"k": [b"a"]},
        {"a": float("inf"), "b": -0.0, "c": 2**70, "d": "1e999", "e": {"fC": {"g": " 1 "}}},
        {"time": 1767322000, "value": b"\x00"},
        {"tuple": (1, 2)},
    ]
    deep: Any = 1.5
    for _ in range(40):
        deep = {"kK": deep, "n": 2}
        values.append(deep)
    for value in values:
        if "c" not in value:  # 2**70 does not fit msgpack
            _agree(msgpack.packb(value), msgpack_payload=True)
        normal = _outcome(_reference_normalize, value)
        assert _outcome(codec.normalize, value) == normal
        for payload in (value, _reference_normalize(value)):
            want = _outcome(_reference_extract_metrics, "telemetry", payload)
            assert _outcome(codec.extract_metrics, "telemetry", payload) == want
    for _ in range(3000):
        try:
            value = json.loads(_fuzz(rng))
        except ValueError:
            continue
        with contextlib.suppress(OverflowError):
            _agree(msgpack.packb(value), msgpack_payload=True)


def test_decode_nesting_near_the_recursion_limit_is_refused_as_before() -> None:
    """Python's json gives up at the interpreter's recursion limit (less the frames already in use): the same
    payloads are refused, whatever the decoder."""
    for depth in [*range(850, 1000), 1500]:
        for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            assert _outcome(codec.decode, data) == _outcome(_reference_decode, data), depth


def test_numbers_too_large_for_python_are_refused_or_invalid_never_raised() -> None:
    """A payload must never raise out of the codec (ingest promises nothing raises into the broker): an integer
    of more digits than Python converts is bad JSON, a numeric string of them is an invalid number (None), and
    an integer too large for a float is an invalid measurement."""
    digits = "9" * 5000
    with pytest.raises(PayloadError) as refused:
        codec.decode(('{"temperature": ' + digits + "}").encode())
    assert refused.value.reason == "bad_json"
    assert codec.decode(digits.encode()) == digits  # plain text, not a number
    assert codec.normalize({"temperature": digits}) == {"temperature": None}
    huge = 10**400
    assert codec.extract_metrics("telemetry", {"t": huge, "h": 40}) == ([("t", None), ("h", 40.0)], None)
    assert codec.extract_metrics("telemetry", {"value": huge}) == ([("telemetry", None)], None)
    assert codec.extract_metrics("telemetry", {"a": {"b": huge}}) == ([("a.b", None)], None)
    assert codec.extract_metrics("telemetry", huge) == ([("telemetry", None)], None)
    assert codec.parse_time(huge) is None
    assert codec.extract_metrics("telemetry", {"v": 1, "ts": huge}) == ([("v", 1.0)], None)


# --- flat_metrics: the telemetry fast path ----------------------------------------------------------

_FLAT_KEYS = [
    "temperature", "humidity", "heapFreeKb", "Temperature", "heap-free", "value", "unit", "time", "ts",
    "timestamp", "device_id", "sequence_id", "battery_pct", "rssi", "fw_version", "a.b", "", "x1", "ünits",
]  # fmt: skip
_FLAT_VALUES: list[Any] = [
    21.5, -0.0, 1e300, float("nan"), float("inf"), -float("inf"), 3, True, None, "22.5", "", [1.0], {"x": 1.0},
    1.5e-300, 0.1,
]  # fmt: skip


def test_flat_metrics_is_extract_metrics_of_normalize_whenever_it_answers() -> None:
    """The fast path must give exactly what the general one gives (names, values, order, no device time), and
    it must answer for the usual telemetry; everything else is left to the general path (None)."""
    rng = random.Random(11)
    answered = 0
    for _ in range(20_000):
        keys = rng.sample(_FLAT_KEYS, rng.randint(0, 4))
        common = rng.random() < 0.5  # half of them the usual shape: finite floats under plain keys
        payload = {
            key: (rng.choice([21.5, -3.25, 0.0, 1e300, 0.1]) if common else rng.choice(_FLAT_VALUES)) for key in keys
        }
        fast = codec.flat_metrics(payload)
        if fast is None:
            continue
        answered += 1
        metrics, ts = codec.extract_metrics("telemetry", codec.normalize(payload))
        assert ts is None, payload
        assert fast == metrics, payload
        assert all(type(v) is float for _, v in fast)
    assert answered > 2_000
    assert codec.flat_metrics(codec.decode(b'{"temperature": 21.5, "humidity": 45.2}', False)) == [
        ("temperature", 21.5),
        ("humidity", 45.2),
    ]
    for other in ({}, [], 21.5, "21.5", None, {"heapFreeKb": 1.0}, {"value": 1.0}, {"t": 1.0, "ts": 2.0}):
        assert codec.flat_metrics(other) is None, other
