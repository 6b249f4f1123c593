"""The MQTT bridge sink: each batch is one QoS 1 PUBLISH to `{topic_prefix}/{gateway id}/{lane}` on a fleet
broker (EMQX, HiveMQ, AWS IoT Core, Mosquitto); the cursor advances only on its PUBACK.

A client of its own, a few packets of MQTT 3.1.1 (CONNECT, PUBLISH QoS 1, PUBACK, PINGREQ, DISCONNECT), so
that a batch is confirmed exactly when the broker acknowledges it; the payload is the batch as sent over HTTP
(its header names the gateway, lane and sequence range: consumers deduplicate on them). One batch is in
flight at a time, so a lost connection can only repeat that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from urllib.parse import urlsplit

from gateway.broker.packets import CONNACK, PINGRESP, PUBACK, Malformed, Parser, encode_publish, topic_bytes
from gateway.config import UplinkSection
from gateway.errors import ConfigError
from gateway.uplink.sink import RefusedError, TransientError, tls_context

__all__ = ["MqttSink"]

_KEEPALIVE_S = 60
# section 3.2.2.3: CONNACK return codes
_REFUSED = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
            4: "bad user name or password", 5: "not authorized"}  # fmt: skip


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def encode_connect(client_id: str, username: str | None, password: str | None, keepalive: int) -> bytes:
    """CONNECT, MQTT 3.1.1 section 3.1: protocol level 4, clean session (the cursor is our session state)."""
    flags = 0x02
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    body = _string("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining(len(body)) + body


class MqttSink:
    def __init__(self, cfg: UplinkSection, gateway_id: str) -> None:
        parts = urlsplit(cfg.url)
        if not parts.hostname:
            raise ConfigError(f"uplink.url: no host in {cfg.url!r}")
        self._tls = tls_context(cfg) if parts.scheme == "mqtts" else None
        self._host = parts.hostname
        self._port = parts.port or (8883 if self._tls else 1883)
        self._cfg = cfg
        self._gateway_id = gateway_id
        self._username = parts.username or gateway_id
        self._password = parts.password or cfg.token or None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = Parser(1024 * 1024)
        self._pid = 0
        self._pinger: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=self._tls), self._cfg.timeout_s
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise TransientError(f"MQTT broker {self._host}:{self._port} unreachable: {exc}") from None
        self._reader, self._writer = reader, writer
        self._parser = Parser(1024 * 1024)
        writer.write(encode_connect(f"bosun-uplink-{self._gateway_id}", self._username, self._password, _KEEPALIVE_S))
        kind, body = await self._packet()
        if kind != CONNACK or len(body) != 2:
            await self._drop()
            raise TransientError(f"MQTT broker answered CONNECT with packet type {kind}")
        if body[1]:
            await self._drop()
            reason = _REFUSED.get(body[1], f"code {body[1]}")
            raise RefusedError(f"MQTT broker refused the connection: {reason}")
        self._pinger = asyncio.create_task(self._ping(), name="bosun-uplink-ping")

    async def _ping(self) -> None:
        # section 3.1.2.10: a client idle for the keep-alive interval must send PINGREQ
        while self._writer is not None:
            await asyncio.sleep(_KEEPALIVE_S / 2)
            if self._writer is not None:
                self._writer.write(b"\xc0\x00")

    async def _packet(self) -> tuple[int, bytes]:
        assert self._reader is not None
        while True:
            try:
                data = await asyncio.wait_for(self._reader.read(65536), self._cfg.timeout_s)
            except (OSError, TimeoutError) as exc:
                await self._drop()
                raise TransientError(f"MQTT broker connection lost: {exc!r}") from None
            if not data:
                await self._drop()
                raise TransientError("MQTT broker closed the connection")
            try:
                packets = self._parser.feed(data)
            except Malformed as exc:
                await self._drop()
                raise TransientError(f"MQTT broker sent a malformed packet: {exc}") from None
            for kind, _flags, body in packets:
                if kind != PINGRESP:
                    return kind, bytes(body)

    async def send(self, lane: str, key: str, payload: bytes, last: int) -> int:
        if self._writer is None:
            await self._connect()
        assert self._writer is not None
        self._pid = self._pid % 65535 + 1
        topic = f"{self._cfg.topic_prefix}/{self._gateway_id}/{lane}"
        self._writer.write(encode_publish(topic_bytes(topic), payload, 1, False, self._pid))
        while True:
            kind, body = await self._packet()
            # section 4.6: PUBACKs come in PUBLISH order; only our one message is in flight
            if kind == PUBACK and len(body) == 2 and (body[0] << 8 | body[1]) == self._pid:
                return last

    async def _drop(self) -> None:
        writer, self._writer = self._writer, None
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
            self._pinger = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.write(b"\xe0\x00")  # DISCONNECT, section 3.14
        await self._drop()
