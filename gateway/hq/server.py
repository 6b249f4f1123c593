"""HQ's HTTP(S) server: uvicorn on our own signals, with TLS and client certificates when asked (mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

__all__ = ["HqServer"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # `bosun hq` owns SIGTERM/SIGINT; uvicorn's handler would re-raise them after serving (PITFALLS)
        yield


class HqServer:
    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        cert: str | None = None,
        key: str | None = None,
        client_ca: str | None = None,
    ) -> None:
        tls: dict[str, Any] = {}
        if cert:
            tls = {"ssl_certfile": cert, "ssl_keyfile": key}
            if client_ca:
                # mutual TLS: a gateway must also show a certificate signed by this CA (besides its token)
                tls |= {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
            server_header=False,
            **tls,
        )
        self.scheme = "https" if cert else "http"
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="bosun-hq-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind or certificate error
                raise OSError("the HTTP server stopped during start-up (see the log above)")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        sock: socket.socket = self._server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
