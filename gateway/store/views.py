"""Read-only queries the JSON API and the pages share: a device's measurements, events and commands; figures.

Every function takes a sqlite3 connection (the reader's, inside one snapshot) and only reads.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateway.commands import COMMAND_COLUMNS, CommandRow, command_row

__all__ = [
    "call_counts",
    "device_commands",
    "device_events",
    "device_metrics",
    "measurements",
    "traffic_per_minute",
]


def measurements(
    conn: sqlite3.Connection,
    device_id: str,
    metric: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Oldest first: from `since` if given, else the latest `limit` rows."""
    where: list[str] = ["device_id = ?"]
    params: list[Any] = [device_id]
    if metric is not None:
        where.append("metric = ?")
        params.append(metric)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts <= ?")
        params.append(until)
    clause = " AND ".join(where)
    if since is not None:
        sql = f"SELECT ts, metric, value FROM measurements WHERE {clause} ORDER BY ts, id LIMIT ?"
    else:
        sql = (
            f"SELECT ts, metric, value FROM (SELECT id, ts, metric, value FROM measurements WHERE {clause} "
            "ORDER BY ts DESC, id DESC LIMIT ?) ORDER BY ts, id"
        )
    rows = conn.execute(sql, [*params, limit]).fetchall()
    return [{"ts": ts, "metric": m, "value": v} for ts, m, v in rows]


def device_metrics(conn: sqlite3.Connection, device_id: str) -> list[str]:
    """The metric names in a device's latest 10,000 measurements (bounded: the (device_id, ts) index gives the
    latest rows, not the distinct names)."""
    rows = conn.execute(
        "SELECT DISTINCT metric FROM (SELECT metric FROM measurements WHERE device_id = ? ORDER BY ts DESC "
        "LIMIT 10000) ORDER BY metric",
        (device_id,),
    ).fetchall()
    return [r[0] for r in rows]


def device_events(conn: sqlite3.Connection, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """A device's events (presses, presence changes), newest first, with their payload fields."""
    rows = conn.execute(
        "SELECT id, type, ts, received_at, sequence_id, payload FROM events WHERE device_id = ? "
        "ORDER BY ts DESC, id DESC LIMIT ?",
        (device_id, limit),
    ).fetchall()
    return [
        {
            **json.loads(payload),
            "id": id_,
            "device_id": device_id,
            "type": kind,
            "ts": ts,
            "received_at": received_at,
            "sequence_id": seq,
        }
        for id_, kind, ts, received_at, seq, payload in rows
    ]


def device_commands(conn: sqlite3.Connection, device_id: str, limit: int = 100) -> list[CommandRow]:
    """Commands sent to a device, newest first, with their ack (status, detail, acked_at)."""
    rows = conn.execute(
        f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ? ORDER BY created_at DESC LIMIT ?",
        (device_id, limit),
    ).fetchall()
    return [command_row(tuple(r)) for r in rows]


def call_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Calls not yet completed or cancelled, by state (open: nobody accepted yet)."""
    counts = {"open": 0, "accepted": 0}
    for state, n in conn.execute(
        "SELECT state, count(*) FROM calls WHERE state IN ('open', 'accepted') GROUP BY state"
    ):
        counts[state] = n
    return counts


def _first_id_at(conn: sqlite3.Connection, ts: float) -> int | None:
    """The first traffic row at or after `ts`, by binary search on the rowid (rows are appended in time order,
    and the table has no index on ts: a scan would read every payload)."""
    lo, hi = conn.execute("SELECT (SELECT min(id) FROM traffic), (SELECT max(id) FROM traffic)").fetchone()
    if lo is None:
        return None
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute("SELECT id, ts FROM traffic WHERE id >= ? ORDER BY id LIMIT 1", (mid,)).fetchone()
        if row is None or row[1] >= ts:
            hi = mid
        else:
            lo = row[0] + 1
    return int(lo)


def traffic_per_minute(
    conn: sqlite3.Connection, now: float, minutes: int = 60
) -> tuple[list[int | None], float | None]:
    """Messages logged per minute over the last `minutes`, oldest first, and when the log starts.

    Minutes before the oldest row still in the log are None (not known, rather than zero): the log keeps
    `store.traffic_rows` rows and at most `store.traffic_rate` a second, so these are logged messages.
    """
    since = now - minutes * 60
    oldest = conn.execute("SELECT ts FROM traffic ORDER BY id LIMIT 1").fetchone()
    start = _first_id_at(conn, since)
    counts: list[int | None] = [0] * minutes
    if oldest is None or start is None:
        return counts, None
    for bucket, n in conn.execute(
        "SELECT CAST((ts - ?) / 60 AS INTEGER), count(*) FROM traffic WHERE id >= ? AND ts >= ? GROUP BY 1",
        (since, start, since),
    ):
        if 0 <= bucket < minutes:
            counts[bucket] = n
    known_from = int((oldest[0] - since) // 60)
    for i in range(min(max(known_from, 0), minutes)):
        counts[i] = None
    return counts, float(oldest[0])
