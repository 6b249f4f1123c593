"""A minimal MQTT 3.1.1 codec for the load generator: the packets a device and a relay client need.

Encoders return bytes ready for `transport.write`; `Parser.feed` splits a byte stream into packets. Only
what the benchmark uses is here (no QoS 2, no will, no UNSUBSCRIBE): it is a client for measuring, not a
library.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Packet",
    "Parser",
    "connect",
    "puback",
    "publish",
    "publish_header",
    "remaining_length",
    "subscribe",
]

CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBACK = 9
PINGRESP = 13

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
_PID = struct.Struct("!H")


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return _PID.pack(len(data)) + data


def connect(client_id: str, username: str | None = None, password: str | None = None, keepalive: int = 60) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    body = _string("MQTT") + bytes([4, flags]) + _PID.pack(keepalive) + payload
    return b"\x10" + remaining_length(len(body)) + body


def subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = _PID.pack(packet_id) + b"".join(_string(f) + bytes([qos]) for f, qos in filters)
    return b"\x82" + remaining_length(len(body)) + body


def publish_header(topic: str, qos: int, payload_len: int, retain: bool = False) -> bytes:
    """Fixed header plus topic of a PUBLISH; append the packet id (QoS > 0) and the payload."""
    encoded = _string(topic)
    size = len(encoded) + (2 if qos else 0) + payload_len
    return bytes([0x30 | qos << 1 | int(retain)]) + remaining_length(size) + encoded


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    header = publish_header(topic, qos, len(payload), retain)
    return header + (_PID.pack(packet_id) if qos else b"") + payload


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _PID.pack(packet_id)


class Packet(NamedTuple):
    kind: int
    flags: int
    body: bytes


class Parser:
    """Incremental: feed it what the socket gave, iterate over the complete packets."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Packet]:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            first = buf[pos]
            length = 0
            shift = 0
            i = pos + 1
            while True:
                if i >= end:
                    del buf[:pos]
                    return
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed remaining length")
            if end - i < length:
                break
            yield Packet(first >> 4, first & 0x0F, bytes(buf[i : i + length]))
            pos = i + length
        del buf[:pos]


def packet_id(body: bytes) -> int:
    """The packet id at the start of a PUBACK or SUBACK body."""
    return int(_PID.unpack_from(body)[0])


def split_publish(flags: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet id or 0, payload) of a PUBLISH body."""
    (size,) = _PID.unpack_from(body)
    topic = body[2 : 2 + size].decode()
    qos = (flags >> 1) & 0x03
    pos = 2 + size
    pid = 0
    if qos:
        (pid,) = _PID.unpack_from(body, pos)
        pos += 2
    return topic, qos, pid, body[pos:]
