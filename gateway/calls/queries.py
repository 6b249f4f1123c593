"""Reading calls for the API and the pages: lists, one call with its timeline, and response-time figures."""

from __future__ import annotations

import json
import sqlite3
import statistics
from typing import Any

from gateway.calls.model import CALL_COLUMNS, call_row
from gateway.errors import NotFound, RegistryError
from gateway.models import PRIORITIES

__all__ = ["STATES", "call_detail", "call_stats", "list_calls"]

STATES = ("open", "accepted", "completed", "cancelled")


def list_calls(
    conn: sqlite3.Connection,
    states: list[str] | None = None,
    site: str | None = None,
    room: str | None = None,
    since: float | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Newest first."""
    where: list[str] = []
    params: list[Any] = []
    if states:
        unknown = [s for s in states if s not in STATES]
        if unknown:
            raise RegistryError(f"unknown state {', '.join(unknown)} (states: {', '.join(STATES)})")
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    for column, value in (("site", site), ("room", room)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("created_at >= ?")
        params.append(since)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        f"SELECT {CALL_COLUMNS} FROM calls{clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit)
    ).fetchall()
    return [call_row(r).as_dict() for r in rows]


def call_detail(conn: sqlite3.Connection, call_id: int) -> dict[str, Any]:
    row = conn.execute(f"SELECT {CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)).fetchone()
    if row is None:
        raise NotFound(f"call {call_id} does not exist")
    timeline = [
        {"ts": ts, "kind": kind, "actor": actor, "detail": json.loads(detail)}
        for ts, kind, actor, detail in conn.execute(
            "SELECT ts, kind, actor, detail FROM call_timeline WHERE call_id = ? ORDER BY id", (call_id,)
        )
    ]
    notifies = [
        {
            "command_id": command_id,
            "device_id": device_id,
            "role": role,
            "state": state,
            "created_at": created_at,
            "sent_at": sent_at,
            "status": status,
            "received_at": received_at,
            "answered_at": answered_at,
        }
        for command_id, device_id, role, state, created_at, sent_at, status, received_at, answered_at in conn.execute(
            "SELECT command_id, device_id, role, state, created_at, sent_at, status, received_at, answered_at "
            "FROM call_notifies WHERE call_id = ? ORDER BY created_at, rowid",
            (call_id,),
        )
    ]
    return {**call_row(row).as_dict(), "timeline": timeline, "notifies": notifies}


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "p90": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]  # nearest rank
    return {"count": len(ordered), "median": round(statistics.median(ordered), 3), "p90": round(p90, 3)}


def call_stats(conn: sqlite3.Connection, since: float) -> dict[str, Any]:
    """Counts by priority and state, time to accept and to complete (from creation), calls escalated and
    escalation steps taken, and missed calls (overdue before anyone accepted)."""
    rows = conn.execute(
        "SELECT priority, state, created_at, accepted_at, completed_at, escalation FROM calls WHERE created_at >= ?",
        (since,),
    ).fetchall()
    by_priority = dict.fromkeys(PRIORITIES, 0)
    by_state = dict.fromkeys(STATES, 0)
    accept: list[float] = []
    complete: list[float] = []
    for priority, state, created_at, accepted_at, completed_at, _ in rows:
        by_priority[priority] += 1
        by_state[state] += 1
        if accepted_at is not None:
            accept.append(accepted_at - created_at)
        if completed_at is not None:
            complete.append(completed_at - created_at)
    return {
        "since": since,
        "total": len(rows),
        "by_priority": by_priority,
        "by_state": by_state,
        "accept_s": _spread(accept),
        "complete_s": _spread(complete),
        "escalated": sum(1 for r in rows if r[5] >= 1),
        "escalations": conn.execute(
            "SELECT count(*) FROM call_timeline t JOIN calls c ON c.id = t.call_id "
            "WHERE t.kind = 'escalated' AND c.created_at >= ?",
            (since,),
        ).fetchone()[0],
        "missed": sum(1 for r in rows if r[5] >= 3),
    }
