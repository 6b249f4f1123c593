"""The calls page in a real browser: a press appears live, an accept in one browser updates another."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from browser import PHONE, chromium
from conftest import Running, topic
from playwright.async_api import expect

from gateway.store import registry

PASSWORD = "correct-horse-1"


async def _users(gateway: Running, *users: tuple[str, str]) -> None:
    for name, role in users:
        await gateway.gw.writer.run(lambda c, n=name, r=role: registry.add_user(c, n, r, PASSWORD, "test"))


async def test_a_press_appears_live_and_an_accept_reaches_every_browser(gateway: Running, paho_clients: Any) -> None:
    await _users(gateway, ("maria", "crew"), ("jon", "crew"))
    password = await gateway.add_device("btn-1", room="c101")
    button = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(button.connect)
    async with chromium(gateway.url) as browser:
        maria = await browser.signed_in("maria", PASSWORD)
        jon = await browser.signed_in("jon", PASSWORD, PHONE)
        for page in (maria, jon):
            await expect(page.locator("#live-state")).to_have_text("live")
            await expect(page.locator(".empty")).to_be_visible()
        await browser.shot(jon, "calls-empty-phone")

        sent = time.monotonic()
        await asyncio.to_thread(button.publish, topic("btn-1", "press"), json.dumps({"sequence_id": 1}))
        for page in (maria, jon):  # no reload: the live bus brings it
            await expect(page.locator(".call .room")).to_have_text("c101", timeout=1000)
        assert time.monotonic() - sent < 1.0
        await expect(maria.locator("#banner")).to_contain_text("New normal call: c101")

        await maria.click(".call button:has-text('Accept')")
        await expect(jon.locator(".call .by")).to_have_text("accepted by maria", timeout=1000)
        await expect(maria.locator(".call button:has-text('Accept')")).to_have_count(0)
        await browser.shot(maria, "calls-desktop")
        await browser.shot(jon, "calls-phone")

        await jon.click(".call button:has-text('Complete')")
        for page in (maria, jon):
            await expect(page.locator(".empty")).to_be_visible(timeout=1000)
    rows = gateway.rows("SELECT state, accepted_by, completed_by FROM calls")
    assert rows == [("completed", "maria", "jon")]


async def test_the_login_page_opens_no_live_stream(gateway: Running) -> None:
    """Without a session the stream would be refused and retried by the browser forever."""
    async with chromium(gateway.url) as browser:
        ctx = await browser.context(PHONE)
        page = await ctx.new_page()
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        await page.goto("/login")
        await page.wait_for_load_state("networkidle")
        await browser.shot(page, "login-phone")
        assert asked and not [url for url in asked if "/api/" in url], asked
