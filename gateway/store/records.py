"""Rows every domain appends: audit entries and outbox rows (in the caller's transaction)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import msgpack

__all__ = ["LANE_PRIORITY", "LANE_STATE", "LANE_TELEMETRY", "audit", "outbox"]

# Lanes drain in this order (DESIGN: uplink): calls, alarms and audit first, then device state, telemetry.
LANE_PRIORITY = "priority"
LANE_STATE = "state"
LANE_TELEMETRY = "telemetry"


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
