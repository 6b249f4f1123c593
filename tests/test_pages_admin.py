"""The staff and admin pages over real HTTP: traffic (history, filter, SSE stream), settings, audit, users.

Each page is refused by the server (403) to roles that may not open it; every form needs its CSRF token;
each form's effect is checked in the database and the audit log. Browser tests: test_browser_admin.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from conftest import Running, topic
from test_pages import _signed_in, _user

from webui.routes.traffic_stream import pretty


@pytest.mark.parametrize(
    ("topic_", "raw", "kind", "text"),
    [
        ("a/b", None, "empty", ""),
        ("a/b", b'{"t":21.5,"ok":true}', "json", '{\n  "t": 21.5,\n  "ok": true\n}'),
        ("a/b", b"[1, 2]", "json", "[\n  1,\n  2\n]"),
        ("a/b", b"online", "text", "online"),
        ("a/b", b"21.5", "text", "21.5"),
        ("a/b", b'{"cut": "short', "text", '{"cut": "short'),  # a truncated log row is still readable
        ("a/b", b"\xff\x00\x01", "hex", "ff 00 01"),
        ("a/b.mp", msgpack.packb({"v": 1, "raw": b"\x01"}), "msgpack", '{\n  "v": 1,\n  "raw": "01"\n}'),
        ("a/b.mp", b"\xc1", "hex", "c1"),  # 0xc1 is never valid msgpack
        ("a/b", bytes(range(20)), "hex", " ".join(f"{i:02x}" for i in range(16)) + "\n10 11 12 13"),
    ],
)
def test_payloads_are_pretty_printed_by_format(topic_: str, raw: bytes | None, kind: str, text: str) -> None:
    assert pretty(topic_, raw) == (kind, text)


async def _publish(gateway: Running, paho_clients: Any, *messages: tuple[str, str, str]) -> None:
    """(device_id, type, action) per message, each from its own registered device over real MQTT."""
    for device_id, type_, action in messages:
        password = await gateway.add_device(device_id, type_=type_)
        client = paho_clients(gateway.mqtt_port, device_id, device_id, password)
        await asyncio.to_thread(client.connect)
        payload = json.dumps({"value": 21.5}) if action == "temperature" else "{}"
        await asyncio.to_thread(client.publish, topic(device_id, action, type_=type_), payload)


async def test_traffic_page_filters_history_by_wildcard_and_explains_a_bad_filter(
    gateway: Running, paho_clients: Any
) -> None:
    password = await _user(gateway, "ines", "installer")
    await _publish(gateway, paho_clients, ("t-1", "sensor", "temperature"), ("b-1", "button", "heartbeat"))
    await gateway.wait_for("SELECT id FROM traffic WHERE topic LIKE 'bosun/%'", count=2)
    async with _signed_in(gateway, "ines", password) as (client, _):
        everything = await client.get("/traffic")
        assert everything.status_code == 200
        assert "bosun/yacht/c101/sensor/t-1/temperature" in everything.text
        assert "bosun/yacht/c101/button/b-1/heartbeat" in everything.text
        assert 'src="/static/traffic.js"' in everything.text
        sensors = await client.get("/traffic", params={"topic": "bosun/+/+/sensor/#"})
        assert sensors.status_code == 200
        assert "sensor/t-1/temperature" in sensors.text and "button/b-1/heartbeat" not in sensors.text
        assert "&#34;value&#34;: 21.5" in sensors.text  # indented JSON, escaped
        fragment = await client.get(
            "/traffic", params={"topic": "bosun/yacht/+/button/+/heartbeat", "fragment": "history"}
        )
        assert "<html" not in fragment.text and "b-1/heartbeat" in fragment.text and "t-1" not in fragment.text
        bad = await client.get("/traffic", params={"topic": "bosun/#/x"})
        assert bad.status_code == 400
        assert "is not an MQTT topic filter" in bad.text and "only as the whole last level" in bad.text
        api_bad = await client.get("/api/v1/traffic/stream", params={"topic": "a/b+"})
        assert api_bad.status_code == 400 and "not an MQTT topic filter" in api_bad.json()["message"]


async def test_traffic_history_pages_older_rows_by_id(gateway: Running) -> None:
    password = await _user(gateway, "ines", "installer")

    def fill(conn: Any) -> None:
        conn.executemany(
            "INSERT INTO traffic(ts, direction, client_id, topic, qos, retain, size, payload) VALUES (?,?,?,?,?,?,?,?)",
            [(1000.0 + i, "in", "x", f"bosun/s/r/sensor/d{i % 2}/t", 0, 0, 2, b"{}") for i in range(250)],
        )

    await gateway.gw.writer.run(fill)
    async with _signed_in(gateway, "ines", password) as (client, _):
        first = await client.get("/traffic", params={"topic": "bosun/s/r/sensor/d1/+"})
        assert first.text.count("sensor/d1/t</code>") == 100
        older = first.text.split("before=")[1].split('"')[0]
        second = await client.get("/traffic", params={"topic": "bosun/s/r/sensor/d1/+", "before": older})
        assert second.text.count("sensor/d1/t</code>") == 25 and "older →" not in second.text


async def _sse(lines: AsyncIterator[str], until: str, timeout: float = 5.0) -> list[tuple[str, dict[str, Any]]]:
    """Read `event:`/`data:` pairs from a stream's lines until an event of kind `until` arrives."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    async with asyncio.timeout(timeout):
        async for line in lines:
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
                if kind == until:
                    return events
    return events


async def test_traffic_stream_sends_new_matching_rows_only(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "ines", "installer")
    async with (
        _signed_in(gateway, "ines", password) as (client, _),
        client.stream("GET", "/api/v1/traffic/stream", params={"topic": "bosun/+/+/sensor/#"}) as stream,
    ):
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        ready = await _sse(lines, "ready")
        assert ready[-1][1]["filter"] == "bosun/+/+/sensor/#"
        await _publish(gateway, paho_clients, ("b-1", "button", "heartbeat"), ("t-1", "sensor", "temperature"))
        events = await _sse(lines, "traffic")
    _, row = events[-1]
    assert row["topic"] == "bosun/yacht/c101/sensor/t-1/temperature"
    assert row["format"] == "json" and json.loads(row["payload"]) == {"value": 21.5}
    assert row["client_id"] == "t-1" and row["id"] > ready[-1][1]["after"]


async def test_traffic_stream_resumes_after_an_id(gateway: Running) -> None:
    password = await _user(gateway, "ines", "installer")

    def fill(conn: Any) -> None:
        for i in range(3):
            conn.execute(
                "INSERT INTO traffic(ts, direction, client_id, topic, qos, retain, size, payload) "
                "VALUES (?, 'in', 'x', ?, 0, 0, 1, ?)",
                (1000.0 + i, f"a/{i}", str(i).encode()),
            )

    await gateway.gw.writer.run(fill)
    first = gateway.rows("SELECT min(id) FROM traffic WHERE topic = 'a/0'")[0][0]
    async with (
        _signed_in(gateway, "ines", password) as (client, _),
        client.stream("GET", "/api/v1/traffic/stream", params={"topic": "a/+", "after": first}) as stream,
    ):
        lines = stream.aiter_lines()
        events = await _sse(lines, "traffic")
        events += await _sse(lines, "traffic")
    assert [row["topic"] for kind, row in events if kind == "traffic"] == ["a/1", "a/2"]

