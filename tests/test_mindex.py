"""The measurements' per-device index in a file of its own (gateway/store/mindex.py): built behind the writers,
read together with the rows it has not reached yet, purged with retention, rebuilt when it is not the database's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Running, make_config

from gateway.metrics import Metrics
from gateway.retention import used_bytes
from gateway.runtime import Gateway
from gateway.store import mindex, views
from gateway.store.indexer import Indexer
from gateway.store.schema import LEGACY_INDEX, connect, migrate

_INSERT = "INSERT INTO measurements(device_id, metric, ts, value) VALUES (?, ?, ?, ?)"


def _database(path: Path, rows: int, devices: int = 20, start: float = 1000.0) -> list[tuple[int, str, str, float]]:
    """`rows` measurements, devices and metrics interleaved, timestamps not in id order (devices' own clocks)."""
    conn = connect(path)
    migrate(conn)
    rng = random.Random(rows)
    conn.execute("BEGIN")
    for i in range(rows):
        conn.execute(_INSERT, (f"d{i % devices}", "temp" if i % 3 else "hum", start + i + rng.uniform(-5, 5), i))
    conn.execute("COMMIT")
    out = conn.execute("SELECT id, device_id, metric, ts FROM measurements").fetchall()
    conn.close()
    return out


@contextlib.asynccontextmanager
async def _indexed(db: Path, rows: int, devices: int = 20) -> AsyncIterator[Indexer]:
    """A database of `rows` measurements and its index, caught up."""
    _database(db, rows, devices)
    indexer = Indexer(db)
    await indexer.start()
    try:
        await indexer.catch_up()
        yield indexer
    finally:
        await indexer.stop()


def _reader(path: Path) -> sqlite3.Connection:
    conn = connect(path, readonly=True)
    assert mindex.attach(conn, path)
    return conn


def _expected(
    conn: sqlite3.Connection, device: str, metric: str | None, since: float | None, until: float | None, limit: int
) -> list[dict[str, object]]:
    rows = [
        (ts, i, m, v)
        for i, d, m, ts, v in conn.execute("SELECT id, device_id, metric, ts, value FROM measurements")
        if d == device
        and (metric is None or m == metric)
        and (since is None or ts >= since)
        and (until is None or ts <= until)
    ]
    rows.sort()
    picked = rows[:limit] if since is not None else rows[-limit:]
    return [{"ts": ts, "metric": m, "value": v} for ts, _, m, v in picked]


async def test_the_index_is_built_in_the_background_and_reads_match_the_table(tmp_path: Path) -> None:
    db = tmp_path / "bosun.db"
    async with _indexed(db, 3000) as indexer:
        assert indexer.indexed_to == 3000
        assert indexer.used_bytes > 0
        writer = connect(db)
        writer.execute("BEGIN")
        for i in range(500):  # newer rows the index has not reached: read from the table's own range
            writer.execute(_INSERT, (f"d{i % 20}", "temp", 5000.0 + i, -i))
        writer.execute("COMMIT")
        conn = _reader(db)
        for device, metric, since, until, limit in [
            ("d3", None, None, None, 1000),
            ("d3", None, None, None, 10),
            ("d7", "temp", None, None, 50),
            ("d7", "hum", 1500.0, None, 20),
            ("d1", None, 2000.0, 3400.0, 1000),
            ("d1", None, 2900.0, None, 40),
            ("nobody", None, None, None, 10),
        ]:
            got = views.measurements(conn, device, metric=metric, since=since, until=until, limit=limit)
            assert got == _expected(conn, device, metric, since, until, limit), (device, metric, since, until)
        assert views.device_metrics(conn, "d3") == ["hum", "temp"]
        conn.close()
        writer.close()


async def test_the_thread_indexes_a_few_rows_once_the_oldest_has_waited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below a batch's worth of rows, the index still catches up within `_MAX_WAIT_S` (shortened here)."""
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.01)
    monkeypatch.setattr("gateway.store.indexer._MAX_WAIT_S", 0.2)
    db = tmp_path / "bosun.db"
    _database(db, 10)
    metrics = Metrics()
    indexer = Indexer(db, metrics=metrics)
    await indexer.start()
    try:
        await asyncio.sleep(0.1)
        assert indexer.indexed_to == 0  # 10 rows are far below a batch: they wait
        assert metrics.registry.get_sample_value("bosun_index_behind_rows") == 10  # and /metrics shows them
        deadline = time.monotonic() + 5
        while indexer.indexed_to < 10 or metrics.registry.get_sample_value("bosun_index_behind_rows") != 0:
            assert time.monotonic() < deadline, "never indexed"
            await asyncio.sleep(0.01)
        index = sqlite3.connect(indexer.path)
        assert index.execute("SELECT count(*) FROM mi").fetchone()[0] == 10
        index.close()
    finally:
        await indexer.stop()


async def _arriving(db: Path, rows: int, per_tick: int = 100) -> None:
    """`rows` more measurements, `per_tick` every 10 ms (about 10,000 rows/s)."""
    conn = connect(db)
    try:
        for done in range(0, rows, per_tick):
            conn.execute("BEGIN")
            conn.executemany(_INSERT, [(f"d{i % 20}", "temp", 5000.0 + done + i, i) for i in range(per_tick)])
            conn.execute("COMMIT")
            await asyncio.sleep(0.01)
    finally:
        conn.close()


async def test_the_index_waits_while_rows_pour_in_and_catches_up_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst (thresholds shortened here) leaves the acknowledgements the CPU; the rows are indexed once it is over."""
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.02)
    monkeypatch.setattr("gateway.store.indexer._MAX_WAIT_S", 0.05)
    monkeypatch.setattr("gateway.store.indexer._BUSY_ROWS_S", 1000)
    monkeypatch.setattr("gateway.store.indexer.DEFER_MAX_ROWS", 100_000)
    db = tmp_path / "bosun.db"
    async with _indexed(db, 100) as indexer:  # the first 100 rows are in
        assert indexer.indexed_to == 100
        await _arriving(db, 3000)
        assert indexer.indexed_to == 100, "indexed during the burst"
        deadline = time.monotonic() + 5
        while indexer.indexed_to < 3100:
            assert time.monotonic() < deadline, "never caught up after the burst"
            await asyncio.sleep(0.01)


async def test_a_long_burst_is_indexed_once_it_is_too_far_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_DEFER_MAX_ROWS` bounds what device queries read from the table itself, however long the burst."""
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.02)
    monkeypatch.setattr("gateway.store.indexer._MAX_WAIT_S", 0.05)
    monkeypatch.setattr("gateway.store.indexer._BUSY_ROWS_S", 1000)
    monkeypatch.setattr("gateway.store.indexer.DEFER_MAX_ROWS", 1000)
    db = tmp_path / "bosun.db"
    async with _indexed(db, 100) as indexer:
        await _arriving(db, 4000)
        assert indexer.indexed_to > 1100, "the bound did not hold during the burst"


async def test_the_index_runs_in_a_process_that_takes_only_cpu_time_nothing_else_wants(tmp_path: Path) -> None:
    """A process of its own (no GIL shared with the event loop) under SCHED_IDLE: a busy gateway's event loop and
    bulk child are never queued behind an index batch."""
    db = tmp_path / "bosun.db"
    async with _indexed(db, 10) as indexer:
        assert indexer.pid is not None and indexer.pid != os.getpid()
        assert os.sched_getscheduler(indexer.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the rest of the gateway keeps its own
        assert indexer.indexed_to == 10


async def test_a_killed_index_process_is_started_again_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.01)
    monkeypatch.setattr("gateway.store.indexer._MAX_WAIT_S", 0.05)
    db = tmp_path / "bosun.db"
    async with _indexed(db, 100) as indexer:
        first = indexer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        conn = connect(db)
        conn.executemany(_INSERT, [("d1", "temp", 5000.0 + i, float(i)) for i in range(50)])
        conn.close()
        deadline = time.monotonic() + 10
        while indexer.indexed_to < 150:
            assert time.monotonic() < deadline, f"stuck at {indexer.indexed_to}"
            await asyncio.sleep(0.02)
        assert indexer.pid != first
        assert os.sched_getscheduler(indexer.pid) == os.SCHED_IDLE
    assert "the index process exited with -9" in caplog.text


def test_without_the_index_attached_the_table_is_read_alone(tmp_path: Path) -> None:
    db = tmp_path / "bosun.db"
    _database(db, 600)
    conn = connect(db, readonly=True)
    assert not mindex.is_attached(conn)
    assert views.measurements(conn, "d2", limit=5) == _expected(conn, "d2", None, None, None, 5)
    conn.close()


async def test_the_database_s_own_index_is_dropped_once_the_file_has_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until then it answers device queries (an upgraded site's history); afterwards inserting a measurement is one
    append."""
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.01)
    monkeypatch.setattr("gateway.store.indexer._MAX_WAIT_S", 0.1)
    db = tmp_path / "bosun.db"
    _database(db, 5000)
    seen: list[int] = []
    writer = connect(db)

    async def drop() -> None:
        seen.append(indexer.indexed_to)
        writer.execute(f"DROP INDEX {LEGACY_INDEX}")

    assert [row[1] for row in writer.execute("PRAGMA index_list(measurements)")] == [LEGACY_INDEX]
    indexer = Indexer(db, drop)
    await indexer.start()
    try:
        deadline = time.monotonic() + 5
        while not seen:
            assert time.monotonic() < deadline, "never dropped"
            await asyncio.sleep(0.01)
        assert seen == [5000]  # only after catching up
        assert writer.execute("PRAGMA index_list(measurements)").fetchall() == []
    finally:
        await indexer.stop()
        writer.close()


async def test_the_gateway_drops_the_database_s_own_index(gateway: Running) -> None:
    deadline = time.monotonic() + 5
    while gateway.rows("PRAGMA index_list(measurements)"):
        assert time.monotonic() < deadline, "the legacy index is still there"
        await asyncio.sleep(0.05)


async def test_a_device_s_latest_rows_read_a_few_index_pages_not_the_table(tmp_path: Path) -> None:
    """Counted in SQLite virtual-machine steps, as in test_query_cost: exact, whatever the machine's speed."""
    db = tmp_path / "bosun.db"
    async with _indexed(db, 50_000, devices=100):
        conn = _reader(db)
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 100)
        rows = views.measurements(conn, "d42", limit=20)
        conn.set_progress_handler(None, 0)
        assert len(rows) == 20
        assert steps < 50, f"{steps * 100} steps: the query walked the table"  # a table scan is ~10,000
        conn.close()


async def test_entries_of_deleted_rows_are_purged_and_the_file_is_counted(tmp_path: Path) -> None:
    db = tmp_path / "bosun.db"
    async with _indexed(db, 4000) as indexer:
        writer = connect(db)
        spans = writer.execute(
            "SELECT device_id, min(ts), max(ts) FROM measurements WHERE id BETWEEN 1001 AND 2500 GROUP BY device_id"
        ).fetchall()
        writer.execute("DELETE FROM measurements WHERE id BETWEEN 1001 AND 2500")
        assert await indexer.purge(spans, 1001, 2500) == 1500
        index = sqlite3.connect(indexer.path)
        left = {row[0] for row in index.execute("SELECT id FROM mi")}
        assert left == set(range(1, 1001)) | set(range(2501, 4001))
        index.close()
        reader = _reader(db)
        assert used_bytes(reader) == used_bytes(writer) + indexer.used_bytes
        reader.close()
        writer.close()


def _entries(index: sqlite3.Connection) -> list[tuple[int, str, float]]:
    """(id, device_id, ts) of every entry in an index file, by id."""
    sql = "SELECT i.id, d.device_id, i.ts FROM mi AS i JOIN devices AS d ON d.n = i.dev ORDER BY i.id"
    return index.execute(sql).fetchall()


def _change(db: Path, index: Path, change: str) -> None:
    conn = connect(db)
    if change == "epoch":  # another database restored under the same name
        conn.execute("UPDATE meta SET value = 'another' WHERE key = 'uplink_epoch'")
    elif change == "fewer rows":
        conn.execute("DELETE FROM measurements WHERE id > 100")
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
    conn.close()


@pytest.mark.parametrize("change", ["epoch", "fewer rows", "file deleted"])
async def test_an_index_that_is_not_the_database_s_is_rebuilt(tmp_path: Path, change: str) -> None:
    db = tmp_path / "bosun.db"
    async with _indexed(db, 300) as indexer:
        pass
    index = sqlite3.connect(indexer.path)
    index.execute("INSERT INTO mi VALUES (1, 1.0, 99999)")  # an entry of another database: must not survive
    index.commit()
    index.close()
    _change(db, indexer.path, change)
    again = Indexer(db)
    await again.start()
    try:
        await again.catch_up()
        index = sqlite3.connect(again.path)
        source = sqlite3.connect(db)
        want = source.execute("SELECT id, device_id, ts FROM measurements ORDER BY id").fetchall()
        assert _entries(index) == want
        index.close()
        source.close()
    finally:
        await again.stop()


async def test_an_index_file_of_the_older_format_is_built_again_in_the_new_one(tmp_path: Path) -> None:
    """Format 2 named devices in every entry, in 4 KB pages: its file is deleted and built again (1 KB pages, devices
    by number), and device queries answer from the new one."""
    db = tmp_path / "bosun.db"
    _database(db, 300)
    old = sqlite3.connect(mindex.index_path(db), isolation_level=None)
    old.execute("PRAGMA page_size = 4096")
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value)")
    old.execute("INSERT INTO state VALUES ('format', '2'), ('indexed_to', 300), ('epoch', NULL)")
    old.execute(
        "CREATE TABLE mi (device_id TEXT NOT NULL, ts REAL NOT NULL, id INTEGER NOT NULL, "
        "PRIMARY KEY (device_id, ts, id)) WITHOUT ROWID"
    )
    old.execute("INSERT INTO mi SELECT device_id, ts, id FROM (SELECT 'd1' AS device_id, 1.0 AS ts, 1 AS id)")
    old.close()
    indexer = Indexer(db)
    await indexer.start()
    try:
        assert indexer.indexed_to == 0  # what the old file claimed does not count
        await indexer.catch_up()
        index = sqlite3.connect(indexer.path)
        assert index.execute("PRAGMA page_size").fetchone()[0] == 1024
        source = sqlite3.connect(db)
        assert _entries(index) == source.execute("SELECT id, device_id, ts FROM measurements ORDER BY id").fetchall()
        index.close()
        source.close()
        reader = _reader(db)
        assert len(views.measurements(reader, "d3", limit=1000)) == 15  # 300 rows over 20 devices
        reader.close()
    finally:
        await indexer.stop()


async def test_a_damaged_index_file_is_rebuilt_not_fatal(tmp_path: Path) -> None:
    db = tmp_path / "bosun.db"
    _database(db, 100)
    mindex.index_path(db).write_bytes(b"this is not a database" * 100)
    indexer = Indexer(db)
    await indexer.start()
    try:
        await indexer.catch_up()
        assert indexer.indexed_to == 100
    finally:
        await indexer.stop()


async def test_retention_purges_the_entries_of_what_it_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index keeps exactly the rows the database keeps. HQ has every row, and
    still the newest stays: its id keeps the sequence going (an emptied table would hand out ids again)."""
    monkeypatch.setattr("gateway.store.indexer._POLL_S", 0.01)
    gw = Gateway(make_config(tmp_path / "var", **{"store.max_db_mb": 1}))
    await gw.start()
    try:
        rows = [(f"s{i % 7}", "t", float(i), float(i)) for i in range(60_000)]
        await gw.writer.run(
            lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
        )
        await gw.writer.run(lambda c: c.execute("UPDATE uplink_lanes SET acked = 60000 WHERE lane = 'telemetry'"))
        events = [("s1", "press", float(i), float(i), i, "x" * 600) for i in range(3000)]  # never deleted: 1.8 MB
        await gw.writer.run(
            lambda c: c.executemany(
                "INSERT INTO events(device_id, type, ts, received_at, sequence_id, payload) VALUES (?,?,?,?,?,?)",
                events,
            )
        )
        deadline = time.monotonic() + 10
        while gw.indexer.indexed_to < 60_000:
            assert time.monotonic() < deadline, "never indexed"
            await asyncio.sleep(0.02)
        trimmed = await gw.retention.run_once()
        assert trimmed.measurements == 59_999  # still over the budget (the events), and yet the newest row stays
        kept = {row[0] for row in await gw.reader.fetchall("SELECT id FROM measurements")}
        assert kept == {60_000}
        indexed = {row[0] for row in await gw.reader.fetchall("SELECT id FROM mindex.mi")}
        assert indexed == kept
    finally:
        await gw.stop()


def test_rows_are_synced_to_disk_before_the_index_counts_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writers sync a commit just after other connections can read it (gateway/store/walsync.py): the index
    syncs the WAL after reading a batch and before recording it, so a power cut cannot leave it counting rows the
    database lost."""
    db = tmp_path / "bosun.db"
    _database(db, 500)
    writer = connect(db)  # keeps the WAL in place, as the gateway's own connections do
    writer.execute("INSERT INTO measurements(device_id, metric, ts, value) VALUES ('d0', 't', 1.0, 1.0)")
    index = mindex.Index(db)
    synced: list[tuple[str, int]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append((str(Path(f"/proc/self/fd/{fd}").readlink()), index.indexed_to))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        index.open()
        while index.step():
            pass
        assert index.indexed_to == 501
        assert (f"{db}-wal", 0) in synced  # synced while the batch was read and not yet recorded
    finally:
        index.close()
        writer.close()
