"""Events and the traffic log."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from litestar import Request, get
from litestar.params import Parameter

from gateway.errors import RegistryError
from gateway.topics import filter_matches, valid_filter
from webui.auth import ANY, STAFF

__all__ = ["list_events", "list_traffic"]


@get(
    "/api/v1/events",
    opt={"roles": ANY},
    tags=["events"],
    summary="Events, newest first; each carries its payload fields (a press: sequence_id, press_type, priority)",
)
async def list_events(
    request: Request[Any, Any, Any],
    type: str | None = None,
    since: float | None = None,
    device_id: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=10_000)] = 500,
) -> list[dict[str, Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("type", type), ("device_id", device_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = await request.app.state.gateway.reader.fetchall(
        f"SELECT id, device_id, type, ts, received_at, sequence_id, payload FROM events {clause} "
        "ORDER BY ts DESC, id DESC LIMIT ?",
        [*params, limit],
    )
    out = []
    for id_, device, kind, ts, received_at, seq, payload in rows:
        fields = json.loads(payload)
        out.append(
            {
                **fields,
                "id": id_,
                "device_id": device,
                "type": kind,
                "ts": ts,
                "received_at": received_at,
                "sequence_id": seq,
            }
        )
    return out


def _payload_text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


@get(
    "/api/v1/traffic",
    opt={"roles": STAFF},
    tags=["traffic"],
    summary="The traffic log, newest first; `topic` is an MQTT filter (+ and # work)",
)
async def list_traffic(
    request: Request[Any, Any, Any],
    topic: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=10_000)] = 200,
) -> list[dict[str, Any]]:
    if topic is not None and not valid_filter(topic):
        raise RegistryError(f"{topic!r} is not a valid MQTT topic filter")
    reader = request.app.state.gateway.reader
    columns = "id, ts, direction, client_id, topic, qos, retain, size, payload, error"
    if topic is None or ("+" not in topic and "#" not in topic):
        clause, params = ("WHERE topic = ?", [topic]) if topic else ("", [])
        rows = await reader.fetchall(
            f"SELECT {columns} FROM traffic {clause} ORDER BY id DESC LIMIT ?", [*params, limit]
        )
    else:
        prefix = topic.split("+", 1)[0].split("#", 1)[0]
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        candidates = await reader.fetchall(
            f"SELECT {columns} FROM traffic WHERE topic LIKE ? ESCAPE '\\' ORDER BY id DESC LIMIT ?",
            [escaped + "%", limit * 20],
        )
        rows = [r for r in candidates if filter_matches(topic, r[4])][:limit]
    return [
        {
            "id": r[0],
            "ts": r[1],
            "direction": r[2],
            "client_id": r[3],
            "topic": r[4],
            "qos": r[5],
            "retain": bool(r[6]),
            "size": r[7],
            "payload": _payload_text(r[8]),
            "error": r[9],
        }
        for r in rows
    ]
