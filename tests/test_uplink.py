"""The uplink against a real `bosun hq` on loopback: a backlog stored while HQ is down reaches it exactly once,
in order per device, calls first; 429 Retry-After is honoured; a refusal stops the lane visibly; eviction under
a tiny disk budget drops only telemetry and HQ is told how much."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from conftest import make_config
from test_hq import Hq

from gateway.runtime import Gateway
from gateway.store import registry
from gateway.store.records import LANE_PRIORITY, LANE_STATE, outbox
from gateway.webserver import WebServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(conn: sqlite3.Connection, start: int, count: int, calls_every: int = 25, state_every: int = 15) -> None:
    """`count` records of mixed lanes, interleaved as a site makes them: mostly telemetry, some calls and state."""
    rows = []
    for i in range(start, start + count):
        if i % calls_every == 0:
            outbox(conn, LANE_PRIORITY, "call", {"id": i, "state": "open", "n": i}, f"btn-{i % 7}")
        elif i % state_every == 0:
            outbox(conn, LANE_STATE, "device", {"device_id": f"s-{i % 11}", "n": i}, f"s-{i % 11}")
        else:
            rows.append((f"s-{i % 11}", "temperature", 1_700_000_000 + i / 1000, round(i * 0.1, 1)))
    conn.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?, ?, ?, ?)", rows)


def gateway_lanes(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(data_dir / "bosun.db")
    try:
        return {
            "telemetry": conn.execute("SELECT id, device_id FROM measurements ORDER BY id").fetchall(),
            "outbox": conn.execute("SELECT lane, count(*) FROM outbox GROUP BY lane").fetchall(),
        }
    finally:
        conn.close()


def hq_rows(hq: Hq, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(hq.data_dir / "hq.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def hq_get(hq: Hq, path: str, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {hq.reader()}"}
    async with httpx.AsyncClient(base_url=hq.url, timeout=10, headers=headers) as http:
        return (await http.get(path, params=params)).json()


async def hq_count(hq: Hq, gateway_id: str, lane: str) -> int:
    for g in await hq_get(hq, "/api/v1/gateways"):
        if g["id"] == gateway_id:
            return int(g["lanes"].get(lane, {}).get("records", 0))
    return 0


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    gateways: list[Gateway] = []

    async def start(data_dir: Path, **extra: Any) -> Gateway:
        gw = Gateway(make_config(data_dir, **{"gateway.id": "gw-test", "uplink.backoff_max_s": 1, **extra}))
        await gw.start()
        gateways.append(gw)
        return gw

    yield start
    for gw in gateways:
        await gw.stop()


async def test_a_backlog_stored_while_hq_is_down_arrives_exactly_once_in_order_calls_first(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    hq = Hq(tmp_path / "hq", free_port())
    token = hq.add_gateway("gw-test")
    gw: Gateway = await started(tmp_path / "var", **{"uplink.url": hq.url, "uplink.token": token})
    token_api = await gw.writer.run(lambda c: registry.create_token(c, "admin", "t", "test"))  # audited: priority
    for start in range(1, 50_001, 10_000):
        await gw.writer.run(lambda c, s=start: fill(c, s, 10_000))  # type: ignore[misc]
    await until(lambda: gw.uplink.last_error, 10, "a failed send")
    assert "unreachable" in (gw.uplink.last_error or "") and not gw.uplink.connected
    status = await gw.uplink.refresh()
    calls = sum(1 for i in range(1, 50_001) if i % 25 == 0)
    states = sum(1 for i in range(1, 50_001) if i % 25 and i % 15 == 0)
    assert {lane: b["records"] for lane, b in status.backlog.items()} == {
        "priority": calls + 2,  # + the audit rows of the admin user and its token
        "state": states,
        "telemetry": 50_000 - calls - states,
    }
    hq.start()
    try:
        expected = gateway_lanes(tmp_path / "var")["telemetry"]

        async def drained() -> bool:
            return await hq_count(hq, "gw-test", "telemetry") == len(expected)

        await until(drained, 60, "the drain")
        # exactly once: every measurement id, once, and nothing else
        got = hq_rows(hq, "SELECT seq, device_id FROM measurements ORDER BY id")
        assert got == expected  # in the gateway's order, so in order per device too
        records = hq_rows(hq, "SELECT lane, seq FROM records ORDER BY id")
        assert len(records) == len(set(records)) == calls + 2 + states
        # calls first: every priority batch was stored before any state batch, state before telemetry
        times = {
            lane: (lo, hi)
            for lane, lo, hi in hq_rows(
                hq, "SELECT lane, min(received_at), max(received_at) FROM batches GROUP BY lane"
            )
        }
        assert times["priority"][1] <= times["state"][0] and times["state"][1] <= times["telemetry"][0]
        assert len(await hq_get(hq, "/api/v1/gateways/gw-test/calls", limit=5000)) == calls
        # acknowledged outbox rows are gone from the gateway; the backlog is empty and visible as such
        await until(lambda: not gateway_lanes(tmp_path / "var")["outbox"], 10, "the outbox to empty")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
            api = (await http.get("/api/v1/uplink", headers={"Authorization": f"Bearer {token_api}"})).json()
            health = (await http.get("/healthz")).json()
            metrics = (await http.get("/metrics", headers={"Authorization": f"Bearer {token_api}"})).text
        assert api["connected"] is True and api["last_success"] is not None
        assert {lane: v["records"] for lane, v in api["lanes"].items()} == {"priority": 0, "state": 0, "telemetry": 0}
        assert api["lanes"]["telemetry"]["wire_bytes_per_record"] < 20
        assert health["uplink"]["connected"] is True
        for name in (
            'bosun_uplink_backlog_records{lane="telemetry"}',
            "bosun_uplink_backlog_bytes",
            "bosun_uplink_oldest_unsent_seconds",
            "bosun_uplink_last_success_timestamp_seconds",
            f'bosun_uplink_sent_records_total{{lane="telemetry"}} {len(expected)}.0',
            "bosun_uplink_wire_bytes_per_record",
            "bosun_uplink_runway_seconds",
        ):
            assert name in metrics, name
    finally:
        hq.stop()


async def test_429_retry_after_is_honoured(tmp_path: Path, started: Callable[..., Any]) -> None:
    """A front that answers the first ingest with 429 Retry-After: 2, then lets HQ through."""
    hq = Hq(tmp_path / "hq").start()
    token = hq.add_gateway("gw-test")
    seen: list[float] = []

    async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(time.monotonic())
        if len(seen) == 1:
            headers = [(b"retry-after", b"2"), (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"status_code": 429, "message": "slow down"}'})
            return
        wanted = {k.decode(): v.decode() for k, v in scope["headers"]}
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{hq.url}{scope['path']}", content=body, headers=wanted)
        await send({"type": "http.response.start", "status": answer.status_code, "headers": []})
        await send({"type": "http.response.body", "body": answer.content})

    web = WebServer(front, "127.0.0.1", 0)
    await web.start()
    try:
        # backoff_max_s=1: a retry that ignored Retry-After would come within a second
        gw: Gateway = await started(
            tmp_path / "var", **{"uplink.url": f"http://127.0.0.1:{web.port}", "uplink.token": token}
        )
        await until(lambda: len(seen) >= 2, 10, "the retry")
        assert seen[1] - seen[0] >= 1.9
        assert "429" in (gw.uplink.last_error or "")

        async def audit_row() -> bool:
            return await hq_count(hq, "gw-test", "priority") == 1

        await until(audit_row, 10, "the audit row")
    finally:
        await web.stop()
        hq.stop()


async def test_a_refused_batch_stops_its_lane_with_a_visible_error(tmp_path: Path, started: Callable[..., Any]) -> None:
    hq = Hq(tmp_path / "hq").start()
    try:
        wrong = hq.add_gateway("someone-else")  # a token for another gateway: HQ answers 403
        gw: Gateway = await started(tmp_path / "var", **{"uplink.url": hq.url, "uplink.token": wrong})
        await until(lambda: gw.uplink.lanes["priority"].stopped, 10, "the lane to stop")
        health = gw.health()["uplink"]
        assert "403" in health["lanes"]["priority"]["stopped"] and "someone-else" in health["last_error"]
        sent = gw.metrics.counter_values(gw.metrics.uplink_errors)
        await asyncio.sleep(1.5)
        assert gw.metrics.counter_values(gw.metrics.uplink_errors) == sent  # not retried forever
    finally:
        hq.stop()


async def test_eviction_under_a_tiny_budget_drops_only_telemetry_and_hq_gets_the_loss(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    hq = Hq(tmp_path / "hq", free_port())
    token = hq.add_gateway("gw-test")
    gw: Gateway = await started(tmp_path / "var", **{"uplink.url": hq.url, "uplink.token": token, "store.max_db_mb": 1})
    await gw.writer.run(lambda c: fill(c, 1, 40_000, calls_every=80, state_every=10**9))
    trimmed = await gw.retention.run_once()
    assert trimmed.unsent > 0 and trimmed.unsent == trimmed.measurements  # nothing was at HQ yet
    lanes = dict(gw_rows(tmp_path, "SELECT lane, lost FROM uplink_lanes"))
    assert lanes == {"priority": 0, "state": 0, "telemetry": trimmed.unsent}
    kinds = gw_rows(tmp_path, "SELECT kind, count(*) FROM outbox WHERE lane = 'priority' GROUP BY kind")
    # every call kept; the loss (one record per deleted chunk) on its way to HQ
    assert dict(kinds) == {"audit": 1, "call": 500, "loss": -(-trimmed.unsent // 5000)}
    hq.start()
    try:
        total = 40_000 - 500 - trimmed.unsent

        async def drained() -> bool:
            return await hq_count(hq, "gw-test", "telemetry") == total

        await until(drained, 60, "the drain")
        (g,) = await hq_get(hq, "/api/v1/gateways")
        assert g["lost"] == {"telemetry": trimmed.unsent}
        assert g["lanes"]["priority"]["records"] == 501 + -(-trimmed.unsent // 5000)
        await gw.uplink.refresh()
        assert gw.health()["uplink"]["lanes"]["telemetry"]["lost"] == trimmed.unsent
    finally:
        hq.stop()


def gw_rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(tmp_path / "var" / "bosun.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_outbox_bodies_are_msgpack() -> None:
    # HQ decodes every outbox body with msgpack: the domains' dicts must survive the trip as they are
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, lane, kind, device_id, created_at, body)")
    outbox(conn, LANE_PRIORITY, "call", {"id": 1, "x": [1, 2]}, "btn")
    assert msgpack.unpackb(conn.execute("SELECT body FROM outbox").fetchone()[0]) == {"id": 1, "x": [1, 2]}


async def test_outside_the_window_only_calls_alarms_and_audit_go(tmp_path: Path, started: Callable[..., Any]) -> None:
    hq = Hq(tmp_path / "hq").start()
    try:
        token = hq.add_gateway("gw-test")
        later = time.localtime(time.time() + 7200)
        window = f"{later.tm_hour:02d}:00-{later.tm_hour:02d}:59"  # a window that is not now
        gw: Gateway = await started(
            tmp_path / "var",
            **{"uplink.url": hq.url, "uplink.token": token, "uplink.window": window, "uplink.batch_records": 200},
        )
        await gw.writer.run(lambda c: fill(c, 1, 2_000, calls_every=10, state_every=7))

        async def calls_done() -> bool:
            return await hq_count(hq, "gw-test", "priority") == 201  # 200 calls + the admin's audit row

        await until(calls_done, 15, "the calls")
        await asyncio.sleep(1)
        assert await hq_count(hq, "gw-test", "telemetry") == 0 and await hq_count(hq, "gw-test", "state") == 0
    finally:
        hq.stop()


async def test_the_bandwidth_cap_spaces_batches(tmp_path: Path, started: Callable[..., Any]) -> None:
    hq = Hq(tmp_path / "hq").start()
    try:
        token = hq.add_gateway("gw-test")
        rate = 4_000
        gw: Gateway = await started(
            tmp_path / "var",
            **{
                "uplink.url": hq.url,
                "uplink.token": token,
                "uplink.batch_records": 500,
                "uplink.max_bytes_per_s": rate,
            },
        )
        await gw.writer.run(lambda c: fill(c, 1, 20_000))
        await asyncio.sleep(3)
        sent = hq_rows(hq, "SELECT sum(bytes), count(*), min(received_at), max(received_at) FROM batches")
        total, batches, first, last = sent[0]
        assert batches >= 3
        # every batch but the last waited for the link to carry the ones before it
        assert total - 2_000 <= rate * (last - first) + 2_000, (total, last - first)
        assert gw.uplink.connected and await hq_count(hq, "gw-test", "telemetry") < 19_000  # still draining
    finally:
        hq.stop()


async def test_a_real_press_presence_and_telemetry_reach_hq_through_their_lanes(
    tmp_path: Path, started: Callable[..., Any], paho_clients: Callable[..., Any]
) -> None:
    hq = Hq(tmp_path / "hq").start()
    try:
        token = hq.add_gateway("gw-test")
        gw: Gateway = await started(tmp_path / "var", **{"uplink.url": hq.url, "uplink.token": token})
        passwords = {}
        for device, kind in (("btn-1", "button"), ("sensor-1", "sensor")):
            new = registry.NewDevice(device, "yacht", "c101", kind)
            _, passwords[device] = await gw.writer.run(lambda c, n=new: registry.add_device(c, n, "test"))  # type: ignore[misc]
        await gw.accounts.refresh()
        button = paho_clients(gw.mqtt_port, "btn-1", "btn-1", passwords["btn-1"])
        sensor = paho_clients(gw.mqtt_port, "sensor-1", "sensor-1", passwords["sensor-1"])
        for client in (button, sensor):
            await asyncio.to_thread(client.connect)
        await asyncio.to_thread(button.publish, "bosun/yacht/c101/button/btn-1/availability", "online", 1, True)
        await asyncio.to_thread(button.publish, "bosun/yacht/c101/button/btn-1/press", '{"sequence_id": 1}')
        await asyncio.to_thread(
            sensor.publish, "bosun/yacht/c101/sensor/sensor-1/telemetry", '{"temperature": 21.5, "humidity": 48}'
        )

        async def arrived() -> bool:
            calls = await hq_get(hq, "/api/v1/gateways/gw-test/calls")
            rows = await hq_get(hq, "/api/v1/gateways/gw-test/measurements", device_id="sensor-1")
            return bool(calls) and len(rows) == 2

        await until(arrived, 15, "the call and the measurements at HQ")
        (call,) = await hq_get(hq, "/api/v1/gateways/gw-test/calls")
        assert (call["device_id"], call["room"], call["state"]) == ("btn-1", "c101", "open")
        rows = await hq_get(hq, "/api/v1/gateways/gw-test/measurements", device_id="sensor-1")
        assert sorted((r["metric"], r["value"]) for r in rows) == [("humidity", 48.0), ("temperature", 21.5)]
        records = await hq_get(hq, "/api/v1/gateways/gw-test/records")
        kinds = {(r["lane"], r["kind"]) for r in records}
        # the press's call and audit rows, the devices added and the button coming online (presence)
        assert {("priority", "call"), ("priority", "audit"), ("state", "device"), ("state", "event")} <= kinds
        presence = [r["body"] for r in records if r["kind"] == "event"]
        assert any(p.get("type") == "presence" and p.get("online") for p in presence)
    finally:
        hq.stop()


async def test_the_runway_shrinks_as_the_database_grows_and_grows_when_hq_has_the_data(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    gw: Gateway = await started(tmp_path / "var", **{"store.max_db_mb": 64})
    first = await gw.uplink.refresh()
    assert first.runway_s is None  # not growing yet
    rows = [("s1", "t", float(i), float(i)) for i in range(100_000)]
    await gw.writer.run(
        lambda c: c.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?,?,?,?)", rows)
    )
    await asyncio.sleep(0.5)
    grown = await gw.uplink.refresh()
    assert grown.runway_s is not None and grown.inflow_bytes_per_s > 0
    assert grown.runway_s == pytest.approx((64 * 1024 * 1024 - grown.used_bytes) / grown.inflow_bytes_per_s, rel=0.01)
    # once HQ has it all, retention may delete it first: the runway is longer at the same rate
    await gw.writer.run(lambda c: c.execute("UPDATE uplink_lanes SET acked = 100000 WHERE lane = 'telemetry'"))
    synced = await gw.uplink.refresh()
    assert synced.runway_s is not None and synced.runway_s > grown.runway_s
    assert gw.health()["uplink"]["runway_s"] == round(synced.runway_s)


async def test_a_second_box_under_the_same_gateway_id_is_stopped_with_a_clear_error(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    hq = Hq(tmp_path / "hq").start()
    try:
        token = hq.add_gateway("gw-test")
        first: Gateway = await started(tmp_path / "one", **{"uplink.url": hq.url, "uplink.token": token})
        await until(lambda: first.uplink.last_success, 10, "the first box's audit row")
        # a replaced SD card, same configured id and token: its seq 1 must not be taken for the first box's
        second: Gateway = await started(tmp_path / "two", **{"uplink.url": hq.url, "uplink.token": token})
        await until(lambda: second.uplink.lanes["priority"].stopped, 10, "the second box's lane to stop")
        assert "409" in (second.uplink.lanes["priority"].stopped or "")
        assert "another database" in (second.health()["uplink"]["last_error"] or "")
    finally:
        hq.stop()


async def test_a_batch_is_on_disk_before_it_is_sent(
    tmp_path: Path, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writers sync a commit just after other connections can read it (gateway/store/walsync.py), so the uplink
    syncs the WAL after reading a batch and before sending it: HQ never holds a record a power cut could take from
    the gateway."""
    hq = Hq(tmp_path / "hq", free_port())
    token = hq.add_gateway("gw-test")
    hq.start()
    try:
        at_sync: list[int] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            name = str(Path(f"/proc/self/fd/{fd}").readlink())
            if name.endswith("bosun.db-wal") and threading.current_thread().name.startswith("bosun-uplink-reader"):
                at_sync.append(hq_rows(hq, "SELECT count(*) FROM records")[0][0])
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        gw: Gateway = await started(tmp_path / "var", **{"uplink.url": hq.url, "uplink.token": token})
        await gw.writer.run(lambda c: fill(c, 1, 200))

        async def arrived() -> bool:
            return await hq_count(hq, "gw-test", "priority") >= 8

        await until(arrived, 30, "the calls at HQ")
        assert at_sync and at_sync[0] == 0  # the first batch read was synced before HQ had any of it
    finally:
        hq.stop()
