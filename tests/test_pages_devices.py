"""The dashboard and devices pages over real HTTP, with real MQTT devices (browser tests: test_browser_devices)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, make_config, topic
from test_pages import _signed_in, _user

from gateway.runtime import Gateway
from gateway.store import views
from gateway.store.schema import migrate
from webui.charts import line_chart, sparkline


async def _device(gateway: Running, paho_clients: Any, device_id: str, **place: str) -> Any:
    """A registered device connected with paho, its Last Will set to `availability: offline` (DESIGN)."""
    site, room, type_ = place.get("site", "yacht"), place.get("room", "c101"), place.get("type_", "button")
    password = await gateway.add_device(device_id, site, room, type_)
    client = paho_clients(gateway.mqtt_port, device_id, device_id, password)
    will = (topic(device_id, "availability", site, room, type_), b"offline")
    await asyncio.to_thread(client.connect, will)
    client.topic = lambda action: topic(device_id, action, site, room, type_)
    return client


async def _publish(client: Any, action: str, body: Any, qos: int = 1) -> None:
    payload = body if isinstance(body, str) else json.dumps(body)
    await asyncio.to_thread(client.publish, client.topic(action), payload, qos)


def _power_cut(client: Any) -> None:
    """The device loses power: its connection ends without DISCONNECT, so the broker publishes its will."""
    client.client.loop_stop()  # no reconnect
    client.client.socket().close()


def _tiles(html: str) -> list[str]:
    return re.findall(r'data-device="([^"]+)"', html)


async def _fleet(gateway: Running, paho_clients: Any) -> dict[str, Any]:
    """Four devices: a low-battery button, a healthy watch, a sensor on deck, and one never connected."""
    low = await _device(gateway, paho_clients, "btn-low", room="c101")
    watch = await _device(gateway, paho_clients, "watch-1", room="crew", type_="watch")
    sensor = await _device(gateway, paho_clients, "temp-1", site="deck", room="bridge", type_="sensor")
    await gateway.add_device("btn-quiet", room="c102")
    await _publish(low, "status", {"battery": 12, "rssi": -81, "firmwareVersion": "1.2.0"})
    await _publish(watch, "status", {"battery": 88, "signal_strength": -55, "firmware_version": "2.0.1"})
    await _publish(sensor, "status", {"battery": "55", "rssi": -67})
    await gateway.wait_for("SELECT device_id FROM devices WHERE online = 1 AND battery IS NOT NULL", count=3)
    return {"low": low, "watch": watch, "sensor": sensor}


async def test_grid_filters_by_site_room_type_state_and_search(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "maria", "crew")
    await _fleet(gateway, paho_clients)
    async with _signed_in(gateway, "maria", password) as (client, _):
        page = await client.get("/devices")
        assert page.status_code == 200
        assert sorted(_tiles(page.text)) == ["btn-low", "btn-quiet", "temp-1", "watch-1"]
        assert "12%" in page.text and "1.2.0" in page.text and "-81 dBm" in page.text

        cases = {
            "state=low": ["btn-low"],
            "state=offline": ["btn-quiet"],
            "state=online": ["btn-low", "temp-1", "watch-1"],
            "site=deck": ["temp-1"],
            "site=yacht&room=crew": ["watch-1"],
            "type=button": ["btn-low", "btn-quiet"],
            "q=WATCH": ["watch-1"],  # search is case-insensitive over id, name, place, firmware
            "q=2.0.1": ["watch-1"],
            "q=bridge": ["temp-1"],
            "type=button&state=online": ["btn-low"],
            "q=nothing-like-this": [],
        }
        for query, expected in cases.items():
            shown = await client.get(f"/devices?{query}")
            assert sorted(_tiles(shown.text)) == expected, query
        # the live region re-fetches the grid with the same filters: only the tiles, no page around them
        grid = await client.get("/devices?fragment=grid&state=low")
        assert _tiles(grid.text) == ["btn-low"] and "<html" not in grid.text
        assert 'data-refresh="/devices?fragment=grid&amp;state=low"' in (await client.get("/devices?state=low")).text
        none = await client.get("/devices?q=nothing-like-this")
        assert "No devices match." in none.text


async def test_crew_sees_no_actions_and_the_server_refuses_their_posts(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "maria", "crew")
    await _device(gateway, paho_clients, "btn-1")
    async with _signed_in(gateway, "maria", password) as (client, csrf):
        grid = await client.get("/devices")
        assert 'method="post" action="/devices"' not in grid.text and 'name="device_id"' not in grid.text
        page = await client.get("/devices/btn-1")
        assert page.status_code == 200 and "btn-1" in page.text
        assert "/devices/btn-1/identify" not in page.text and "Rename" not in page.text
        for path, form in (
            ("/devices/btn-1/identify", {}),
            ("/devices/btn-1/rename", {"name": "x"}),
            ("/devices/btn-1/disable", {}),
            ("/devices", {"command": "reset", "device_id": "btn-1"}),
        ):
            refused = await client.post(path, data={"_csrf": csrf, **form})
            assert refused.status_code == 403, path
    assert gateway.rows("SELECT count(*) FROM commands") == [(0,)]
    assert gateway.rows("SELECT name, disabled FROM devices") == [(None, 0)]


async def test_staff_identify_reaches_the_device_and_its_ack_shows(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "ines", "installer")
    button = await _device(gateway, paho_clients, "btn-1")
    await asyncio.to_thread(button.subscribe, "bosun/yacht/c101/button/btn-1/cmd/#")
    async with _signed_in(gateway, "ines", password) as (client, csrf):
        page = await client.get("/devices/btn-1")
        assert 'action="/devices/btn-1/identify"' in page.text and 'action="/devices/btn-1/reset"' in page.text
        sent = await client.post("/devices/btn-1/identify", data={"_csrf": csrf})
        assert sent.status_code == 303 and sent.headers["location"] == "/devices/btn-1"
        assert await asyncio.to_thread(button.got_message.wait, 5)
        message = button.messages[0]
        assert message.topic == "bosun/yacht/c101/button/btn-1/cmd/identify" and message.qos == 2
        command_id = json.loads(message.payload)["command_id"]
        await _publish(button, "ack", {"command_id": command_id, "status": "done", "detail": "blinked"})
        await gateway.wait_for("SELECT 1 FROM commands WHERE status = 'done'")
        commands = await client.get("/devices/btn-1?fragment=commands")
        row = re.search(rf'<tr data-command="{command_id}">(.*?)</tr>', commands.text, re.S)
        assert row is not None and "identify" in row.group(1) and "done" in row.group(1) and "blinked" in row.group(1)
        assert "ines" in row.group(1) and "<html" not in commands.text
    assert gateway.rows("SELECT actor, action, target FROM audit_log WHERE action = 'command.send'") == [
        ("ines", "command.send", "btn-1")
    ]


async def test_staff_rename_move_disable_enable_are_audited(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "root", "admin")
    button = await _device(gateway, paho_clients, "btn-1")
    async with _signed_in(gateway, "root", password) as (client, csrf):
        renamed = await client.post("/devices/btn-1/rename", data={"_csrf": csrf, "name": "<b>bold</b>"})
        assert renamed.status_code == 303
        page = await client.get("/devices/btn-1")
        assert "&lt;b&gt;bold&lt;/b&gt;" in page.text and "<b>bold</b>" not in page.text
        grid = await client.get("/devices")
        assert "&lt;b&gt;bold&lt;/b&gt;" in grid.text and "<b>bold</b>" not in grid.text

        moved = await client.post("/devices/btn-1/move", data={"_csrf": csrf, "site": "yacht", "room": "c202"})
        assert moved.status_code == 303
        bad = await client.post("/devices/btn-1/move", data={"_csrf": csrf, "site": "yacht", "room": "c 2"})
        assert bad.status_code == 400 and "must be 1-64 characters" in bad.text and "<html" in bad.text
        # a moved device is disconnected: its namespace changed (gateway._enforce_registry)
        assert await asyncio.to_thread(button.disconnected.wait, 5)

        disabled = await client.post("/devices/btn-1/disable", data={"_csrf": csrf})
        assert disabled.status_code == 303
        page = await client.get("/devices/btn-1")
        assert 'action="/devices/btn-1/enable"' in page.text and "/devices/btn-1/identify" not in page.text
        assert "disabled" in page.text
        refused = await client.post("/devices/btn-1/identify", data={"_csrf": csrf})
        assert refused.status_code == 400 and "disabled" in refused.text
        assert (await client.post("/devices/btn-1/enable", data={"_csrf": csrf})).status_code == 303
        unknown = await client.post("/devices/btn-1/explode", data={"_csrf": csrf})
        assert unknown.status_code == 404
    assert gateway.rows("SELECT name, room, disabled FROM devices") == [("<b>bold</b>", "c202", 0)]
    changes = [json.loads(d) for (d,) in gateway.rows("SELECT detail FROM audit_log WHERE action = 'device.update'")]
    assert changes == [
        {"name": "<b>bold</b>"},
        {"site": "yacht", "room": "c202"},
        {"disabled": True},
        {"disabled": False},
    ]


async def test_bulk_command_to_ticked_devices_or_all_shown(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "ines", "installer")
    await _fleet(gateway, paho_clients)
    async with _signed_in(gateway, "ines", password) as (client, csrf):
        grid = await client.get("/devices")
        assert 'method="post" action="/devices"' in grid.text and grid.text.count('name="device_id"') == 4
        ticked = await client.post(
            "/devices", data={"_csrf": csrf, "command": "identify", "device_id": ["btn-low", "watch-1"]}
        )
        assert ticked.status_code == 303 and ticked.headers["location"] == "/devices?sent=2&skipped=0&command=identify"
        notice = await client.get(ticked.headers["location"])
        assert "identify sent to 2 devices." in notice.text

        every = await client.post("/devices", data={"_csrf": csrf, "command": "reset", "all": "1", "type": "button"})
        assert every.headers["location"] == "/devices?type=button&sent=2&skipped=0&command=reset"
        unknown = await client.post("/devices", data={"_csrf": csrf, "command": "ota", "device_id": "btn-low"})
        assert unknown.status_code == 400
        empty = await client.post("/devices", data={"_csrf": csrf, "command": "reset"})
        assert empty.status_code == 400
    rows = gateway.rows("SELECT device_id, name, created_by FROM commands ORDER BY device_id, name")
    assert rows == [
        ("btn-low", "identify", "ines"),
        ("btn-low", "reset", "ines"),
        ("btn-quiet", "reset", "ines"),
        ("watch-1", "identify", "ines"),
    ]


async def test_device_page_charts_each_metric_with_one_point_per_value(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "maria", "crew")
    sensor = await _device(gateway, paho_clients, "temp-1", room="bridge", type_="sensor")
    for i in range(7):
        await _publish(sensor, "telemetry", {"temperature": 20 + i / 2, "humidity": 40 + i if i < 4 else None})
    await _publish(sensor, "press", {"sequence_id": 3})  # a sensor may have a button too: it shows in events
    await gateway.wait_for("SELECT 1 FROM measurements WHERE metric = 'temperature'", count=7)
    await gateway.wait_for("SELECT 1 FROM events WHERE type = 'press'")
    async with _signed_in(gateway, "maria", password) as (client, _):
        page = await client.get("/devices/temp-1")
        charts = dict(
            re.findall(r'<figure class="card chart-card" data-metric="([^"]+)">\s*(<svg.*?</svg>)', page.text, re.S)
        )
        assert set(charts) == {"humidity", "temperature"}
        for metric, drawn in (("temperature", 7), ("humidity", 4)):
            svg = charts[metric]
            assert f'data-points="{drawn}"' in svg
            points = sum(len(p.split()) for p in re.findall(r'<polyline class="line" points="([^"]+)"', svg))
            assert points == drawn, metric
        assert "temperature (°C)" in charts["temperature"] and ">23</text>" in charts["temperature"]  # the max
        events = await client.get("/devices/temp-1?fragment=events")
        assert "press" in events.text and "#3" in events.text and "online (message)" in events.text
        assert (await client.get("/devices/nope")).status_code == 404


async def test_dashboard_counts_calls_devices_and_shows_rate_storage_uplink_system(
    gateway: Running, paho_clients: Any
) -> None:
    password = await _user(gateway, "maria", "crew")
    devices = await _fleet(gateway, paho_clients)
    await _publish(devices["low"], "press", {"sequence_id": 1})
    await gateway.wait_for("SELECT id FROM calls WHERE state = 'open'")
    async with _signed_in(gateway, "maria", password) as (client, _):
        page = await client.get("/dashboard")
        assert page.status_code == 200
        figures = dict(re.findall(r'<b id="([a-z-]+)">(\d+)</b>', page.text))
        assert figures == {
            "open-calls": "1",
            "devices-online": "3",
            "devices-offline": "1",
            "devices-low": "1",
        }
        assert 'href="/calls"' in page.text and 'href="/devices?state=low"' in page.text
        spark = re.search(r'<svg class="chart spark".*?</svg>', page.text, re.S)
        assert spark is not None and 'data-points="' in spark.group(0)
        logged = gateway.rows("SELECT count(*) FROM traffic")[0][0]
        assert f"<b>{logged}</b> in the last hour" in page.text  # every message so far is within the hour
        assert "of 1.07 GB budget" in page.text  # store.max_db_mb = 1024
        # the WAL file (which keeps its size between checkpoints) is shown beside the budget, not in it
        assert (gateway.data_dir / "bosun.db-wal").stat().st_size > 0
        assert re.search(r"Write-ahead log: [\d.]+ [kMG]?B on disk besides, outside the budget", page.text)
        assert "Uplink to HQ" in page.text and "no HQ configured" in page.text
        for label in ("CPU", "Memory", "Disk", "Up"):
            assert f"<dt>{label}</dt>" in page.text
        calls = await client.get("/dashboard?fragment=calls")
        assert '<b id="open-calls">1</b>' in calls.text and "<html" not in calls.text

        await asyncio.to_thread(_power_cut, devices["watch"])
        await gateway.wait_for("SELECT 1 FROM devices WHERE device_id = 'watch-1' AND online = 0")
        part = await client.get("/dashboard?fragment=devices")
        assert '<b id="devices-offline">2</b>' in part.text and "<html" not in part.text
        system = await client.get("/dashboard?fragment=system")
        assert "<dt>CPU</dt>" in system.text and "<html" not in system.text


@pytest.mark.parametrize(
    ("values", "drawn", "lines"),
    [
        ([1, 2, 3], 3, 1),
        ([None, None, 4, 5], 2, 1),
        ([1, None, 2, 3, None, 4], 4, 3),  # a gap splits the line; a lone value is still drawn
        ([], 0, 0),
        ([0, 0, 0], 3, 1),
    ],
)
def test_sparkline_draws_known_values_and_leaves_gaps(values: list[float | None], drawn: int, lines: int) -> None:
    svg = str(sparkline(values, "a <label> & more"))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert f'data-points="{drawn}"' in svg and svg.count("<polyline") == lines
    assert "a &lt;label&gt; &amp; more" in svg and "<label>" not in svg


def test_line_chart_labels_axes_and_escapes_text() -> None:
    points = [(1_700_000_000 + 60 * i, float(v)) for i, v in enumerate([5, 7, 9])]
    svg = str(line_chart(points, "<script>", "°C"))
    assert "<script>" not in svg and "&lt;script&gt; (°C)" in svg
    assert [t for t in re.findall(r'class="y"[^>]*>([^<]+)<', svg)] == ["5", "7", "9"]
    assert len(re.findall(r'class="x"', svg)) == 2 and 'data-points="3"' in svg
    flat = str(line_chart([(1.0, 2.0), (2.0, 2.0)], "flat"))
    assert 'data-points="2"' in flat  # a flat series still has a y range
    empty = str(line_chart([(1.0, None)], "nothing"))
    assert "no values" in empty and 'data-points="0"' in empty


def test_traffic_per_minute_counts_the_last_hour_and_marks_minutes_before_the_log() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    now = 1_700_000_000.0
    times = [now - 7200, now - 3599, now - 3000, now - 3000, now - 61, now - 59, now - 1]
    conn.executemany(
        "INSERT INTO traffic(ts, direction, topic, qos, size) VALUES (?, 'in', 't', 0, 1)", [(t,) for t in times]
    )
    counts, log_from = views.traffic_per_minute(conn, now)
    assert log_from == now - 7200 and len(counts) == 60
    assert counts[0] == 1 and counts[10] == 2 and counts[58] == 1 and counts[59] == 2 and sum(counts) == 6
    # retention trimmed the oldest rows (and left holes in the ids): the minutes before the log are unknown
    conn.execute("DELETE FROM traffic WHERE ts < ?", (now - 3000,))
    counts, log_from = views.traffic_per_minute(conn, now)
    assert log_from == now - 3000 and counts[:10] == [None] * 10 and counts[10] == 2 and sum(counts[10:]) == 5
    conn.execute("DELETE FROM traffic")
    assert views.traffic_per_minute(conn, now) == ([0] * 60, None)


async def test_dashboard_shows_an_uplink_that_cannot_reach_hq(tmp_path: Path) -> None:
    # port 9 on loopback: nothing listens, so every send fails at once and the backlog stays
    gw = Gateway(make_config(tmp_path / "var", **{"uplink.url": "http://127.0.0.1:9", "uplink.backoff_max_s": 1}))
    await gw.start()
    try:
        running = Running(gw, gw.cfg.data_dir, "")
        password = await _user(running, "maria", "crew")
        await running.add_device("btn-1")  # a device record for HQ: the state lane has a backlog
        async with _signed_in(running, "maria", password) as (client, _):
            for _ in range(200):  # the uplink's figures are a snapshot it takes every few seconds
                part = await client.get("/dashboard?fragment=system")
                if "last success: never" in part.text and 'class="error small"' in part.text:
                    break
                await asyncio.sleep(0.1)
            assert '<b id="uplink-state">not connected</b>' in part.text
            waiting = re.search(r"(\d+) records? waiting", part.text)
            assert waiting is not None and int(waiting.group(1)) >= 1
            assert 'class="error small"' in part.text  # the last error, as the uplink reports it
    finally:
        await gw.stop()
