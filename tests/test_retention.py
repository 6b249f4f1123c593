"""Retention keeps the database inside its budget: measurements and traffic go, events and outbox stay."""

from __future__ import annotations

from pathlib import Path

from conftest import make_config

from gateway.runtime import Gateway


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
