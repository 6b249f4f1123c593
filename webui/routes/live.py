"""The live bus over Server-Sent Events: every hub event as `event: <kind>` / `data: <json>`.

The stream first sends the comment `: subscribed` (the subscription exists from then on, so a client can
start acting), then one message per hub event, and a `: keepalive` comment after 15 idle seconds. It ends
within a fraction of a second once the gateway starts stopping: uvicorn would otherwise wait out its
graceful-shutdown timeout for the open stream (PITFALLS, uvicorn). A client too slow to read loses events
(the hub counts them in `bosun_drops{reason="hub_subscriber_full"}`); it never slows ingest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.response import ServerSentEvent, ServerSentEventMessage

from webui.auth import ANY

__all__ = ["live"]

POLL_S = 0.1  # how often an idle stream checks whether the gateway is stopping
KEEPALIVE_S = 15.0


def _stopping(gateway: Any) -> bool:
    return gateway.state.get("api") in ("stopping", "stopped")


def _message(kind: str, data: dict[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(event=kind, data=json.dumps(data, default=str, separators=(",", ":")))


async def _events(gateway: Any) -> AsyncIterator[ServerSentEventMessage]:
    async with gateway.hub.subscribe() as queue:
        yield ServerSentEventMessage(data=None, comment="subscribed")
        idle = 0.0
        while not _stopping(gateway):
            try:
                kind, data = queue.get_nowait()  # no timer while events are waiting
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(POLL_S):
                        kind, data = await queue.get()
                except TimeoutError:
                    idle += POLL_S
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield ServerSentEventMessage(data=None, comment="keepalive")
                    continue
            idle = 0.0
            yield _message(kind, data)


@get(
    "/api/v1/live",
    opt={"roles": ANY},
    tags=["live"],
    summary="Server-Sent Events of the live bus: `event: <kind>` (event.press, device.status, ...), `data: <json>`",
)
async def live(request: Request[Any, Any, Any]) -> ServerSentEvent:
    return ServerSentEvent(_events(request.app.state.gateway))
