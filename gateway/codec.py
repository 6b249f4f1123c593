"""Pure payload handling: decode JSON or msgpack, normalize (seed 002), extract measurements."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import msgpack
import msgspec

from gateway.errors import PayloadError

__all__ = ["decode", "extract_metrics", "flat_metrics", "normalize", "parse_time", "snake_case", "to_number"]

_CAMEL_1 = re.compile(r"(.)([A-Z][a-z]+)")
_CAMEL_2 = re.compile(r"([a-z0-9])([A-Z])")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")
_NOT_A_NUMBER = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
# identifiers that look like numbers stay text: firmware "1.10" is not 1.1, serial "007" is not 7
_KEEP_TEXT = re.compile(r"(.*_)?(version|id|serial|mac|sku|code)$")


_SNAKE: dict[str, str] = {}


def snake_case(name: str) -> str:
    """heapFreeKb -> heap_free_kb; already snake keys are unchanged. Cached: devices send the same keys."""
    done = _SNAKE.get(name)
    if done is None:
        done = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", name)).replace("-", "_").lower()
        if len(_SNAKE) >= 4096:
            _SNAKE.clear()
        _SNAKE[name] = done
    return done


# A JSON object or array is first read by msgspec (several times faster than json.loads for telemetry). What it
# accepts, Python's json reads the same way (same values and types, duplicate keys: the last wins, big integers
# exact, UTF-8 checked); everything it refuses (NaN and Infinity literals, 1e400, lone surrogates, a BOM, Unicode
# spaces around the document, errors) goes the json.loads way below, which decides as it always did.
# Python's json gives up nesting at the recursion limit a few levels before msgspec does: payloads that could be
# nested that deep skip msgspec.
_FAST_JSON = msgspec.json.Decoder().decode
_OPENERS = (0x7B, 0x5B)  # `{` `[`
_SHALLOW_BYTES = 400  # a complete document this short nests at most 200 deep
_SHALLOW_OPENERS = 200


def decode(data: bytes, msgpack_payload: bool = False) -> Any:
    """Bytes to a Python value. Empty payload is None; plain text that is not JSON stays a string.

    Raises PayloadError(reason) for bytes that are not UTF-8 or msgpack that cannot be unpacked.
    """
    if not data:
        return None
    if msgpack_payload:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            # TypeError: a map key that is itself a map or an array (unhashable)
            raise PayloadError("bad_msgpack", str(exc)) from None
    if data[0] in _OPENERS and (len(data) <= _SHALLOW_BYTES or data.count(b"{") + data.count(b"[") < _SHALLOW_OPENERS):
        try:
            return _FAST_JSON(data)
        except Exception:
            pass  # decided below, exactly as before
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("not_utf8", "payload is not UTF-8 text") from None
    stripped = text.strip().lstrip("\ufeff")
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an int of too many digits
            raise PayloadError("bad_json", f"payload is not valid JSON: {exc}") from None
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return text


# Python refuses to turn more digits than this into an int (sys.get_int_max_str_digits): such a "number" is not one
_MAX_INT_DIGITS = 4300


def as_float(number: float | None) -> float | None:
    """A finite float, or None (an int too large for a float is an invalid number, not a crash)."""
    if number is None:
        return None
    try:
        result = float(number)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def to_number(value: Any) -> int | float | None:
    """A number from a number or numeric string; NaN, infinities and anything else are None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text) and len(text) <= _MAX_INT_DIGITS:
            return int(text)
        if _NUMBER.fullmatch(text):
            number = float(text)
            return number if math.isfinite(number) else None
    return None


def normalize(value: Any, depth: int = 0, key: str = "") -> Any:
    """Seed 002's rules: empty strings -> None, numeric strings -> numbers, invalid numbers -> None,
    camelCase keys -> snake_case. Applied recursively (to a bounded depth). Values of identifier keys
    (`*_version`, `*_id`, serial, mac...) stay text."""
    if depth > 32:
        return None
    if isinstance(value, dict):
        out = {}
        if depth < 32:
            # the common values (numbers, null) inline: what the recursive call returns for them at depth + 1
            cache = _SNAKE
            isfinite = math.isfinite
            for k, v in value.items():
                name = cache.get(k) if type(k) is str else None
                if name is None:
                    name = snake_case(str(k))
                kind = type(v)
                if kind is float:
                    out[name] = v if isfinite(v) else None
                elif kind is int or kind is bool or v is None:
                    out[name] = v
                else:
                    out[name] = normalize(v, depth + 1, name)
            return out
        for k, v in value.items():
            name = snake_case(str(k))
            out[name] = normalize(v, depth + 1, name)
        return out
    if isinstance(value, list):
        return [normalize(v, depth + 1, key) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if key and _KEEP_TEXT.fullmatch(key):
            return value
        if text.lower() in _NOT_A_NUMBER:
            return None
        if _NUMBER.fullmatch(text):
            return to_number(text)  # None when it overflows to infinity: an invalid number
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def parse_time(value: Any) -> float | None:
    """Epoch seconds from an ISO-8601 string or a number (seconds or milliseconds); None if unusable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = as_float(value)
        if seconds is None or seconds <= 0:
            return None
        # device clocks send seconds or milliseconds; anything past year 5000 in seconds is milliseconds
        return seconds / 1000.0 if seconds > 1e11 else seconds
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


_TIME_KEYS = ("time", "timestamp", "ts")
_SKIP_KEYS = {"device_id", "sequence_id", *_TIME_KEYS}
_VALUE_KEYS = {"value", *_TIME_KEYS, "unit", "device_id"}


def _flatten(prefix: str, value: Any, out: list[tuple[str, float | None]], depth: int) -> None:
    if depth > 8:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            if depth == 0 and key in _SKIP_KEYS:
                continue
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out, depth + 1)
        return
    if isinstance(value, list | str) or value is None:
        # strings that were not numbers and lists are not measurements; None is an invalid number
        if value is None and prefix:
            out.append((prefix, None))
        return
    out.append((prefix, as_float(to_number(value))))


def extract_metrics(action: str, payload: Any) -> tuple[list[tuple[str, float | None]], float | None]:
    """Measurements from a normalized telemetry payload, and the device's own timestamp if it sent one.

    Forms (DESIGN, `telemetry` row): `{"value": v, "time": t}` -> metric named after the action;
    a JSON object of metrics (nested objects flatten to dotted names); a bare number.
    """
    if isinstance(payload, dict):
        ts = None
        for k in _TIME_KEYS:
            if k in payload:
                ts = parse_time(payload[k])
                break
        if "value" in payload and set(payload) <= _VALUE_KEYS:
            return [(action, as_float(to_number(payload["value"])))], ts
        out: list[tuple[str, float | None]] = []
        # `_flatten("", payload, out, 0)`, with the top level's numbers inline
        isfinite = math.isfinite
        for key, inner in payload.items():
            if key in _SKIP_KEYS:
                continue
            kind = type(inner)
            if kind is float:
                out.append((key if type(key) is str else str(key), inner if isfinite(inner) else None))
            elif kind is int:
                out.append((key if type(key) is str else str(key), as_float(inner)))
            else:
                _flatten(key if type(key) is str else str(key), inner, out, 1)
        return out, ts
    number = to_number(payload)
    if number is not None:
        return [(action, as_float(number))], None
    return [], None


_PLAIN: dict[Any, bool] = {}


def _plain(key: Any) -> bool:
    """A key `normalize` keeps as it is and `extract_metrics` turns into a metric of that name."""
    plain = _PLAIN.get(key)
    if plain is None:
        plain = type(key) is str and snake_case(key) == key and key not in _VALUE_KEYS and key not in _SKIP_KEYS
        if len(_PLAIN) >= 4096:
            _PLAIN.clear()
        _PLAIN[key] = plain
    return plain


def flat_metrics(payload: Any) -> list[tuple[str, float | None]] | None:
    """`extract_metrics(action, normalize(payload))[0]` for the usual telemetry, a JSON object of finite floats under
    snake_case keys with no timestamp, in one pass and without the normalized copy; None for any other payload
    (the caller takes the general path). Nearly every message at 10,000 msg/s is this shape."""
    if type(payload) is not dict or not payload:
        return None
    isfinite = math.isfinite
    plain = _PLAIN
    out: list[tuple[str, float | None]] = []
    for key, value in payload.items():
        if type(value) is not float or not isfinite(value) or not (plain.get(key) or _plain(key)):
            return None
        out.append((key, value))
    return out
