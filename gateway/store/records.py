"""Rows every domain appends: audit entries and outbox rows (in the caller's transaction)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import msgpack

__all__ = ["LANES", "LANE_PRIORITY", "LANE_STATE", "LANE_TELEMETRY", "audit", "loss", "outbox"]

# Lanes drain in this order (DESIGN: uplink): calls, alarms and audit first, then device state, telemetry.
LANE_PRIORITY = "priority"
LANE_STATE = "state"
LANE_TELEMETRY = "telemetry"
LANES = (LANE_PRIORITY, LANE_STATE, LANE_TELEMETRY)


def outbox(conn: sqlite3.Connection, lane: str, kind: str, body: dict[str, Any], device_id: str | None = None) -> None:
    """Append a record for HQ; must run inside the transaction that stores the record itself."""
    conn.execute(
        "INSERT INTO outbox(lane, kind, device_id, created_at, body) VALUES (?, ?, ?, ?, ?)",
        (lane, kind, device_id, time.time(), msgpack.packb(body, use_bin_type=True)),
    )


def audit(conn: sqlite3.Connection, actor: str, action: str, target: str | None, detail: dict[str, Any]) -> None:
    """An audit row plus its outbox row (audit travels in the priority lane and is never evicted)."""
    ts = time.time()
    cur = conn.execute(
        "INSERT INTO audit_log(ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        (ts, actor, action, target, json.dumps(detail, sort_keys=True)),
    )
    outbox(
        conn,
        LANE_PRIORITY,
        "audit",
        {
            "id": cur.lastrowid,
            "ts": ts,
            "actor": actor,
            "action": action,
            "target": target,
            "detail": detail,
        },
    )


def loss(conn: sqlite3.Connection, lane: str, first: int, last: int, count: int, reason: str) -> None:
    """Records of `lane` in [first, last] that will never reach HQ: counted, and reported to HQ in the priority
    lane (which is never evicted), in the transaction that drops them."""
    if count <= 0:
        return
    conn.execute("UPDATE uplink_lanes SET lost = lost + ? WHERE lane = ?", (count, lane))
    outbox(
        conn,
        LANE_PRIORITY,
        "loss",
        {"lane": lane, "first": first, "last": last, "count": count, "reason": reason, "ts": time.time()},
    )
