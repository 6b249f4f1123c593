"""What the uplink reads and writes in the gateway's database: batches after each lane's cursor, the backlog,
and the cursor advance (a writer op: only the writer holds the write connection)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from gateway.store.records import LANE_TELEMETRY, LANES
from gateway.uplink import batch

__all__ = ["Backlog", "Packed", "acknowledge", "backlog", "cursors", "epoch", "pack_next"]

_OUTBOX_BYTES = 4 * 1024 * 1024  # most body bytes in one outbox batch (bodies can be up to a payload each)


@dataclass(frozen=True)
class Packed:
    lane: str
    first: int
    last: int
    records: int
    key: str
    payload: bytes


@dataclass(frozen=True)
class Backlog:
    records: int
    body_bytes: int  # outbox body bytes (telemetry: 0, its size on the wire is estimated by the worker)
    oldest: float | None  # creation time (telemetry: device time) of the oldest record not yet at HQ


def cursors(conn: sqlite3.Connection) -> dict[str, int]:
    return {lane: acked for lane, acked in conn.execute("SELECT lane, acked FROM uplink_lanes")}


def epoch(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'uplink_epoch'").fetchone()
    return str(row[0]) if row else ""


def pack_next(conn: sqlite3.Connection, gateway_id: str, lane: str, limit: int, epoch: str = "") -> Packed | None:
    """The next batch of `lane` after its cursor, encoded (runs on the reader thread, off the event loop)."""
    row = conn.execute("SELECT acked FROM uplink_lanes WHERE lane = ?", (lane,)).fetchone()
    acked = int(row[0]) if row else 0
    if lane == LANE_TELEMETRY:
        rows = conn.execute(
            "SELECT id, device_id, metric, ts, value FROM measurements WHERE id > ? ORDER BY id LIMIT ?",
            (acked, limit),
        ).fetchall()
        if not rows:
            return None
        payload = batch.encode_telemetry(gateway_id, acked + 1, rows, epoch)
    else:
        rows = []
        size = 0
        for r in conn.execute(
            "SELECT seq, kind, device_id, created_at, body FROM outbox WHERE lane = ? AND seq > ? ORDER BY seq LIMIT ?",
            (lane, acked, limit),
        ):
            size += len(r[4])
            if rows and size > _OUTBOX_BYTES:
                break
            rows.append(r)
        if not rows:
            return None
        payload = batch.encode_outbox(gateway_id, lane, acked + 1, rows, epoch)
    last = int(rows[-1][0])
    return Packed(lane, acked + 1, last, len(rows), batch.idempotency_key(gateway_id, lane, acked + 1, last), payload)


def acknowledge(conn: sqlite3.Connection, sent: Packed, acked: int) -> int:
    """HQ has stored `lane` up to `acked`: advance the cursor (never backwards), forget acknowledged outbox rows.
    Returns the cursor."""
    cursor = min(acked, sent.last)
    conn.execute(
        "UPDATE uplink_lanes SET acked = max(acked, ?), sent_records = sent_records + ?, "
        "sent_bytes = sent_bytes + ?, acked_at = ? WHERE lane = ?",
        (cursor, sent.records, len(sent.payload), time.time(), sent.lane),
    )
    if sent.lane != LANE_TELEMETRY:
        conn.execute("DELETE FROM outbox WHERE lane = ? AND seq <= ?", (sent.lane, cursor))
    return cursor


def backlog(conn: sqlite3.Connection) -> dict[str, Backlog]:
    """Records not yet at HQ per lane. Telemetry is counted from ids (contiguous past the cursor: retention
    deletes oldest first), so this costs a few index lookups, not a scan."""
    acked = cursors(conn)
    out: dict[str, Backlog] = {}
    for lane in LANES:
        if lane == LANE_TELEMETRY:
            top, bottom = conn.execute(
                "SELECT (SELECT max(id) FROM measurements), (SELECT min(id) FROM measurements)"
            ).fetchone()
            start = max(acked.get(lane, 0), (bottom or 1) - 1)
            records = max(0, (top or 0) - start)
            oldest = None
            if records:
                found = conn.execute(
                    "SELECT ts FROM measurements WHERE id > ? ORDER BY id LIMIT 1", (start,)
                ).fetchone()
                oldest = found[0] if found else None
            out[lane] = Backlog(records, 0, oldest)
        else:
            count, size, oldest = conn.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0), min(created_at) FROM outbox "
                "WHERE lane = ? AND seq > ?",
                (lane, acked.get(lane, 0)),
            ).fetchone()
            out[lane] = Backlog(int(count), int(size), oldest)
    return out
