"""Health and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from webui.auth import ANY

__all__ = ["healthz", "metrics"]


@get("/healthz", opt={"public": True}, tags=["system"], summary="Component states and counters (no auth)")
async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    gw = request.app.state.gateway
    body = gw.health()
    body["store"] = {
        "used_bytes": await gw.db_used_bytes(),
        "budget_bytes": gw.cfg.store.max_db_mb * 1024 * 1024,
    }
    return Response(body, status_code=200 if body["status"] == "ok" else 503)


@get("/metrics", opt={"roles": ANY}, tags=["system"], summary="Prometheus text exposition")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw = request.app.state.gateway
    gw.metrics.ingest_queue.set(gw.broker.queued_messages() if gw.broker else 0)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
