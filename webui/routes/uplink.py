"""The uplink's state: connected or not, backlog per lane, last error, and the offline runway."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from webui.auth import ANY

__all__ = ["uplink_status"]


@get(
    "/api/v1/uplink",
    opt={"roles": ANY},
    tags=["uplink"],
    summary="Uplink to HQ: connected, backlog per lane (records, bytes, oldest age), losses, last error, "
    "and runway_s (seconds until unsent telemetry would be evicted at the current rate; null: not growing)",
)
async def uplink_status(request: Request[Any, Any, Any]) -> dict[str, Any]:
    uplink = request.app.state.gateway.uplink
    await uplink.refresh()  # fresh figures, not the last 5-second snapshot
    body: dict[str, Any] = uplink.health()
    return body
