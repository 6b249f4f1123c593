"""The web UI over real HTTP: sign-in, sessions, CSRF, roles, rate limiting, escaping (browser tests: test_browser)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from conftest import Running, topic

from gateway.store import registry


async def _user(gateway: Running, name: str, role: str, password: str = "correct-horse-1") -> str:
    await gateway.gw.writer.run(lambda c: registry.add_user(c, name, role, password, "test"))
    return password


@contextlib.asynccontextmanager
async def _signed_in(gateway: Running, name: str, password: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A browser-like client with a session cookie, and the session's CSRF token read off a page."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        response = await client.post("/login", data={"username": name, "password": password, "next": "/calls"})
        assert response.status_code == 303, response.text
        page = await client.get("/calls")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" content="([^"]+)"', page.text)
        assert csrf is not None
        yield client, csrf.group(1)


async def test_pages_need_a_session_and_login_sets_a_strict_httponly_cookie(gateway: Running) -> None:
    password = await _user(gateway, "maria", "crew")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as anon:
        response = await anon.get("/calls")
        assert response.status_code == 303 and response.headers["location"] == "/login?next=/calls"
        assert (await anon.get("/static/app.css")).status_code == 200  # public assets
        login = await anon.post("/login", data={"username": "maria", "password": password, "next": "/devices"})
        assert login.status_code == 303 and login.headers["location"] == "/devices"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain HTTP here
        page = await anon.get("/calls")
        assert page.status_code == 200 and "maria (crew)" in page.text
        evil = await anon.post("/login", data={"username": "maria", "password": password, "next": "//evil.example/"})
        assert evil.headers["location"] == "/calls"  # no open redirect


async def test_forms_without_the_csrf_token_are_refused(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "maria", "crew")
    async with _signed_in(gateway, "maria", password) as (client, csrf):
        await client.post("/account/password", data={"current": password, "new": "x" * 12, "repeat": "x" * 12})
        missing = await client.post("/logout", data={})
        assert missing.status_code == 403 and "security token" in missing.text
        wrong = await client.post("/logout", data={"_csrf": csrf + "x"})
        assert wrong.status_code == 403
        api = await client.put("/api/v1/duty", json={})  # the session on the JSON API needs the header too
        assert api.status_code == 403
        ok = await client.put("/api/v1/duty", json={}, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200
        out = await client.post("/logout", data={"_csrf": csrf})
        assert out.status_code == 303
        assert (await client.get("/calls")).status_code == 303  # the session is gone server-side


async def test_crew_cannot_open_admin_pages_and_the_menu_hides_them(gateway: Running) -> None:
    password = await _user(gateway, "maria", "crew")
    async with _signed_in(gateway, "maria", password) as (client, _):
        page = await client.get("/calls")
        assert 'href="/users"' not in page.text and 'href="/audit"' not in page.text
        for path in ("/users", "/audit", "/settings", "/traffic"):
            refused = await client.get(path)
            assert refused.status_code in (403, 404), path  # 404 only while a page does not exist yet
        api = await client.get("/api/v1/calls")
        assert api.status_code == 200


async def test_failed_logins_are_rate_limited_per_user(gateway: Running) -> None:
    await _user(gateway, "maria", "crew")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as anon:
        for _ in range(5):
            bad = await anon.post("/login", data={"username": "maria", "password": "wrong-password"})
            assert bad.status_code == 401 and "Wrong user name or password" in bad.text
        limited = await anon.post("/login", data={"username": "maria", "password": "correct-horse-1"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0


async def test_calls_page_lists_open_calls_and_accepts_by_form(gateway: Running, paho_clients: Any) -> None:
    password = await _user(gateway, "maria", "crew")
    button_password = await gateway.add_device("b-<i>x</i>".replace("<i>", "").replace("</i>", ""))
    button = paho_clients(gateway.mqtt_port, "b-x", "b-x", button_password)
    await asyncio.to_thread(button.connect)
    await asyncio.to_thread(button.publish, topic("b-x", "press"), json.dumps({"sequence_id": 1}))
    await gateway.wait_for("SELECT id FROM calls")
    async with _signed_in(gateway, "maria", password) as (client, csrf):
        page = await client.get("/calls")
        assert "c101" in page.text and 'action="/calls/1/accept"' in page.text
        accepted = await client.post("/calls/1/accept", data={"_csrf": csrf})
        assert accepted.status_code == 303 and accepted.headers["location"] == "/calls"
        again = await client.post("/calls/1/accept", data={"_csrf": csrf})
        assert again.status_code == 409 and "accepted by maria" in again.text and "<html" in again.text
        as_json = await client.post("/calls/1/accept", data={"_csrf": csrf}, headers={"Accept": "application/json"})
        assert as_json.json()["message"] == "call 1 is accepted by maria"
        board = await client.get("/calls", params={"fragment": "board"})
        assert "accepted by maria" in board.text and "<html" not in board.text


async def test_text_from_people_and_devices_is_escaped(gateway: Running) -> None:
    password = await _user(gateway, "maria", "admin")
    await gateway.add_device("b-1", room="c7")
    await gateway.gw.writer.run(
        lambda c: c.execute(
            "INSERT INTO calls(device_id, site, room, priority, press_type, state, created_at, last_press_at) "
            "VALUES ('b-1', 'yacht', 'c7', 'normal', 'single', 'open', 1, 1)"
        )
    )
    async with _signed_in(gateway, "maria", password) as (client, csrf):
        await client.post("/calls/1/cancel", data={"_csrf": csrf, "reason": "<script>alert(1)</script>"})
        page = await client.get("/calls/1")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
