"""The load generator: raw MQTT 3.1.1 connections on asyncio Protocols, no Task per message.

Every packet is handled inside `data_received`; sending is a `transport.write` from one pacing loop (the
durable scenario) or one publishing loop (the relay). QoS 1 send times are kept per connection by packet id
so the PUBACK gives the latency (time.monotonic, same process). One Task per fleet sends PINGREQs.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from gateway.bench import mqtt

__all__ = ["Connection", "Counters", "Fleet", "Pacer", "connect_many", "open_connection"]

_PID = struct.Struct("!H")
AckHook = Callable[[float, float], None]  # (sent_at, acked_at)
MessageHook = Callable[[str, bytes, float], None]  # (topic, payload, received_at)


class Connection(asyncio.Protocol):
    """One client. PUBACKs for received QoS 1 messages go out in one write per `data_received`."""

    def __init__(self, client_id: str, on_ack: AckHook | None = None, on_message: MessageHook | None = None) -> None:
        self.client_id = client_id
        self.on_ack = on_ack
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.inflight: dict[int, float] = {}
        self.received = 0
        self._parser = mqtt.Parser()
        self._next_pid = 0
        loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = loop.create_future()
        self._suback: asyncio.Future[bytes] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._writable: asyncio.Future[None] | None = None
        self._window_waiter: tuple[int, asyncio.Future[None]] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        acks: list[bytes] = []
        for kind, flags, body in self._parser.feed(data):
            if kind == mqtt.PUBACK:
                sent_at = self.inflight.pop(mqtt.packet_id(body), None)
                if sent_at is not None and self.on_ack is not None:
                    self.on_ack(sent_at, now)
            elif kind == mqtt.PUBLISH:
                topic, qos, pid, payload = mqtt.split_publish(flags, body)
                self.received += 1
                if qos == 1:
                    acks.append(mqtt.puback(pid))
                if self.on_message is not None:
                    self.on_message(topic, payload, now)
            elif kind == mqtt.CONNACK and not self._connack.done():
                self._connack.set_result(body[1])
            elif kind == mqtt.SUBACK and not self._suback.done():
                self._suback.set_result(body[2:])
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))
        waiter = self._window_waiter
        if waiter is not None and len(self.inflight) <= waiter[0]:
            self._window_waiter = None
            if not waiter[1].done():
                waiter[1].set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError(f"{self.client_id}: connection closed")
        for future in (self._connack, self._suback):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(None)
        self.resume_writing()
        if self._window_waiter is not None and not self._window_waiter[1].done():
            self._window_waiter[1].set_result(None)

    # client side

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.closed.done()

    @property
    def paused(self) -> bool:
        return self._writable is not None

    async def writable(self) -> None:
        if self._writable is not None:
            await self._writable

    async def window_below(self, limit: int) -> None:
        """Wait until at most `limit` QoS 1 messages are unacknowledged (or the connection is gone)."""
        if len(self.inflight) <= limit or not self.alive:
            return
        future = asyncio.get_running_loop().create_future()
        self._window_waiter = (limit, future)
        await future

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def next_pid(self) -> int:
        pid = self._next_pid
        while True:
            pid = pid % 65535 + 1
            if pid not in self.inflight:
                self._next_pid = pid
                return pid

    def send_publish(self, topic: str, payload: bytes, qos: int, now: float) -> None:
        """Any PUBLISH (QoS 0 or 1); for QoS 1 the send time is kept until its PUBACK."""
        pid = 0
        if qos:
            pid = self.next_pid()
            self.inflight[pid] = now
        self.write(mqtt.publish(topic, payload, qos, pid))

    def send_qos1(self, header: bytes, payload: bytes, now: float) -> None:
        """A QoS 1 PUBLISH whose fixed header and topic are `header` (see mqtt.publish_header)."""
        pid = self.next_pid()
        self.inflight[pid] = now
        self.write(b"".join((header, _PID.pack(pid), payload)))

    async def handshake(self, username: str | None, password: str | None, filters: list[tuple[str, int]]) -> None:
        self.write(mqtt.connect(self.client_id, username, password))
        code = await self._connack
        if code != 0:
            raise ConnectionRefusedError(f"{self.client_id}: CONNACK return code {code}")
        if filters:
            self.write(mqtt.subscribe(1, filters))
            granted = await self._suback
            if any(g == 0x80 for g in granted):
                raise PermissionError(f"{self.client_id}: subscription refused for {filters}")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt.DISCONNECT)
            self.transport.close()


async def open_connection(
    host: str,
    port: int,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    filters: Sequence[tuple[str, int]] = (),
    connect_timeout: float = 15.0,
    on_ack: AckHook | None = None,
    on_message: MessageHook | None = None,
) -> Connection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        _, conn = await loop.create_connection(lambda: Connection(client_id, on_ack, on_message), host, port)
        try:
            await conn.handshake(username, password, list(filters))
        except BaseException:
            conn.close()
            raise
    return conn


@dataclass(frozen=True)
class Client:
    """What one connection needs: id, credentials (None for anonymous) and its subscriptions."""

    client_id: str
    username: str | None
    password: str | None
    filters: tuple[tuple[str, int], ...]


@dataclass
class Fleet:
    conns: list[Connection] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    connect_s: float = 0.0
    _pinger: asyncio.Task[None] | None = None

    def start_pings(self, every: float = 30.0) -> None:
        async def ping() -> None:
            while True:
                await asyncio.sleep(every)
                for conn in self.conns:
                    conn.write(mqtt.PINGREQ)

        self._pinger = asyncio.create_task(ping(), name="bench-pings")

    @property
    def alive(self) -> int:
        return sum(1 for c in self.conns if c.alive)

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        for conn in self.conns:
            conn.close()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*(c.closed for c in self.conns), return_exceptions=True)
        self.conns.clear()


async def connect_many(
    host: str,
    port: int,
    clients: Sequence[Client],
    on_ack: AckHook | None = None,
    concurrency: int = 50,
    connect_timeout: float = 15.0,
    deadline: float = 120.0,
    progress: Callable[[int, int, int], None] | None = None,
) -> Fleet:
    """Connect and subscribe every client, at most `concurrency` handshakes at a time; failures are counted.

    `progress(done, connected, total)` is called after each attempt; whatever is not connected after
    `deadline` seconds is given up (a Task per connection here is fine: connecting is not the hot path).
    """
    fleet = Fleet()
    results: list[Connection | None] = [None] * len(clients)
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    done = 0

    async def one(index: int, client: Client) -> None:
        nonlocal done
        async with gate:
            try:
                results[index] = await open_connection(
                    host,
                    port,
                    client.client_id,
                    client.username,
                    client.password,
                    client.filters,
                    connect_timeout,
                    on_ack,
                )
            except (OSError, TimeoutError, PermissionError) as exc:
                fleet.failed += 1
                if len(fleet.errors) < 5:
                    fleet.errors.append(f"{client.client_id}: {exc!r}")
            done += 1
            if progress is not None:
                progress(done, done - fleet.failed, len(clients))

    tasks = [asyncio.create_task(one(i, c)) for i, c in enumerate(clients)]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            fleet.failed += len(pending)
            fleet.errors.append(f"{len(pending)} not connected after {deadline:g} s")
    fleet.connect_s = time.monotonic() - started
    fleet.conns = [c for c in results if c is not None]
    return fleet


@dataclass
class Counters:
    offered: int = 0
    sent: int = 0
    blocked: int = 0
    acked: int = 0

    def copy(self) -> Counters:
        return Counters(self.offered, self.sent, self.blocked, self.acked)

    def minus(self, other: Counters) -> Counters:
        return Counters(
            self.offered - other.offered,
            self.sent - other.sent,
            self.blocked - other.blocked,
            self.acked - other.acked,
        )


class Pacer:
    """Sends at an even aggregate rate over all connections, round robin, from one loop.

    A send slot whose connection already has `window` unacknowledged messages (or is closed, or its socket
    buffer is full) is counted as blocked and skipped: the offered rate stays what was asked for.
    """

    def __init__(
        self,
        conns: Sequence[Connection],
        headers: Sequence[bytes],
        payloads: Sequence[bytes],
        qos: int,
        window: int,
        counters: Counters,
        tick: float = 0.004,
    ) -> None:
        assert len(conns) == len(headers) and conns
        self.conns = conns
        self.headers = headers
        self.payloads = payloads
        self.qos = qos
        self.window = window
        self.counters = counters
        self.tick = tick

    async def run(self, rate: float, until: float) -> None:
        conns, headers, payloads, counters = self.conns, self.headers, self.payloads, self.counters
        n, variants, window, qos = len(conns), len(payloads), self.window, self.qos
        started = time.monotonic()
        issued = 0
        index = 0
        variant = 0
        while True:
            now = time.monotonic()
            if now >= until:
                return
            due = int((now - started) * rate) - issued
            issued += due
            counters.offered += due
            for _ in range(due):
                conn = conns[index]
                header = headers[index]
                index = index + 1 if index + 1 < n else 0
                variant = variant + 1 if variant + 1 < variants else 0
                if not conn.alive or conn.paused or (qos and len(conn.inflight) >= window):
                    counters.blocked += 1
                    continue
                if qos:
                    conn.send_qos1(header, payloads[variant], now)
                else:
                    conn.write(header + payloads[variant])
                counters.sent += 1
            await asyncio.sleep(self.tick)
