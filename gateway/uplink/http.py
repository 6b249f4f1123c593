"""The HTTP sink: `POST {url}/api/v1/ingest` with httpx, one batch per request, bearer token per gateway."""

from __future__ import annotations

import logging

import httpx

from gateway.config import UplinkSection
from gateway.uplink.policy import retry_after
from gateway.uplink.sink import RefusedError, TransientError, tls_context

__all__ = ["CONTENT_TYPE", "HttpSink"]

CONTENT_TYPE = "application/vnd.bosun.batch"  # zlib-compressed msgpack (gateway/uplink/batch.py)
_RETRY = {408, 429}  # issue 6: every other 4xx stops the lane
# httpx logs every request at INFO: at full drain speed that is ten lines a second of nothing new
logging.getLogger("httpx").setLevel(logging.WARNING)


class HttpSink:
    def __init__(self, cfg: UplinkSection, transport: httpx.AsyncBaseTransport | None = None) -> None:
        verify = tls_context(cfg) if cfg.url.startswith("https:") else True
        self._url = cfg.url.rstrip("/") + "/api/v1/ingest"
        headers = {"Content-Type": CONTENT_TYPE}
        if cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=cfg.timeout_s, verify=verify, transport=transport, trust_env=False
        )

    async def send(self, lane: str, key: str, payload: bytes, last: int) -> int:
        try:
            response = await self._client.post(self._url, content=payload, headers={"Idempotency-Key": key})
        except httpx.TimeoutException:
            raise TransientError(f"HQ did not answer within the timeout ({self._url})") from None
        except httpx.HTTPError as exc:
            raise TransientError(f"HQ unreachable: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 200:
            try:
                acked = response.json()["acked"]
            except (ValueError, KeyError, TypeError):
                raise TransientError(f"HQ answered 200 without an acked sequence: {response.text[:200]!r}") from None
            if not isinstance(acked, int):
                raise TransientError(f"HQ answered a non-integer acked sequence: {acked!r}")
            return acked
        message = _message(response)
        if status in _RETRY or status >= 500:
            raise TransientError(f"HQ answered {status}: {message}", retry_after(response.headers.get("retry-after")))
        raise RefusedError(f"HQ refused the batch {key} with {status}: {message}")

    async def close(self) -> None:
        await self._client.aclose()


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return str(body)[:300]
