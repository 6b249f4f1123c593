"""The staff and admin pages over real HTTP: traffic (history, filter, SSE stream), settings, audit, users.

Each page is refused by the server (403) to roles that may not open it; every form needs its CSRF token;
each form's effect is checked in the database and the audit log. Browser tests: test_browser_admin.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
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


async def test_traffic_stream_skips_what_a_browser_cannot_show_and_says_so(gateway: Running) -> None:
    password = await _user(gateway, "ines", "installer")

    def fill(conn: Any) -> None:
        conn.executemany(
            "INSERT INTO traffic(ts, direction, client_id, topic, qos, retain, size, payload) VALUES (?,?,?,?,?,?,?,?)",
            [(1000.0 + i, "in", "x", f"burst/{i}", 0, 0, 2, b"{}") for i in range(300)],
        )

    await gateway.gw.writer.run(fill)
    async with (
        _signed_in(gateway, "ines", password) as (client, _),
        client.stream("GET", "/api/v1/traffic/stream", params={"topic": "burst/#", "after": 0}) as stream,
    ):
        lines = stream.aiter_lines()
        events = await _sse(lines, "skipped")
        assert events[-1] == ("skipped", {"count": 100})
        rows = [(await _sse(lines, "traffic"))[-1][1]["topic"] for _ in range(200)]
    assert rows == [f"burst/{i}" for i in range(100, 300)]  # the newest 200, oldest first


async def test_crew_is_refused_traffic_and_settings_installer_is_refused_audit_and_users(gateway: Running) -> None:
    crew = await _user(gateway, "maria", "crew")
    installer = await _user(gateway, "ines", "installer")
    async with _signed_in(gateway, "maria", crew) as (client, csrf):
        for path in ("/traffic", "/settings", "/audit", "/users", "/api/v1/traffic/stream"):
            refused = await client.get(path)
            assert refused.status_code == 403, path
        assert "role crew may not do this" in (await client.get("/users")).text
        posted = await client.post("/users", data={"_csrf": csrf, "username": "x", "role": "admin"})
        assert posted.status_code == 403
        assert gateway.rows("SELECT username FROM users WHERE username = 'x'") == []
    async with _signed_in(gateway, "ines", installer) as (client, csrf):
        assert (await client.get("/traffic")).status_code == 200
        assert (await client.get("/settings")).status_code == 200
        for path in ("/audit", "/users"):
            assert (await client.get(path)).status_code == 403, path
        page = await client.get("/settings")
        assert 'href="/traffic"' in page.text and 'href="/users"' not in page.text
        posted = await client.post("/users/ines/role", data={"_csrf": csrf, "role": "admin"})  # no promoting oneself
        assert posted.status_code == 403
    assert gateway.rows("SELECT role FROM users WHERE username = 'ines'") == [("installer",)]


async def test_users_are_added_changed_disabled_and_reset_by_an_admin_and_audited(gateway: Running) -> None:
    password = await _user(gateway, "ada", "admin")
    async with _signed_in(gateway, "ada", password) as (client, csrf):
        page = await client.get("/users")
        assert page.status_code == 200 and 'data-user="admin"' in page.text and 'data-user="ada"' in page.text
        assert "never" not in page.text.split('data-user="ada"')[1].split("</tr>")[0]  # ada just signed in

        refused = await client.post(
            "/users", data={"username": "bob", "role": "crew", "password": "x" * 12, "repeat": "x" * 12}
        )
        assert refused.status_code == 403  # no CSRF token
        short = await client.post(
            "/users", data={"_csrf": csrf, "username": "bob", "role": "crew", "password": "short", "repeat": "short"}
        )
        assert short.status_code == 400 and "at least 10 characters" in short.text
        assert 'value="bob"' in short.text  # the form keeps what was typed (not the password)
        differ = await client.post(
            "/users", data={"_csrf": csrf, "username": "bob", "role": "crew", "password": "x" * 12, "repeat": "y" * 12}
        )
        assert differ.status_code == 400 and "differ" in differ.text
        added = await client.post(
            "/users",
            data={
                "_csrf": csrf,
                "username": "bob",
                "role": "crew",
                "password": "first-pass-1",
                "repeat": "first-pass-1",
            },
        )
        assert added.status_code == 303
        assert "User bob added." in (await client.get(added.headers["location"])).text
        twice = await client.post(
            "/users",
            data={
                "_csrf": csrf,
                "username": "bob",
                "role": "crew",
                "password": "first-pass-1",
                "repeat": "first-pass-1",
            },
        )
        assert twice.status_code == 409 and "bob already exists" in twice.text
        assert gateway.rows("SELECT role, disabled FROM users WHERE username = 'bob'") == [("crew", 0)]

        async with _signed_in(gateway, "bob", "first-pass-1") as (bob, _):
            role = await client.post("/users/bob/role", data={"_csrf": csrf, "role": "installer"})
            assert role.status_code == 303
            assert gateway.rows("SELECT role FROM users WHERE username = 'bob'") == [("installer",)]
            bad_role = await client.post("/users/bob/role", data={"_csrf": csrf, "role": "captain"})
            assert bad_role.status_code == 400 and "must be one of admin, installer, crew" in bad_role.text
            assert (await bob.get("/calls")).status_code == 303  # a new role needs a new sign-in

        off = await client.post("/users/bob/disabled", data={"_csrf": csrf, "disabled": "1"})
        assert off.status_code == 303 and gateway.rows("SELECT disabled FROM users WHERE username = 'bob'") == [(1,)]
        async with httpx.AsyncClient(base_url=gateway.url) as anon:
            login = await anon.post("/login", data={"username": "bob", "password": "first-pass-1"})
            assert login.status_code == 401  # disabled
        on = await client.post("/users/bob/disabled", data={"_csrf": csrf, "disabled": "0"})
        assert on.status_code == 303 and gateway.rows("SELECT disabled FROM users WHERE username = 'bob'") == [(0,)]

        mismatch = await client.post(
            "/users/bob/password", data={"_csrf": csrf, "password": "n" * 12, "repeat": "m" * 12}
        )
        assert mismatch.status_code == 400
        reset = await client.post(
            "/users/bob/password", data={"_csrf": csrf, "password": "second-pass-2", "repeat": "second-pass-2"}
        )
        assert reset.status_code == 303
        async with _signed_in(gateway, "bob", "second-pass-2"):
            pass
        mine = await client.post(
            "/users/ada/password", data={"_csrf": csrf, "password": "ada-new-pass-1", "repeat": "ada-new-pass-1"}
        )
        assert mine.status_code == 303 and (await client.get("/users")).status_code == 200  # still signed in

        # the last enabled admin: people.update_user refuses, and the page says why
        assert (await client.post("/users/admin/disabled", data={"_csrf": csrf, "disabled": "1"})).status_code == 303
        last = await client.post("/users/ada/role", data={"_csrf": csrf, "role": "crew"})
        assert last.status_code == 409 and "ada is the last enabled admin: make another admin first" in last.text
        assert gateway.rows("SELECT role FROM users WHERE username = 'ada'") == [("admin",)]
        unknown = await client.post("/users/nobody/disabled", data={"_csrf": csrf, "disabled": "1"})
        assert unknown.status_code == 404

    audit = gateway.rows(
        "SELECT actor, action, target FROM audit_log WHERE actor = 'ada' AND action != 'user.login' ORDER BY id"
    )
    assert audit == [
        ("ada", "user.add", "bob"),
        ("ada", "user.update", "bob"),
        ("ada", "user.update", "bob"),
        ("ada", "user.update", "bob"),
        ("ada", "user.password", "bob"),
        ("ada", "user.password", "ada"),
        ("ada", "user.update", "admin"),
    ]
    details = gateway.rows("SELECT detail FROM audit_log WHERE action = 'user.password'")
    assert all("pass" not in d[0] for d in details)  # no password in the audit log


async def test_settings_change_rooms_dnd_and_duty_and_show_the_timers(gateway: Running) -> None:
    password = await _user(gateway, "ines", "installer")
    await gateway.add_device("b-1", room="c101")
    await gateway.add_device("w-1", room="crew", type_="watch")
    async with _signed_in(gateway, "ines", password) as (client, csrf):
        page = await client.get("/settings")
        assert page.status_code == 200
        assert 'data-room="yacht/c101"' in page.text and 'data-watch="w-1"' in page.text
        for text in (
            "calls.escalation_normal",
            "BOSUN_CALLS_ESCALATION_NORMAL",
            "<b>60, 180, 600</b>",
            "store.max_db_mb",
            "<b>1024</b>",
            "then restart the gateway",
        ):
            assert text in page.text, text

        refused = await client.post("/settings/rooms/yacht/c101", data={"name": "Owner", "zone": "aft"})
        assert refused.status_code == 403
        named = await client.post(
            "/settings/rooms/yacht/c101", data={"_csrf": csrf, "name": "Owner's <cabin>", "zone": "aft"}
        )
        assert named.status_code == 303 and named.headers["location"].startswith("/settings?done=room")
        assert gateway.rows("SELECT name, zone, dnd FROM rooms WHERE site = 'yacht' AND room = 'c101'") == [
            ("Owner's <cabin>", "aft", 0)
        ]
        assert "Owner&#39;s &lt;cabin&gt;" in (await client.get("/settings")).text
        same = await client.post(
            "/settings/rooms/yacht/c101", data={"_csrf": csrf, "name": "Owner's <cabin>", "zone": "aft"}
        )
        assert "done=same" in same.headers["location"]
        bad_zone = await client.post(
            "/settings/rooms/yacht/c101", data={"_csrf": csrf, "name": "x", "zone": "aft deck"}
        )
        assert bad_zone.status_code == 400 and "zone &#39;aft deck&#39; must be 1-64 characters" in bad_zone.text

        async with gateway.gw.hub.subscribe() as events:
            dnd = await client.post("/settings/rooms/yacht/c101", data={"_csrf": csrf, "dnd": "1"})
            assert dnd.status_code == 303
            kind, data = await asyncio.wait_for(events.get(), 2)
        assert kind == "room" and data["dnd"] is True and data["changed_by"] == "ines"
        assert gateway.rows("SELECT dnd, dnd_changed_by FROM rooms WHERE room = 'c101'") == [(1, "ines")]
        assert "Turn off" in (await client.get("/settings")).text

        added = await client.post(
            "/settings/rooms", data={"_csrf": csrf, "site": "marina", "room": "m1", "name": "", "zone": "dock"}
        )
        assert added.status_code == 303
        assert gateway.rows("SELECT name, zone FROM rooms WHERE site = 'marina' AND room = 'm1'") == [(None, "dock")]
        bad_room = await client.post("/settings/rooms", data={"_csrf": csrf, "site": "marina", "room": "m 1"})
        assert bad_room.status_code == 400 and "must be 1-64 characters" in bad_room.text

        duty = await client.post("/settings/duty", data={"_csrf": csrf, "duty-w-1": "aft, dock  c7"})
        assert duty.status_code == 303
        assert gateway.rows("SELECT watch_id, zones FROM duty") == [("w-1", '["aft", "c7", "dock"]')]
        assert 'value="aft, c7, dock"' in (await client.get("/settings")).text
        bad_duty = await client.post("/settings/duty", data={"_csrf": csrf, "duty-w-1": "aft/deck"})
        assert bad_duty.status_code == 400 and "must be &#39;*&#39; or 1-64 characters" in bad_duty.text
        not_a_watch = await client.post("/settings/duty", data={"_csrf": csrf, "duty-b-1": "*"})
        assert not_a_watch.status_code == 400 and "b-1 is not a registered watch" in not_a_watch.text
        cleared = await client.post("/settings/duty", data={"_csrf": csrf, "duty-w-1": ""})
        assert cleared.status_code == 303 and gateway.rows("SELECT * FROM duty") == []

    audit = gateway.rows(
        "SELECT action, target FROM audit_log WHERE actor = 'ines' AND action != 'user.login' ORDER BY id"
    )
    assert audit == [
        ("room.update", "yacht/c101"),
        ("room.dnd", "yacht/c101"),
        ("room.update", "marina/m1"),
        ("duty.set", None),
        ("duty.set", None),
    ]


def _targets(page: str) -> list[int]:
    """The room numbers of the audit rows on a page, in page order (targets are yacht/c<n>)."""
    return [int(n) for n in re.findall(r"<td>yacht/c(\d+)</td>", page)]


def _link(page: str, rel: str) -> str:
    found = re.search(rf'href="([^"]+)" rel="{rel}"', page)
    assert found is not None, rel
    return html.unescape(found.group(1))


async def test_audit_log_filters_by_actor_action_target_and_time_and_pages_by_id(gateway: Running) -> None:
    password = await _user(gateway, "ada", "admin")
    base = 1_750_000_000.0

    def fill(conn: Any) -> None:
        conn.executemany(
            "INSERT INTO audit_log(ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    base + i * 60,
                    "jon" if i % 2 else "kim",
                    "room.dnd" if i % 3 else "user.add",
                    f"yacht/c{i}",
                    json.dumps({"n": i}),
                )
                for i in range(150)
            ],
        )

    await gateway.gw.writer.run(fill)
    async with _signed_in(gateway, "ada", password) as (client, _):
        page = await client.get("/audit")
        assert page.status_code == 200 and page.text.index("user.login") < page.text.index("yacht/c149")  # newest first
        users = await client.get("/audit", params={"action": "user.", "actor": "kim"})
        targets = _targets(users.text)
        assert targets == [i for i in range(149, -1, -1) if i % 2 == 0 and i % 3 == 0]  # 25 rows, one page
        assert "older →" not in users.text

        dnd = await client.get("/audit", params={"action": "room.dnd"})
        first = _targets(dnd.text)
        assert len(first) == 50 and first[0] == 149 and "older →" in dnd.text and "← newer" not in dnd.text
        older_href = _link(dnd.text, "next")
        second = await client.get(older_href)
        rows2 = _targets(second.text)
        assert rows2[0] < first[-1] and "← newer" in second.text and "action=room.dnd" in older_href
        newer_href = _link(second.text, "prev")
        back = await client.get(newer_href)
        assert _targets(back.text) == first

        target = await client.get("/audit", params={"target": "yacht/c14"})
        assert sorted(_targets(target.text)) == [14, *range(140, 150)]
        since = dt.datetime.fromtimestamp(base + 10 * 60).strftime("%Y-%m-%dT%H:%M")
        until = dt.datetime.fromtimestamp(base + 13 * 60).strftime("%Y-%m-%dT%H:%M")
        window = await client.get("/audit", params={"since": since, "until": until})
        assert sorted(_targets(window.text)) == [10, 11, 12]
        assert f'value="{since}"' in window.text
        bad = await client.get("/audit", params={"since": "yesterday"})
        assert bad.status_code == 400 and "expected a date and time like" in bad.text
