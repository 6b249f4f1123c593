"""Queries that run every few seconds on a large database read a few index pages, never the whole table.

SQLite optimizes `SELECT max(id) FROM t` to one index lookup, but not `SELECT max(id), min(id) FROM t`: that
one scans every row. Counted in SQLite virtual-machine steps (a progress handler), so the check is exact and
does not depend on the machine's speed.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.store.schema import connect, migrate
from gateway.store.views import traffic_per_minute
from gateway.uplink import source

_ROWS = 50_000
_STEPS_PER_CALL = 100


def _database(tmp_path: Path) -> sqlite3.Connection:
    conn = connect(tmp_path / "bosun.db")
    migrate(conn)
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO measurements(device_id, metric, ts, value) VALUES (?, 'temperature', ?, 20.0)",
        ((f"s{i % 100}", now - _ROWS + i) for i in range(_ROWS)),
    )
    conn.executemany(
        "INSERT INTO traffic(ts, direction, client_id, topic, qos, size) VALUES (?, 'in', 'c', 't', 1, 2)",
        ((now - _ROWS + i,) for i in range(_ROWS)),
    )
    conn.execute("COMMIT")
    return conn


def _steps(conn: sqlite3.Connection, call: object) -> int:
    calls = 0

    def count() -> int:
        nonlocal calls
        calls += 1
        return 0

    conn.set_progress_handler(count, _STEPS_PER_CALL)
    try:
        assert callable(call)
        call()
    finally:
        conn.set_progress_handler(None, 0)
    return calls * _STEPS_PER_CALL


def test_uplink_backlog_reads_ids_not_rows(tmp_path: Path) -> None:
    conn = _database(tmp_path)
    backlog = source.backlog(conn)
    assert backlog["telemetry"].records == _ROWS
    assert _steps(conn, lambda: source.backlog(conn)) < 2_000  # a scan of 50,000 rows takes over 400,000


def test_traffic_per_minute_finds_the_hour_by_binary_search(tmp_path: Path) -> None:
    conn = _database(tmp_path)
    buckets = traffic_per_minute(conn, time.time(), minutes=1)
    assert buckets
    # the last minute's 60 rows are counted; finding where the minute starts must not read the other 49,940
    assert _steps(conn, lambda: traffic_per_minute(conn, time.time(), minutes=1)) < 10_000
