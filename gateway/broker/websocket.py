"""MQTT over WebSocket (the `ws` listener): the same Connection over a websockets ServerConnection."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from websockets.exceptions import ConnectionClosed

from gateway.broker.connection import _HIGH_WATER, Connection, Transport

__all__ = ["WsTransport"]


class WsTransport(Transport):
    def __init__(self, websocket: Any) -> None:  # no stream to wrap: Transport.__init__ is not called
        self._ws = websocket
        self._out: list[bytes] = []
        self._size = 0
        self._sending: asyncio.Task[None] | None = None
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._reading = asyncio.Event()
        self._reading.set()

    async def pump(self, conn: Connection) -> None:
        """Feed each message's bytes to `conn` until the socket closes, waiting while it has paused reading."""
        while True:
            await self._reading.wait()
            data = await self.read()
            if not data:
                return
            conn.feed(data)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def peer_certificate(self) -> dict[str, Any] | None:
        return None

    async def read(self) -> bytes:
        try:
            data = await self._ws.recv()
        except ConnectionClosed:
            return b""
        return data if isinstance(data, bytes) else data.encode()

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._out.append(data)
        self._size += len(data)
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send())

    def write_now(self, data: bytes) -> None:
        self.write(data)

    async def _send(self) -> None:
        try:
            while self._out:
                chunk = b"".join(self._out)
                self._out.clear()
                self._size = 0
                await self._ws.send(chunk)
        except ConnectionClosed:
            self._out.clear()
        finally:
            self._sending = None

    @property
    def congested(self) -> bool:
        return self._size >= _HIGH_WATER

    async def drained(self) -> None:
        while self._sending is not None:
            await asyncio.shield(self._sending)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True

        async def close() -> None:
            if self._sending is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._sending), 1)
            with contextlib.suppress(Exception):
                await self._ws.close()

        self._closer = asyncio.get_running_loop().create_task(close())

    def peer(self) -> str:
        info = self._ws.remote_address
        return f"{info[0]}:{info[1]}" if isinstance(info, tuple) else "?"
