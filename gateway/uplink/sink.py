"""Where batches go: the interface every sink implements and the errors it may raise.

    SinkError            base: the batch was not confirmed
      TransientError     try again later (network down, timeout, HTTP 408/429/5xx); may carry retry_after
      RefusedError       HQ rejected this batch for good (HTTP 4xx other than 408/429): the lane stops with it

Sinks translate their library's exceptions into these, and nothing else escapes `send`.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from gateway.config import UplinkSection
from gateway.errors import BosunError, ConfigError

__all__ = ["RefusedError", "Sink", "SinkError", "TransientError", "tls_context"]


class SinkError(BosunError):
    """A batch was not confirmed by the far end."""


class TransientError(SinkError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RefusedError(SinkError):
    """The far end refused the batch for good; retrying the same bytes cannot help."""


class Sink(Protocol):
    async def send(self, lane: str, key: str, payload: bytes, last: int) -> int:
        """Deliver one batch; return the highest sequence of `lane` the far end has stored."""
        ...

    async def close(self) -> None: ...


def tls_context(cfg: UplinkSection) -> ssl.SSLContext:
    """Server verification against ca_file (or the system store) and, with client_cert, mutual TLS."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        if cfg.client_cert:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"uplink: cannot load the TLS files (ca_file, client_cert, client_key): {exc}") from None
    return ctx
