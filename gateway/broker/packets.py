"""MQTT 3.1.1 wire format: an incremental parser and the encoders the broker needs.

Hand-written because it is the hot path: one parser per connection turns whatever bytes a read returned into
whole packets with no await and no object per field. Everything that is not a PUBLISH or an ack is rare and
decoded into a small dataclass. Malformed input raises `Malformed` naming the rule it broke; the connection
closes (MQTT 3.1.1 section 4.8: a protocol violation closes the network connection).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "Connect",
    "Malformed",
    "Parser",
    "ack",
    "connack",
    "decode_connect",
    "decode_publish",
    "decode_subscribe",
    "decode_unsubscribe",
    "encode_publish",
    "pingresp",
    "suback",
    "unsuback",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# section 2.2.2: fixed-header flags that are not PUBLISH's must be exactly these
_REQUIRED_FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PUBACK: 0, PUBREC: 0, PUBCOMP: 0, PINGREQ: 0}
_REQUIRED_FLAGS |= {DISCONNECT: 0, CONNECT: 0}
_PID = struct.Struct("!H")


class Malformed(Exception):
    """A protocol violation; the message names the section of MQTT 3.1.1 it breaks."""


class Parser:
    """Splits a byte stream into (type, flags, body) packets; bodies are bytes slices of the input."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = b""
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if not self._buf and len(data) >= 2 and data[1] < 0x80 and len(data) == 2 + data[1]:
            # the usual read: exactly one whole packet under 128 bytes (a device's telemetry, an ack)
            kind, flags = data[0] >> 4, data[0] & 0x0F
            required = _REQUIRED_FLAGS.get(kind)
            if required is not None and flags != required:
                raise Malformed(f"section 2.2.2: bad flags {flags:#x} for packet type {kind}")
            if data[1] > self.max_size:
                raise Malformed(f"packet of {data[1]} bytes exceeds the {self.max_size}-byte limit")
            return [(kind, flags, data[2:])]
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            # remaining length: up to 4 bytes, 7 bits each (section 2.2.3)
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= end:
                    self._buf = buf[pos:]
                    return out
                byte = buf[i]
                length += (byte & 0x7F) * mult
                i += 1
                if not byte & 0x80:
                    break
                mult *= 128
                if mult > 128**3:
                    raise Malformed("section 2.2.3: remaining length longer than 4 bytes")
            if length > self.max_size:
                raise Malformed(f"packet of {length} bytes exceeds the {self.max_size}-byte limit")
            if end - i < length:
                break
            kind, flags = first >> 4, first & 0x0F
            required = _REQUIRED_FLAGS.get(kind)
            if required is not None and flags != required:
                raise Malformed(f"section 2.2.2: bad flags {flags:#x} for packet type {kind}")
            out.append((kind, flags, buf[i : i + length]))
            pos = i + length
        self._buf = buf[pos:] if pos < end else b""
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def _string(body: bytes, pos: int, what: str) -> tuple[str, int]:
    raw, pos = _binary(body, pos, what, "1.5.3")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise Malformed(f"section 1.5.3: {what} is not UTF-8") from None
    if "\x00" in text:
        raise Malformed(f"section 1.5.3: {what} contains U+0000")
    return text, pos


def _binary(body: bytes, pos: int, what: str, section: str = "3.1.3") -> tuple[bytes, int]:
    """A 2-byte length and that many bytes; `section` is the rule a truncation breaks."""
    if pos + 2 > len(body):
        raise Malformed(f"section {section}: truncated {what}")
    n = (body[pos] << 8) | body[pos + 1]
    raw = body[pos + 2 : pos + 2 + n]
    if len(raw) != n:
        raise Malformed(f"section {section}: truncated {what}")
    return raw, pos + 2 + n


def decode_publish(flags: int, body: bytes) -> tuple[str, int, bytes]:
    """(topic, packet id or 0, payload) of a PUBLISH body; the flags carry DUP, QoS, RETAIN."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise Malformed("section 3.3.1.2: QoS 3 is reserved")
    if len(body) < 2:
        raise Malformed("section 3.3.2: truncated topic")
    n = (body[0] << 8) | body[1]
    pos = 2 + n
    if len(body) < pos + (2 if qos else 0):
        raise Malformed("section 3.3.2: truncated PUBLISH")
    try:
        topic = body[2:pos].decode()
    except UnicodeDecodeError:
        raise Malformed("section 3.3.2.1: topic is not UTF-8") from None
    pid = 0
    if qos:
        pid = (body[pos] << 8) | body[pos + 1]
        if pid == 0:
            raise Malformed("section 2.3.1: packet identifier 0")
        pos += 2
    return topic, pid, body[pos:]


def decode_pid(body: bytes) -> int:
    if len(body) != 2:
        raise Malformed("section 3.4: an acknowledgement carries exactly a packet identifier")
    return (body[0] << 8) | body[1]


@dataclass(slots=True)
class Connect:
    client_id: str
    clean: bool
    keep_alive: int
    level: int
    username: str | None = None
    password: str | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    errors: list[str] = field(default_factory=list)


def decode_connect(body: bytes) -> Connect:
    name, pos = _string(body, 0, "protocol name")
    if pos + 4 > len(body):
        raise Malformed("section 3.1.2: truncated variable header")
    level, flags = body[pos], body[pos + 1]
    keep_alive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if name != "MQTT":
        raise Malformed(f"section 3.1.2.1: protocol name {name!r}")
    if flags & 1:
        raise Malformed("section 3.1.2.3: reserved flag set")
    client_id, pos = _string(body, pos, "client identifier")
    conn = Connect(client_id, bool(flags & 2), keep_alive, level)
    if flags & 4:
        conn.will_topic, pos = _string(body, pos, "will topic")
        conn.will_payload, pos = _binary(body, pos, "will message")
        conn.will_qos = (flags >> 3) & 3
        conn.will_retain = bool(flags & 0x20)
        if conn.will_qos == 3:
            raise Malformed("section 3.1.2.6: will QoS 3")
    elif flags & 0x38:
        raise Malformed("section 3.1.2.6: will QoS or retain set without the will flag")
    if flags & 0x80:
        conn.username, pos = _string(body, pos, "user name")
    if flags & 0x40:
        raw, pos = _binary(body, pos, "password")
        conn.password = raw.decode(errors="replace")
        if not flags & 0x80:
            conn.errors.append("password without user name")  # section 3.1.2.9: refused with code 4
    return conn


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    pid = _pid_head(body)
    pos, out = 2, []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        if pos >= len(body):
            raise Malformed("section 3.8.3: filter without requested QoS")
        qos = body[pos]
        if qos > 2:
            raise Malformed("section 3.8.3.1: requested QoS byte above 2 or reserved bits set")
        out.append((topic_filter, qos))
        pos += 1
    if not out:
        raise Malformed("section 3.8.3: SUBSCRIBE without a filter")
    return pid, out


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    pid = _pid_head(body)
    pos, out = 2, []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "topic filter")
        out.append(topic_filter)
    if not out:
        raise Malformed("section 3.10.3: UNSUBSCRIBE without a filter")
    return pid, out


def _pid_head(body: bytes) -> int:
    if len(body) < 2:
        raise Malformed("section 2.3.1: missing packet identifier")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise Malformed("section 2.3.1: packet identifier 0")
    return pid


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def encode_publish(topic: bytes, payload: bytes, qos: int, retain: bool, pid: int = 0, dup: bool = False) -> bytes:
    """A whole PUBLISH; `topic` is already UTF-8 with its 2-byte length prefix (encoded once per message)."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    if qos:
        head = topic + _PID.pack(pid)
        return bytes((first,)) + _length(len(head) + len(payload)) + head + payload
    return bytes((first,)) + _length(len(topic) + len(payload)) + topic + payload


def topic_bytes(topic: str) -> bytes:
    raw = topic.encode()
    return _PID.pack(len(raw)) + raw


_ACK_FIRST = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70, UNSUBACK: 0xB0}
_ACK = struct.Struct("!BBH").pack  # a quarter of the time of bytes((...)): one per acknowledged PUBLISH


def ack(kind: int, pid: int) -> bytes:
    return _ACK(_ACK_FIRST[kind], 2, pid)


def connack(session_present: bool, code: int) -> bytes:
    return bytes((0x20, 2, 1 if session_present else 0, code))


def suback(pid: int, codes: list[int]) -> bytes:
    return bytes((0x90,)) + _length(2 + len(codes)) + _PID.pack(pid) + bytes(codes)


def unsuback(pid: int) -> bytes:
    return ack(UNSUBACK, pid)


def pingresp() -> bytes:
    return b"\xd0\x00"
