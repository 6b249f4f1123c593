"""Read-only queries the JSON API and the pages share: a device's measurements, events and commands; figures.

Every function takes a sqlite3 connection (the reader's, inside one snapshot) and only reads.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateway.commands import COMMAND_COLUMNS, CommandRow, command_row
from gateway.store import mindex

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
    order = "ts, id" if since is not None else "ts DESC, id DESC"
    rows = _device_rows(conn, device_id, metric, since, until, order, limit)
    if since is None:
        rows.reverse()
    return [{"ts": ts, "metric": m, "value": v} for ts, m, v in rows]


def device_metrics(conn: sqlite3.Connection, device_id: str) -> list[str]:
    """The metric names in a device's latest 10,000 measurements (bounded: the per-device index gives the
    latest rows, not the distinct names)."""
    rows = _device_rows(conn, device_id, None, None, None, "ts DESC, id DESC", 10000)
    return sorted({metric for _, metric, _ in rows})


def _device_rows(
    conn: sqlite3.Connection,
    device_id: str,
    metric: str | None,
    since: float | None,
    until: float | None,
    order: str,
    limit: int,
) -> list[tuple[float, str, float | None]]:
    """(ts, metric, value) of one device's measurements in `order`, at most `limit`.

    The per-device index is a file of its own, kept up behind the writers (store.mindex): the rows it has
    reached are found through it, the newest ones (past its `indexed_to`, a range of the table's own key) by
    reading that range. Each part is ordered and cut to `limit` before they are merged. Without the index
    attached (a connection of the CLI's or a test's), the table is read alone.
    """
    conds = ""
    params: list[Any] = []
    if since is not None:
        conds += " AND {t}.ts >= ?"
        params.append(since)
    if until is not None:
        conds += " AND {t}.ts <= ?"
        params.append(until)
    if metric is not None:
        conds += " AND m.metric = ?"
        params.append(metric)
    if not mindex.is_attached(conn):
        sql = (
            f"SELECT m.ts, m.metric, m.value FROM measurements AS m WHERE m.device_id = ?{conds.format(t='m')} "
            f"ORDER BY {order} LIMIT ?"
        )
        return conn.execute(sql, [device_id, *params, limit]).fetchall()

    # ts and id come from the index in the first part, so its own order answers ORDER BY without a sort
    sql = (
        f"SELECT ts, metric, value FROM ("
        f"SELECT * FROM (SELECT i.ts AS ts, i.id AS id, m.metric AS metric, m.value AS value "
        f"FROM {mindex.ALIAS}.mi AS i JOIN measurements AS m ON m.id = i.id AND m.device_id = ? "
        f"WHERE i.dev = (SELECT n FROM {mindex.ALIAS}.devices WHERE device_id = ?){conds.format(t='i')} "
        f"ORDER BY {order} LIMIT ?) "
        f"UNION ALL "
        f"SELECT * FROM (SELECT m.ts AS ts, m.id AS id, m.metric AS metric, m.value AS value FROM measurements AS m "
        f"WHERE m.id > ? AND m.device_id = ?{conds.format(t='m')} ORDER BY {order} LIMIT ?)"
        f") ORDER BY {order} LIMIT ?"
    )
    tail = mindex.indexed_to(conn)
    args = [device_id, device_id, *params, limit, tail, device_id, *params, limit, limit]
    return conn.execute(sql, args).fetchall()


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
