"""uvicorn inside our event loop, on our signals (pinned uvicorn: capture_signals is undocumented)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

__all__ = ["WebServer"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # the gateway's runtime owns SIGTERM/SIGINT; uvicorn's own handler would re-raise them after serving
        yield


class WebServer:
    """`tls`: uvicorn's ssl_* settings (certificate, key, client CA for mutual TLS), or nothing for plain HTTP."""

    def __init__(
        self, app: Any, host: str, port: int, tls: dict[str, Any] | None = None, name: str = "bosun-http"
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
            server_header=False,
            **(tls or {}),
        )
        self.scheme = "https" if tls else "http"
        self._name = name
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name=self._name)
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind or certificate error
                raise RuntimeError("HTTP server stopped during start-up (see the log above)")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        sock: socket.socket = self._server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
