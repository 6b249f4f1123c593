"""Retention keeps the database inside its budget: measurements and traffic go, events and outbox stay; what HQ
never gets is counted and reported."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgpack
from conftest import make_config

from gateway.runtime import Gateway
from gateway.store.records import LANE_PRIORITY, LANE_STATE, outbox


async def test_budget_trims_oldest_measurements_and_keeps_events(tmp_path: Path) -> None:
    gw = Gateway(make_config(tmp_path / "var", **{"store.max_db_mb": 1, "store.traffic_rows": 100}))
    await gw.start()
    try:
        rows = [("s1", "t", float(i), float(i)) for i in range(60_000)]
        await gw.writer.run(
            lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
        )
        events = [("s1", "press", float(i), float(i), i, "{}") for i in range(2_000)]
        await gw.writer.run(
            lambda c: c.executemany(
                "INSERT INTO events(device_id, type, ts, received_at, sequence_id, payload) VALUES (?,?,?,?,?,?)",
                events,
            )
        )
        traffic = [(float(i), "in", "c", "t", 0, 0, 1, b"x", None) for i in range(500)]
        await gw.writer.run(
            lambda c: c.executemany(
                "INSERT INTO traffic(ts, direction, client_id, topic, qos, retain, size, payload, error) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                traffic,
            )
        )
        assert await gw.db_used_bytes() > 1024 * 1024
        trimmed = await gw.retention.run_once()
        assert trimmed.traffic >= 400
        assert trimmed.measurements > 0
        assert await gw.db_used_bytes() <= 1024 * 1024
        left = await gw.reader.fetchall("SELECT min(ts), count(*) FROM measurements")
        assert left[0][1] == 60_000 - trimmed.measurements
        assert left[0][0] == float(trimmed.measurements)  # the oldest went first
        assert (await gw.reader.fetchone("SELECT count(*) FROM events"))[0] == 2_000  # type: ignore[index]
        assert (await gw.reader.fetchone("SELECT count(*) FROM traffic"))[0] <= 100  # type: ignore[index]
        assert gw.health()["counters"]["drops"]["retention_measurements"] == trimmed.measurements
    finally:
        await gw.stop()


async def test_measurements_hq_has_go_first_and_nothing_is_reported_lost(tmp_path: Path) -> None:
    gw = Gateway(make_config(tmp_path / "var", **{"store.max_db_mb": 1, "store.traffic_rows": 100}))
    await gw.start()
    try:
        rows = [("s1", "t", float(i), float(i)) for i in range(60_000)]
        await gw.writer.run(
            lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
        )
        # HQ confirmed all but the last 1,000
        await gw.writer.run(lambda c: c.execute("UPDATE uplink_lanes SET acked = 59000 WHERE lane = 'telemetry'"))
        trimmed = await gw.retention.run_once()
        assert trimmed.measurements > 0 and trimmed.unsent == 0
        assert await gw.db_used_bytes() <= 1024 * 1024
        left = await gw.reader.fetchone("SELECT count(*) FROM measurements WHERE id > 59000")
        assert left == (1000,)  # every unsent row is still there
        assert await gw.reader.fetchall("SELECT lost FROM uplink_lanes") == [(0,), (0,), (0,)]
        assert await gw.reader.fetchall("SELECT * FROM outbox WHERE kind = 'loss'") == []
    finally:
        await gw.stop()


async def test_unsent_state_past_its_budget_goes_oldest_first_and_the_loss_is_reported(tmp_path: Path) -> None:
    gw = Gateway(make_config(tmp_path / "var", **{"uplink.state_budget_mb": 1}))
    await gw.start()
    try:
        blob = "x" * 1000

        def fill(conn: sqlite3.Connection) -> None:
            for i in range(3000):
                outbox(conn, LANE_STATE, "device", {"n": i, "pad": blob}, f"d{i % 5}")
            outbox(conn, LANE_PRIORITY, "call", {"id": 1}, "btn")

        await gw.writer.run(fill)
        trimmed = await gw.retention.run_once()
        assert 1900 < trimmed.state < 2100
        size, count, first = (
            await gw.reader.fetchone("SELECT sum(length(body)), count(*), min(seq) FROM outbox WHERE lane = 'state'")
        ) or (0, 0, 0)
        assert size <= 1024 * 1024 and count == 3000 - trimmed.state
        assert await gw.reader.fetchone("SELECT acked, lost FROM uplink_lanes WHERE lane = 'state'") == (
            first - 1,
            trimmed.state,
        )
        (body,) = await gw.reader.fetchone("SELECT body FROM outbox WHERE kind = 'loss'") or (b"",)
        loss = msgpack.unpackb(body)
        assert (loss["lane"], loss["count"], loss["reason"]) == ("state", trimmed.state, "state_budget_or_age")
        assert await gw.reader.fetchone("SELECT count(*) FROM outbox WHERE kind = 'call'") == (1,)  # never evicted
    finally:
        await gw.stop()


async def test_telemetry_older_than_max_age_is_skipped_not_deleted(tmp_path: Path) -> None:
    gw = Gateway(make_config(tmp_path / "var", **{"uplink.max_age_h": 1}))
    await gw.start()
    try:
        now = time.time()
        rows = [("s1", "t", now - 7200 + i, 1.0) for i in range(100)] + [("s1", "t", now, 2.0)] * 50
        await gw.writer.run(
            lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
        )
        trimmed = await gw.retention.run_once()
        assert trimmed.stale == 100 and trimmed.measurements == 0
        assert await gw.reader.fetchone("SELECT acked, lost FROM uplink_lanes WHERE lane = 'telemetry'") == (100, 100)
        assert await gw.reader.fetchone("SELECT count(*) FROM measurements") == (150,)  # still there for the UI
    finally:
        await gw.stop()
