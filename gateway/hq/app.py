"""The reference HQ receiver's HTTP API (Litestar): batches in, a small read API and a status page out.

`POST /api/v1/ingest` takes one batch (gateway/uplink/batch.py) with `Authorization: Bearer <gateway token>`
and `Idempotency-Key`; it answers `{"gateway", "lane", "acked", "stored", "duplicate"}`, where `acked` is the
highest sequence of that lane HQ has stored. A refused batch gets a 4xx naming what is wrong, is recorded as
that gateway's last error, and touches nothing else: other gateways go on.
"""

from __future__ import annotations

import base64
import html
import json
import sqlite3
from typing import Annotated, Any

from litestar import MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import Parameter

from gateway import __version__
from gateway.hq import db
from gateway.hq.store import HqStore, WrongGateway
from gateway.uplink.batch import BatchError
from gateway.webapp import App

__all__ = ["create_hq_app"]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    return Response({"status_code": status, "message": message}, status_code=status, headers=headers)


def _store(request: Request[Any, Any, Any]) -> HqStore:
    store: HqStore = request.app.state.store
    return store


@post("/api/v1/ingest", summary="One batch from a gateway", status_code=200, opt={"public": True})
async def ingest(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    store = _store(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _error(401, "a gateway token is required: Authorization: Bearer <token> (bosun hq gateway add ID)")
    gateway_id = await store.gateway_for_token(token.strip())
    if gateway_id is None:
        return _error(401, "the gateway token is unknown (bosun hq gateway add ID prints one)")
    key = request.headers.get("idempotency-key", "")
    if not key:
        return _error(400, "an Idempotency-Key header is required (gateway id:lane:first-last)")
    limit: int = request.app.state.max_batch_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, f"batch of {declared} bytes exceeds this HQ's limit of {limit} bytes (--max-batch-mb)")
    payload = await request.body()
    if len(payload) > limit:
        return _error(413, f"batch of {len(payload)} bytes exceeds this HQ's limit of {limit} bytes (--max-batch-mb)")
    try:
        answer = await store.ingest(gateway_id, key, payload)
    except WrongGateway as exc:
        return _error(403, str(exc))
    except db.EpochChanged as exc:
        return _error(409, str(exc))
    except BatchError as exc:
        return _error(400, f"batch refused: {exc}")
    return Response(answer, status_code=200)


@get("/api/v1/gateways", summary="Every gateway with its lanes (highest stored sequence, records, bytes) and losses")
async def list_gateways(request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
    return await _store(request).read(db.gateways)


async def _known(store: HqStore, gateway_id: str) -> None:
    found = await store.read(lambda c: c.execute("SELECT 1 FROM gateways WHERE id = ?", (gateway_id,)).fetchone())
    if found is None:
        raise HTTPException(status_code=404, detail=f"gateway {gateway_id} does not exist")


@get("/api/v1/gateways/{gateway_id:str}/calls", summary="Crew calls of a gateway, latest state, newest first")
async def gateway_calls(
    request: Request[Any, Any, Any], gateway_id: str, limit: Annotated[int, Parameter(ge=1, le=10_000)] = 500
) -> list[dict[str, Any]]:
    store = _store(request)
    await _known(store, gateway_id)
    rows = await store.read(
        lambda c: c.execute(
            "SELECT body FROM calls WHERE gateway_id = ? ORDER BY call_id DESC LIMIT ?", (gateway_id, limit)
        ).fetchall()
    )
    return [json.loads(r[0]) for r in rows]


@get(
    "/api/v1/gateways/{gateway_id:str}/measurements",
    summary="Measurements of a gateway in its order: {ts, device_id, metric, value}; after= pages by seq",
)
async def gateway_measurements(
    request: Request[Any, Any, Any],
    gateway_id: str,
    metric: str | None = None,
    device_id: str | None = None,
    after: int = 0,
    limit: Annotated[int, Parameter(ge=1, le=100_000)] = 1000,
) -> list[dict[str, Any]]:
    store = _store(request)
    await _known(store, gateway_id)
    where, params = ["gateway_id = ?", "seq > ?"], [gateway_id, after]
    for column, value in (("metric", metric), ("device_id", device_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    rows = await store.read(
        lambda c: c.execute(
            f"SELECT ts, device_id, metric, value FROM measurements WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()
    )
    return [{"ts": ts, "device_id": d, "metric": m, "value": v} for ts, d, m, v in rows]


@get("/api/v1/gateways/{gateway_id:str}/records", summary="Outbox records (calls, audit, state, losses) in order")
async def gateway_records(
    request: Request[Any, Any, Any],
    gateway_id: str,
    lane: str | None = None,
    kind: str | None = None,
    after: int = 0,
    limit: Annotated[int, Parameter(ge=1, le=100_000)] = 1000,
) -> list[dict[str, Any]]:
    store = _store(request)
    await _known(store, gateway_id)
    where, params = ["gateway_id = ?", "id > ?"], [gateway_id, after]
    for column, value in (("lane", lane), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)

    def query(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
        return c.execute(
            "SELECT id, lane, seq, kind, device_id, created_at, body FROM records "
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()

    return [
        {"id": i, "lane": ln, "seq": s, "kind": k, "device_id": d, "created_at": t, "body": json.loads(b)}
        for i, ln, s, k, d, t, b in await store.read(query)
    ]


@get("/healthz", summary="HQ is up", opt={"public": True})
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@get("/", media_type=MediaType.HTML, summary="Status page: every gateway, its lanes and its last error")
async def status_page(request: Request[Any, Any, Any]) -> str:
    rows = []
    for g in await _store(request).read(db.gateways):
        lanes = ", ".join(f"{lane}: {v['records']} (seq {v['acked']})" for lane, v in sorted(g["lanes"].items()))
        lost = sum(g["lost"].values())
        cells = [g["id"], g["last_seen"] and f"{g['last_seen']:.0f}", lanes, lost, g["last_error"] or ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c or ''))}</td>" for c in cells) + "</tr>")
    return (
        "<!doctype html><meta charset=utf-8><title>Bosun HQ</title><h1>Bosun HQ</h1>"
        "<table border=1 cellpadding=4><tr><th>gateway<th>last seen (unix)<th>records by lane<th>lost<th>last error"
        + "".join(rows)
        + "</table>"
    )


async def _reader_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The read API and the status page want a reader token (`bosun hq token create`): as a bearer token, or as
    the password of HTTP Basic so a browser can open the status page. Ingest checks gateway tokens itself."""
    if handler.opt.get("public") or connection.scope["path"].startswith("/schema"):
        return  # the OpenAPI document is public documentation
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    token = credentials.strip()
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            token = ""
    elif scheme.lower() != "bearer":
        token = ""
    store: HqStore = connection.app.state.store
    if not token or not await store.is_reader(token):
        raise NotAuthorizedException(
            "a reader token is required: Authorization: Bearer <token> (bosun hq token create)",
            headers={"WWW-Authenticate": 'Basic realm="bosun hq: any user name, a reader token as password"'},
        )


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


def create_hq_app(store: HqStore, max_batch_bytes: int) -> App:
    return App(
        route_handlers=[
            ingest,
            list_gateways,
            gateway_calls,
            gateway_measurements,
            gateway_records,
            healthz,
            status_page,
        ],
        guards=[_reader_guard],
        exception_handlers={HTTPException: _http_error},
        state=State({"store": store, "max_batch_bytes": max_batch_bytes}),
        # Litestar refuses bigger bodies itself (413) before our handler reads them
        request_max_body_size=max_batch_bytes + 1,
        openapi_config=OpenAPIConfig(
            title="Bosun HQ API",
            version=__version__,
            path="/schema",
            render_plugins=[JsonRenderPlugin(path=["/"])],
        ),
        logging_config=None,
        debug=False,
    )
