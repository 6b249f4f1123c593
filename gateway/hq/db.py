"""HQ's own SQLite database: gateways and their tokens, per-lane state, and what the gateways sent.

Exactly once, per gateway and lane: a batch is stored in one transaction with its idempotency key, and only
its records above the lane's highest stored sequence are kept (a gateway that died after sending but before
its cursor moved sends an overlapping batch; the key alone would not catch that). Records are stored in
sequence order, so `id` order is the gateway's order per device.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from typing import Any

import msgpack

from gateway.errors import Conflict, NotFound
from gateway.store.schema import connect
from gateway.uplink.batch import Batch

__all__ = [
    "add_gateway",
    "add_reader",
    "connect_hq",
    "gateway_for_token",
    "gateways",
    "ingest",
    "is_reader",
    "token_hash",
]

_SCHEMA = [
    "CREATE TABLE gateways (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, "
    "last_seen REAL, last_error TEXT, last_error_at REAL)",
    "CREATE TABLE lanes (gateway_id TEXT NOT NULL REFERENCES gateways(id), lane TEXT NOT NULL, "
    "acked INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0, batches INTEGER NOT NULL DEFAULT 0, "
    "bytes INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (gateway_id, lane))",
    "CREATE TABLE batches (key TEXT PRIMARY KEY, gateway_id TEXT NOT NULL, lane TEXT NOT NULL, "
    "first INTEGER NOT NULL, last INTEGER NOT NULL, stored INTEGER NOT NULL, bytes INTEGER NOT NULL, "
    "acked INTEGER NOT NULL, received_at REAL NOT NULL)",
    "CREATE TABLE records (id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, lane TEXT NOT NULL, "
    "seq INTEGER NOT NULL, kind TEXT NOT NULL, device_id TEXT, created_at REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE UNIQUE INDEX records_seq ON records(gateway_id, lane, seq)",
    "CREATE INDEX records_kind ON records(gateway_id, kind, id)",
    # the latest state of each crew call (a call record is sent at every transition)
    "CREATE TABLE calls (gateway_id TEXT NOT NULL, call_id INTEGER NOT NULL, seq INTEGER NOT NULL, "
    "body TEXT NOT NULL, PRIMARY KEY (gateway_id, call_id))",
    "CREATE TABLE measurements (id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "device_id TEXT NOT NULL, metric TEXT NOT NULL, ts REAL NOT NULL, value REAL)",
    "CREATE INDEX measurements_metric ON measurements(gateway_id, metric, id)",
    "CREATE TABLE losses (id INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL, lane TEXT NOT NULL, "
    "first INTEGER NOT NULL, last INTEGER NOT NULL, count INTEGER NOT NULL, reason TEXT, ts REAL)",
]


# each entry moves HQ's schema from version i to i+1; append, never edit
_MIGRATIONS = [
    _SCHEMA,
    # people and tools that read the API (the gateways' tokens only write)
    ["CREATE TABLE readers (token_hash TEXT PRIMARY KEY, label TEXT NOT NULL, created_at REAL NOT NULL)"],
    # the epoch of the database a gateway sends from (batch "epoch"): set by its first batch
    ["ALTER TABLE gateways ADD COLUMN epoch TEXT"],
]


class EpochChanged(Exception):
    """A gateway id sends from another database than before: its sequences restarted (HQ answers 409)."""


def connect_hq(path: Any, readonly: bool = False) -> sqlite3.Connection:
    """Open (and on first use create or upgrade) HQ's database; WAL like the gateway's."""
    # HQ appends batches, one gateway's records at a time: SQLite's default page suits it (see schema.PAGE_SIZE)
    conn = connect(path, readonly=readonly, synchronous="NORMAL", page_size=4096)
    if not readonly and conn.execute("PRAGMA user_version").fetchone()[0] < len(_MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # again, inside the lock
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
        conn.execute("COMMIT")
    return conn


def add_reader(conn: sqlite3.Connection, label: str) -> str:
    """A token for the read API (shown once)."""
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO readers(token_hash, label, created_at) VALUES (?, ?, ?)", (token_hash(token), label, time.time())
    )
    return token


def is_reader(conn: sqlite3.Connection, token: str) -> bool:
    return conn.execute("SELECT 1 FROM readers WHERE token_hash = ?", (token_hash(token),)).fetchone() is not None


def token_hash(token: str) -> str:
    # tokens are 256-bit random secrets: a plain SHA-256 is enough, and cheap on every request
    return hashlib.sha256(token.encode()).hexdigest()


def add_gateway(conn: sqlite3.Connection, gateway_id: str, rotate: bool = False) -> str:
    """Register a gateway (or give it a new token with `rotate`); returns its token, shown once."""
    token = secrets.token_urlsafe(32)
    exists = conn.execute("SELECT 1 FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
    if exists and not rotate:
        raise Conflict(f"gateway {gateway_id} already exists (--rotate gives it a new token)")
    if not exists and rotate:
        raise NotFound(f"gateway {gateway_id} does not exist")
    if exists:
        conn.execute("UPDATE gateways SET token_hash = ? WHERE id = ?", (token_hash(token), gateway_id))
    else:
        conn.execute(
            "INSERT INTO gateways(id, token_hash, created_at) VALUES (?, ?, ?)",
            (gateway_id, token_hash(token), time.time()),
        )
    return token


def gateway_for_token(conn: sqlite3.Connection, token: str) -> str | None:
    row = conn.execute("SELECT id FROM gateways WHERE token_hash = ?", (token_hash(token),)).fetchone()
    return str(row[0]) if row else None


def note_error(conn: sqlite3.Connection, gateway_id: str, error: str) -> None:
    conn.execute(
        "UPDATE gateways SET last_error = ?, last_error_at = ? WHERE id = ?", (error[:500], time.time(), gateway_id)
    )


def ingest(conn: sqlite3.Connection, key: str, batch: Batch, nbytes: int) -> dict[str, Any]:
    """Store one batch (the caller holds the transaction); the answer names the lane's highest stored seq."""
    now = time.time()
    gw, lane = batch.gateway_id, batch.lane
    known = conn.execute("SELECT epoch FROM gateways WHERE id = ?", (gw,)).fetchone()
    if batch.epoch and known and known[0] and known[0] != batch.epoch:
        # a replaced SD card or a re-flashed box under the same id: its seq 1 is not the seq 1 HQ has, and taking
        # it for a duplicate would drop it silently
        raise EpochChanged(
            f"gateway {gw} now sends from another database (epoch {batch.epoch}, HQ has {known[0]}): its sequences "
            "started again, so HQ cannot tell new records from old ones; register this box under a new gateway id "
            "(bosun hq gateway add NEW_ID, then [gateway] id and [uplink] token) or restore its database"
        )
    if batch.epoch and known and not known[0]:
        conn.execute("UPDATE gateways SET epoch = ? WHERE id = ?", (batch.epoch, gw))
    conn.execute("UPDATE gateways SET last_seen = ? WHERE id = ?", (now, gw))
    conn.execute("INSERT OR IGNORE INTO lanes(gateway_id, lane) VALUES (?, ?)", (gw, lane))
    acked = conn.execute("SELECT acked FROM lanes WHERE gateway_id = ? AND lane = ?", (gw, lane)).fetchone()[0]
    if conn.execute("SELECT 1 FROM batches WHERE key = ?", (key,)).fetchone():
        conn.execute("UPDATE lanes SET duplicates = duplicates + 1 WHERE gateway_id = ? AND lane = ?", (gw, lane))
        return {"gateway": gw, "lane": lane, "acked": acked, "stored": 0, "duplicate": True}
    stored = 0
    if batch.measurements:
        rows = [(gw, m.seq, m.device_id, m.metric, m.ts, m.value) for m in batch.measurements if m.seq > acked]
        conn.executemany(
            "INSERT INTO measurements(gateway_id, seq, device_id, metric, ts, value) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
        stored = len(rows)
    for r in batch.records:
        if r.seq <= acked:
            continue
        body = msgpack.unpackb(r.body, raw=False)
        text = json.dumps(body, default=str, sort_keys=True)
        conn.execute(
            "INSERT INTO records(gateway_id, lane, seq, kind, device_id, created_at, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (gw, lane, r.seq, r.kind, r.device_id, r.created_at, text),
        )
        if r.kind == "call" and isinstance(body, dict) and "id" in body:
            conn.execute(
                "INSERT INTO calls(gateway_id, call_id, seq, body) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(gateway_id, call_id) DO UPDATE SET seq = excluded.seq, body = excluded.body",
                (gw, body["id"], r.seq, text),
            )
        elif r.kind == "loss" and isinstance(body, dict):
            conn.execute(
                "INSERT INTO losses(gateway_id, lane, first, last, count, reason, ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (gw, body.get("lane"), body.get("first"), body.get("last"), body.get("count"), body.get("reason"),
                 body.get("ts")),
            )  # fmt: skip
        stored += 1
    acked = max(acked, batch.last)
    conn.execute(
        "UPDATE lanes SET acked = ?, records = records + ?, batches = batches + 1, bytes = bytes + ? "
        "WHERE gateway_id = ? AND lane = ?",
        (acked, stored, nbytes, gw, lane),
    )
    conn.execute(
        "INSERT INTO batches(key, gateway_id, lane, first, last, stored, bytes, acked, received_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (key, gw, lane, batch.first, batch.last, stored, nbytes, acked, now),
    )
    return {"gateway": gw, "lane": lane, "acked": acked, "stored": stored, "duplicate": False}


def gateways(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    out = []
    for gid, created, seen, error, error_at in conn.execute(
        "SELECT id, created_at, last_seen, last_error, last_error_at FROM gateways ORDER BY id"
    ).fetchall():
        lanes = {
            lane: {"acked": a, "records": n, "batches": b, "bytes": nb, "duplicates": d}
            for lane, a, n, b, nb, d in conn.execute(
                "SELECT lane, acked, records, batches, bytes, duplicates FROM lanes WHERE gateway_id = ?", (gid,)
            )
        }
        lost = {
            lane: n
            for lane, n in conn.execute(
                "SELECT lane, sum(count) FROM losses WHERE gateway_id = ? GROUP BY lane", (gid,)
            )
        }
        out.append(
            {
                "id": gid,
                "created_at": created,
                "last_seen": seen,
                "last_error": error,
                "last_error_at": error_at,
                "lanes": lanes,
                "lost": lost,
            }
        )
    return out
