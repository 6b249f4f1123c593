"""The audit log, newest first: who changed what, filtered by actor, action prefix, target prefix and time.

Pages are keyset pages on the row id (`before` / `after`), so a page stays put while new rows arrive and
deep pages cost what the first one does.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from litestar import get
from litestar.response import Template

from webui.auth import ADMIN
from webui.pages.base import PAGE, Req, render

__all__ = ["AuditFilter", "audit_page", "read_audit"]

PAGE_ROWS = 50


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None  # exactly this person (or "system", "test", a device)
    action: str | None = None  # prefix: "user." is every user change
    target: str | None = None  # prefix: "yacht/" is every room of the site yacht
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.actor:
            clauses.append("actor = ?")
            params.append(self.actor)
        for column, prefix in (("action", self.action), ("target", self.target)):
            if prefix:  # substr, not LIKE: case-sensitive and no wildcard characters to escape
                clauses.append(f"substr({column}, 1, ?) = ?")
                params += [len(prefix), prefix]
        if self.since is not None:
            clauses.append("ts >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("ts < ?")
            params.append(self.until)
        return " AND ".join(clauses) or "1", params


def read_audit(
    conn: sqlite3.Connection, flt: AuditFilter, before: int | None = None, after: int | None = None, limit: int = 50
) -> tuple[list[dict[str, Any]], bool, bool]:
    """One page, newest first: (rows, newer rows exist, older rows exist)."""
    where, params = flt.where()
    if after is not None:
        rows = conn.execute(
            f"SELECT id, ts, actor, action, target, detail FROM audit_log WHERE {where} AND id > ? ORDER BY id LIMIT ?",
            [*params, after, limit + 1],
        ).fetchall()
        newer = len(rows) > limit
        rows = list(reversed(rows[:limit]))
    else:
        rows = conn.execute(
            f"SELECT id, ts, actor, action, target, detail FROM audit_log WHERE {where}"
            f"{' AND id < ?' if before is not None else ''} ORDER BY id DESC LIMIT ?",
            [*params, *([before] if before is not None else []), limit + 1],
        ).fetchall()
        newer = False
        rows = rows[:limit]
    if rows and after is None:
        newer = _exists(conn, where, params, "id > ?", rows[0][0])
    older = bool(rows) and _exists(conn, where, params, "id < ?", rows[-1][0])
    return [_row(r) for r in rows], newer, older


def _exists(conn: sqlite3.Connection, where: str, params: list[Any], edge: str, value: int) -> bool:
    found = conn.execute(f"SELECT 1 FROM audit_log WHERE {where} AND {edge} LIMIT 1", [*params, value]).fetchone()
    return found is not None


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    id_, ts, actor, action, target, detail = r
    try:
        fields = json.loads(detail)
    except ValueError:
        fields = detail
    shown = (
        ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items())
        if isinstance(fields, dict)
        else str(fields)
    )
    return {"id": id_, "ts": ts, "actor": actor, "action": action, "target": target, "detail": shown}


def _time(value: str | None, name: str) -> float | None:
    """A datetime-local field (`2025-06-01T14:30`, local time) or a date, as a Unix time."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"{name}: expected a date and time like 2025-06-01T14:30, got {value!r}") from None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@get("/audit", opt=PAGE(*ADMIN))
async def audit_page(request: Req) -> Template:
    q = request.query_params
    fields = {k: (q.get(k) or "").strip() for k in ("actor", "action", "target", "since", "until")}
    error = None
    try:
        flt = AuditFilter(
            fields["actor"] or None,
            fields["action"] or None,
            fields["target"] or None,
            _time(fields["since"], "from"),
            _time(fields["until"], "until"),
        )
    except ValueError as exc:
        flt, error = AuditFilter(), str(exc)
    before, after = _int(q.get("before")), _int(q.get("after"))

    def read(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], bool, bool, list[str], list[str]]:
        rows, newer, older = read_audit(conn, flt, before, after, PAGE_ROWS)
        actors = [r[0] for r in conn.execute("SELECT DISTINCT actor FROM audit_log ORDER BY 1 LIMIT 200")]
        actions = [r[0] for r in conn.execute("SELECT DISTINCT action FROM audit_log ORDER BY 1 LIMIT 200")]
        return rows, newer, older, actors, actions

    if error is not None:
        rows, newer, older, actors, actions = [], False, False, [], []
    else:
        rows, newer, older, actors, actions = await request.app.state.gateway.reader.call(read)
    query = {k: v for k, v in fields.items() if v}
    links = {
        "newest": f"/audit?{urlencode(query)}" if before is not None or after is not None else None,
        "newer": f"/audit?{urlencode({**query, 'after': rows[0]['id']})}" if newer else None,
        "older": f"/audit?{urlencode({**query, 'before': rows[-1]['id']})}" if older else None,
    }
    return render(
        request,
        "audit.html",
        status_code=400 if error else 200,
        rows=rows,
        newer=newer,
        older=older,
        filters=fields,
        links=links,
        error=error,
        actors=actors,
        actions=actions,
    )
