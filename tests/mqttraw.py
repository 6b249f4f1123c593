"""A tiny MQTT 3.1.1 client on asyncio streams, for tests that need control of every bit on the wire.

Unlike paho, it does only what it is told: it sends CONNECT with any flags, keep-alive and Will, PUBLISH
with any QoS bits, packet id, DUP and RETAIN, never acknowledges unless asked (or `auto_ack=True`), can
write many packets in one `send()` and can drop the socket without DISCONNECT. Every packet it reads is
kept with its fixed-header flags, so a test can check DUP, RETAIN, QoS and packet ids as the server sent
them (MQTT 3.1.1 section 2.2).

The bottom of the file has a few helpers for the gateway side of these tests (a gateway on a given data
dir with extra config, integration accounts, reading a Prometheus counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

__all__ = [
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "DISCONNECT_PACKET",
    "PINGREQ",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "ConnectionClosedError",
    "GatewayUnderTest",
    "Packet",
    "RawClient",
    "Will",
    "ack_packet",
    "add_integration",
    "connect_packet",
    "metric",
    "packet",
    "parse",
    "publish_packet",
    "started",
    "subscribe_packet",
    "topic",
    "unsubscribe_packet",
]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
}


# ---------------------------------------------------------------------------------------------- encoding


def _remaining_length(n: int) -> bytes:
    """Section 2.2.3: 7 bits per byte, high bit = more bytes follow."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def packet(kind: int, flags: int, body: bytes = b"") -> bytes:
    return bytes([(kind << 4) | (flags & 0x0F)]) + _remaining_length(len(body)) + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
    keepalive: int = 60,
    will: Will | None = None,
    protocol_name: str = "MQTT",
    level: int = 4,
    flags: int | None = None,
) -> bytes:
    """CONNECT (section 3.1); `flags` overrides the computed connect-flags byte."""
    computed = 0x02 if clean else 0
    payload = _string(client_id)
    if will is not None:
        computed |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        computed |= 0x80
        payload += _string(username)
    if password is not None:
        computed |= 0x40
        payload += _string(password)
    header = _string(protocol_name) + bytes([level, computed if flags is None else flags])
    return packet(CONNECT, 0, header + keepalive.to_bytes(2, "big") + payload)


def publish_packet(
    topic: str,
    payload: bytes | str = b"",
    qos: int = 0,
    pid: int | None = None,
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    """PUBLISH (section 3.3). `qos` goes into the header as given (3 makes a malformed packet)."""
    data = payload.encode() if isinstance(payload, str) else payload
    flags = (0x08 if dup else 0) | ((qos & 0x03) << 1) | (0x01 if retain else 0)
    body = _string(topic)
    if qos:
        body += (pid if pid is not None else 1).to_bytes(2, "big")
    return packet(PUBLISH, flags, body + data)


def ack_packet(kind: int, pid: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0010, section 3.6.1) or PUBCOMP."""
    return packet(kind, 0x02 if kind == PUBREL else 0, pid.to_bytes(2, "big"))


def subscribe_packet(pid: int, filters: Iterable[tuple[str, int]], flags: int = 0x02) -> bytes:
    """SUBSCRIBE (section 3.8); the reserved header flags must be 0010 ([MQTT-3.8.1-1])."""
    body = pid.to_bytes(2, "big") + b"".join(_string(f) + bytes([q]) for f, q in filters)
    return packet(SUBSCRIBE, flags, body)


def unsubscribe_packet(pid: int, filters: Iterable[str]) -> bytes:
    return packet(UNSUBSCRIBE, 0x02, pid.to_bytes(2, "big") + b"".join(_string(f) for f in filters))


PINGREQ_PACKET = packet(PINGREQ, 0)
DISCONNECT_PACKET = packet(DISCONNECT, 0)


# ---------------------------------------------------------------------------------------------- decoding


@dataclass
class Packet:
    """One packet as the server sent it, with its fixed-header flags and the fields tests look at."""

    kind: int
    flags: int
    body: bytes
    at: float = field(default_factory=time.monotonic)
    pid: int | None = None
    topic: str = ""
    payload: bytes = b""
    session_present: bool = False
    return_code: int | None = None
    granted: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, f"type{self.kind}")

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    def json(self) -> Any:
        return json.loads(self.payload)

    def __repr__(self) -> str:
        if self.kind == PUBLISH:
            return (
                f"PUBLISH(topic={self.topic!r}, qos={self.qos}, pid={self.pid}, dup={int(self.dup)}, "
                f"retain={int(self.retain)}, payload={self.payload[:60]!r})"
            )
        if self.kind == CONNACK:
            return f"CONNACK(session_present={int(self.session_present)}, rc={self.return_code})"
        if self.kind == SUBACK:
            return f"SUBACK(pid={self.pid}, granted={self.granted})"
        return f"{self.name}(pid={self.pid})" if self.pid is not None else self.name


def parse(kind: int, flags: int, body: bytes) -> Packet:
    p = Packet(kind, flags, body)
    if kind == CONNACK and len(body) >= 2:
        p.session_present = bool(body[0] & 0x01)
        p.return_code = body[1]
    elif kind == PUBLISH:
        n = int.from_bytes(body[:2], "big")
        p.topic = body[2 : 2 + n].decode("utf-8", "replace")
        rest = body[2 + n :]
        if p.qos in (1, 2):
            p.pid = int.from_bytes(rest[:2], "big")
            rest = rest[2:]
        p.payload = rest
    elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK) and len(body) >= 2:
        p.pid = int.from_bytes(body[:2], "big")
    elif kind == SUBACK and len(body) >= 2:
        p.pid = int.from_bytes(body[:2], "big")
        p.granted = list(body[2:])
    return p


class ConnectionClosedError(AssertionError):
    """The server closed the connection while the test was waiting for a packet."""


# ---------------------------------------------------------------------------------------------- client


class RawClient:
    """One TCP connection speaking MQTT 3.1.1, driven packet by packet by the test.

    Received packets go to an inbox; `expect()` takes the first one that matches and leaves the others
    (so a PUBACK arriving before an expected PUBLISH is not lost). `received` keeps them all, in order.
    With `auto_ack`, incoming QoS 1 PUBLISH is PUBACKed, QoS 2 PUBLISH is PUBRECed and PUBREL is
    PUBCOMPed at once; without it, nothing is ever sent unless the test sends it.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", auto_ack: bool = False) -> None:
        self.port = port
        self.host = host
        self.auto_ack = auto_ack
        self.received: list[Packet] = []
        self.closed_at: float | None = None
        self.last_sent_at: float = 0.0
        self._inbox: list[Packet] = []
        self._arrived = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_pid = 0

    # -- connection

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
        self.closed_at = None
        self._task = asyncio.create_task(self._read_loop(), name=f"mqttraw-{self.port}")

    async def connect(
        self,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        clean: bool = True,
        keepalive: int = 60,
        will: Will | None = None,
        timeout: float = 5.0,
    ) -> Packet:
        """Open the socket if needed, send CONNECT, return the CONNACK (whatever its return code)."""
        if self._writer is None or self.closed or self._writer.is_closing():
            await self.reset()
            await self.open()
        self.send(connect_packet(client_id, username, password, clean, keepalive, will))
        return await self.expect(CONNACK, timeout)

    async def reset(self) -> None:
        """Forget the previous connection (its unread packets too), keeping `received` as history."""
        await self.close()
        self._inbox.clear()
        self._writer = None
        self._reader = None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def send(self, *raw: bytes) -> None:
        """Write these packets in one go (one write call, so they usually share a TCP segment)."""
        assert self._writer is not None, "not open"
        self._writer.write(b"".join(raw))
        self.last_sent_at = time.monotonic()

    async def flush(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, the way a device losing power does."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def disconnect(self) -> None:
        """A clean DISCONNECT (section 3.14), then close."""
        if self._writer is not None and not self.closed:
            with contextlib.suppress(OSError):
                self.send(DISCONNECT_PACKET)
                await self._writer.drain()
        await self.close()

    async def close(self) -> None:
        """Close the socket (after flushing what was written) and stop reading."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._writer.wait_closed(), 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    async def wait_closed(self, timeout: float) -> bool:
        """True once the server has closed the connection (EOF or reset) within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return True

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length) if length else b""
                p = parse(first >> 4, first & 0x0F, body)
                self.received.append(p)
                self._inbox.append(p)
                if self.auto_ack:
                    self._auto_ack(p)
                self._arrived.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed_at = time.monotonic()
            self._arrived.set()

    def _auto_ack(self, p: Packet) -> None:
        if self._writer is None or p.pid is None:
            return
        if p.kind == PUBLISH and p.qos == 1:
            self._writer.write(ack_packet(PUBACK, p.pid))
        elif p.kind == PUBLISH and p.qos == 2:
            self._writer.write(ack_packet(PUBREC, p.pid))
        elif p.kind == PUBREL:
            self._writer.write(ack_packet(PUBCOMP, p.pid))

    # -- receiving

    async def expect(self, kind: int, timeout: float = 5.0, where: Callable[[Packet], bool] | None = None) -> Packet:
        """Take the first unread packet of this kind (and matching `where`), waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(self._inbox):
                if p.kind == kind and (where is None or where(p)):
                    del self._inbox[i]
                    return p
            if self.closed:
                raise ConnectionClosedError(f"connection closed while waiting for {NAMES[kind]}; unread: {self._inbox}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {NAMES[kind]} within {timeout} s; unread: {self._inbox}")
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def expect_publish(self, timeout: float = 5.0, where: Callable[[Packet], bool] | None = None) -> Packet:
        return await self.expect(PUBLISH, timeout, where)

    async def publishes_until(self, where: Callable[[Packet], bool], timeout: float = 5.0) -> list[Packet]:
        """Take every PUBLISH up to and including the first that matches `where` (a marker), in order."""
        out: list[Packet] = []
        while True:
            p = await self.expect(PUBLISH, timeout)
            out.append(p)
            if where(p):
                return out

    def unread(self, kind: int | None = None) -> list[Packet]:
        return [p for p in self._inbox if kind is None or p.kind == kind]

    async def collect(self, kind: int, count: int, timeout: float = 5.0) -> list[Packet]:
        return [await self.expect(kind, timeout) for _ in range(count)]

    # -- sending

    def pid(self) -> int:
        self._next_pid = self._next_pid % 65535 + 1
        return self._next_pid

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        pid: int | None = None,
        dup: bool = False,
        timeout: float = 5.0,
    ) -> int | None:
        """Publish and, for QoS 1 and 2, complete the flow (PUBACK; PUBREC, PUBREL, PUBCOMP)."""
        packet_id = (pid or self.pid()) if qos else None
        self.send(publish_packet(topic, payload, qos, packet_id, dup, retain))
        if qos == 1:
            assert packet_id is not None
            await self.expect(PUBACK, timeout, lambda p: p.pid == packet_id)
        elif qos == 2:
            assert packet_id is not None
            await self.expect(PUBREC, timeout, lambda p: p.pid == packet_id)
            self.send(ack_packet(PUBREL, packet_id))
            await self.expect(PUBCOMP, timeout, lambda p: p.pid == packet_id)
        return packet_id

    async def subscribe(self, *filters: tuple[str, int], timeout: float = 5.0) -> list[int]:
        """SUBSCRIBE and return the SUBACK's granted QoS list (0x80 = refused)."""
        packet_id = self.pid()
        self.send(subscribe_packet(packet_id, filters))
        suback = await self.expect(SUBACK, timeout, lambda p: p.pid == packet_id)
        return suback.granted

    async def unsubscribe(self, *filters: str, timeout: float = 5.0) -> None:
        packet_id = self.pid()
        self.send(unsubscribe_packet(packet_id, filters))
        await self.expect(UNSUBACK, timeout, lambda p: p.pid == packet_id)

    async def ping(self, timeout: float = 5.0) -> None:
        self.send(PINGREQ_PACKET)
        await self.expect(PINGRESP, timeout)

    def ack(self, kind: int, pid: int | None) -> None:
        assert pid is not None
        self.send(ack_packet(kind, pid))


# ---------------------------------------------------------------------------------------------- gateway side


class GatewayUnderTest(Protocol):
    """What these tests use of conftest.Running (the `gateway` fixture), typed without importing conftest
    (mypy would then check conftest too; it is imported at run time only)."""

    gw: Any
    data_dir: Path
    token: str

    @property
    def mqtt_port(self) -> int: ...

    def http(self, token: str | None = "default") -> Any: ...

    async def add_device(
        self, device_id: str, site: str = "yacht", room: str = "c101", type_: str = "button"
    ) -> str: ...

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...

    async def wait_for(
        self, sql: str, params: tuple[Any, ...] = (), count: int = 1, timeout: float = 5.0
    ) -> list[tuple[Any, ...]]: ...


def topic(device_id: str, action: str, site: str = "yacht", room: str = "c101", type_: str = "button") -> str:
    """A device-protocol topic, as conftest.topic."""
    return f"bosun/{site}/{room}/{type_}/{device_id}/{action}"


@contextlib.asynccontextmanager
async def started(data_dir: Path, **extra: Any) -> AsyncIterator[GatewayUnderTest]:
    """A gateway on `data_dir` with extra config ("mqtt.session_queue_max": 5, ...), as a conftest.Running.

    Start it again on the same data dir to test what survives a restart (the MQTT port changes).
    """
    from gateway.runtime import Gateway
    from gateway.store import registry

    conftest = importlib.import_module("conftest")
    cfg = conftest.make_config(data_dir, **extra)
    gw = Gateway(cfg)
    await gw.start()
    try:
        token = await gw.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
        yield conftest.Running(gw, cfg.data_dir, token)
    finally:
        await gw.stop()


async def add_integration(running: GatewayUnderTest, name: str, read: list[str], write: list[str] | None = None) -> str:
    """An integration MQTT account (Node-RED style) limited to these patterns; returns its password."""
    from gateway.store import registry

    password = f"{name}-password-for-tests"
    await running.gw.writer.run(
        lambda c: registry.add_integration(c, name, password, read, write or ["lab/nothing"], "test")
    )
    await running.gw.accounts.refresh()
    return password


async def metric(running: GatewayUnderTest, name: str, **labels: str) -> float:
    """A sample from /metrics (read with the API token), 0.0 when the series does not exist yet."""
    async with running.http() as http:
        response = await http.get("/metrics")
        assert response.status_code == 200, response.text
    wanted = {k: v for k, v in labels.items()}
    for line in response.text.splitlines():
        m = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == wanted:
            return float(m.group(3))
    return 0.0


def start_gateway(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int, int]:
    """conftest.start_gateway (`bosun run` as a subprocess), typed here like the rest of this module."""
    start: Callable[..., tuple[subprocess.Popen[str], int, int]] = importlib.import_module("conftest").start_gateway
    return start(data_dir, *extra)


MakeRaw = Callable[..., RawClient]


@pytest.fixture
async def raw() -> AsyncIterator[MakeRaw]:
    """Raw MQTT clients, all closed at the end of the test (a plugin of conftest: every test can use it)."""
    made: list[RawClient] = []

    def make(port: int, auto_ack: bool = False) -> RawClient:
        client = RawClient(port, auto_ack=auto_ack)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
