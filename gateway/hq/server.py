"""HQ's HTTP(S) server: the gateway's WebServer (uvicorn on our own signals) with TLS and client certificates
when asked (mTLS)."""

from __future__ import annotations

import ssl
from typing import Any

from gateway.webserver import WebServer

__all__ = ["HqServer"]


class HqServer(WebServer):
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
        super().__init__(app, host, port, tls, name="bosun-hq-http")
