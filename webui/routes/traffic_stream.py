"""Following the traffic log: its rows by topic filter (history, newest first) and as a live SSE stream.

The stream polls the `traffic` table by id on the reader (every POLL_S) instead of hooking the ingest path, so
watching traffic costs ingest nothing. Each row goes out as `event: traffic`, `id: <row id>`, `data: <json>`;
a browser that reconnects sends `Last-Event-ID` and resumes after it. When more rows match in one poll than
a browser can usefully show (BATCH), the oldest are skipped and an `event: skipped` says how many.
Payloads are pretty-printed here, once, for the page and the stream alike: JSON indented, msgpack decoded
when the topic ends in `.mp`, other UTF-8 as text, anything else as hex.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.response import ServerSentEvent, ServerSentEventMessage

from gateway.codec import decode
from gateway.errors import PayloadError, RegistryError
from gateway.topics import filter_matches, valid_filter
from webui.auth import STAFF

__all__ = ["check_filter", "history", "latest_id", "pretty", "traffic_stream"]

POLL_S = 0.25
KEEPALIVE_S = 15.0
BATCH = 200  # most rows one poll sends; a burst beyond it is skipped and counted
EXAMINE = 5000  # most rows one query looks at
_COLUMNS = "id, ts, direction, client_id, topic, qos, retain, size, payload, error"


def check_filter(text: str | None) -> str | None:
    """The filter to apply (None: everything), or RegistryError saying what is wrong with it."""
    value = (text or "").strip()
    if not value:
        return None
    if not valid_filter(value):
        raise RegistryError(
            f"{value!r} is not an MQTT topic filter: '+' matches exactly one whole level (a/+/c), "
            "'#' all remaining levels and only as the whole last level (a/b/#)"
        )
    return value


def _hex(raw: bytes) -> str:
    return "\n".join(raw[i : i + 16].hex(" ") for i in range(0, len(raw), 16))


def _printable(text: str) -> bool:
    return not any((ch < " " and ch not in "\t\n\r") or ch == "\x7f" for ch in text)


def _json(value: Any) -> str:
    return json.dumps(
        value, indent=2, ensure_ascii=False, default=lambda v: v.hex() if isinstance(v, bytes) else repr(v)
    )


def pretty(topic: str, raw: bytes | None) -> tuple[str, str]:
    """(format, text) of a payload: ("json" | "msgpack" | "text" | "hex" | "empty", what a person reads)."""
    if not raw:
        return "empty", ""
    if topic.endswith(".mp"):
        try:
            return "msgpack", _json(decode(raw, msgpack_payload=True))
        except PayloadError:
            return "hex", _hex(raw)
    try:
        value = decode(raw)
    except PayloadError as exc:
        text = raw.decode("utf-8") if exc.reason == "bad_json" else ""
        # text that looks like JSON but is not (or was cut short by the log) is still read as text
        return ("text", text) if text and _printable(text) else ("hex", _hex(raw))
    if isinstance(value, dict | list):
        return "json", _json(value)
    text = raw.decode("utf-8")
    return ("text", text) if _printable(text) else ("hex", _hex(raw))


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    id_, ts, direction, client_id, topic, qos, retain, size, payload, error = r
    kind, text = pretty(topic, payload)
    return {
        "id": id_,
        "ts": ts,
        "direction": direction,
        "client_id": client_id,
        "topic": topic,
        "qos": qos,
        "retain": bool(retain),
        "size": size,
        "truncated": payload is not None and len(payload) < size,  # the log keeps store.traffic_payload_bytes
        "error": error,
        "format": kind,
        "payload": text,
    }


def _narrow(flt: str | None) -> tuple[str, list[Any]]:
    """SQL that narrows the rows a filter can match (exact topic, or the literal prefix before a wildcard)."""
    if flt is None:
        return "", []
    if "+" not in flt and "#" not in flt:
        return " AND topic = ?", [flt]
    prefix = flt.split("+", 1)[0].split("#", 1)[0]
    if not prefix:
        return "", []
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return " AND topic LIKE ? ESCAPE '\\'", [escaped + "%"]  # case-blind: filter_matches decides


def _full(conn: sqlite3.Connection, ids: list[int], newest_first: bool) -> list[dict[str, Any]]:
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    order = "DESC" if newest_first else "ASC"
    rows = conn.execute(f"SELECT {_COLUMNS} FROM traffic WHERE id IN ({marks}) ORDER BY id {order}", ids)
    return [_row(tuple(r)) for r in rows]


def latest_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM traffic").fetchone()[0])


def history(
    conn: sqlite3.Connection, flt: str | None, before: int | None = None, limit: int = 100, budget: int = 100_000
) -> tuple[list[dict[str, Any]], int | None]:
    """Matching rows older than `before`, newest first, and the `before` of the next page (None at the end).

    At most `budget` candidate rows are looked at; past it the next page continues where this one stopped.
    """
    clause, params = _narrow(flt)
    cursor = before if before is not None else latest_id(conn) + 1
    found: list[int] = []
    examined = 0
    while True:
        chunk = conn.execute(
            f"SELECT id, topic FROM traffic WHERE id < ?{clause} ORDER BY id DESC LIMIT ?", [cursor, *params, EXAMINE]
        ).fetchall()
        for id_, topic in chunk:
            cursor = id_
            if flt is None or filter_matches(flt, topic):
                found.append(id_)
                if len(found) == limit:
                    return _full(conn, found, True), id_
        examined += len(chunk)
        if len(chunk) < EXAMINE:
            return _full(conn, found, True), None
        if examined >= budget:
            return _full(conn, found, True), cursor


def follow(conn: sqlite3.Connection, flt: str | None, after: int) -> tuple[list[dict[str, Any]], int, int, bool]:
    """Matching rows newer than `after`, oldest first: (rows, new cursor, rows skipped, more waiting)."""
    top = latest_id(conn)
    clause, params = _narrow(flt)
    chunk = conn.execute(
        f"SELECT id, topic FROM traffic WHERE id > ? AND id <= ?{clause} ORDER BY id LIMIT ?",
        [after, top, *params, EXAMINE],
    ).fetchall()
    more = len(chunk) == EXAMINE
    cursor = chunk[-1][0] if more else top
    ids = [id_ for id_, topic in chunk if flt is None or filter_matches(flt, topic)]
    skipped = max(0, len(ids) - BATCH)
    return _full(conn, ids[skipped:], False), cursor, skipped, more


def _stopping(gateway: Any) -> bool:
    return gateway.state.get("api") in ("stopping", "stopped")


async def _follow(gateway: Any, flt: str | None, after: int | None) -> AsyncIterator[ServerSentEventMessage]:
    cursor = after if after is not None else await gateway.reader.call(latest_id)
    yield ServerSentEventMessage(data=json.dumps({"after": cursor, "filter": flt}), event="ready", id=cursor)
    idle = 0.0
    while not _stopping(gateway):
        rows, cursor, skipped, more = await gateway.reader.call(lambda c, at=cursor: follow(c, flt, at))
        if skipped:
            yield ServerSentEventMessage(data=json.dumps({"count": skipped}), event="skipped")
        for row in rows:
            yield ServerSentEventMessage(
                data=json.dumps(row, separators=(",", ":"), ensure_ascii=False), event="traffic", id=row["id"]
            )
        if rows or skipped:
            idle = 0.0
        if more:
            continue  # a backlog (a resumed pause): read on without waiting
        await asyncio.sleep(POLL_S)
        idle += POLL_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            # the cursor moves on even when nothing matched: a reconnect resumes from here, not from the start
            yield ServerSentEventMessage(data=None, comment="keepalive", id=cursor)


def _int(value: str | None) -> int | None:
    try:
        return max(0, int(value)) if value else None
    except ValueError:
        raise RegistryError(f"{value!r} is not a traffic row id") from None


@get(
    "/api/v1/traffic/stream",
    opt={"roles": STAFF},
    tags=["traffic"],
    summary="Server-Sent Events of new traffic log rows matching `topic` (an MQTT filter), after row id `after`",
)
async def traffic_stream(
    request: Request[Any, Any, Any], topic: str | None = None, after: str | None = None
) -> ServerSentEvent:
    flt = check_filter(topic)
    resumed = _int(request.headers.get("last-event-id"))  # EventSource's own reconnect
    start = resumed if resumed is not None else _int(after)
    return ServerSentEvent(_follow(request.app.state.gateway, flt, start))
