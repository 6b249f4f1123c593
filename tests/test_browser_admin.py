"""The staff and admin pages in a real browser: the traffic stream filtered by a wildcard (with pause, resume
and export), settings and users by form, and a crew member refused by the server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from browser import DESKTOP, PHONE, chromium
from conftest import Running, topic
from playwright.async_api import expect

from gateway.store import registry

PASSWORD = "correct-horse-1"
SENSOR = "bosun/yacht/c101/sensor/t-1/temperature"
BUTTON = "bosun/yacht/c101/button/b-1/heartbeat"


async def _users(gateway: Running, *users: tuple[str, str]) -> None:
    for name, role in users:
        await gateway.gw.writer.run(lambda c, n=name, r=role: registry.add_user(c, n, r, PASSWORD, "test"))


async def _device(gateway: Running, paho_clients: Any, device_id: str, type_: str) -> Any:
    password = await gateway.add_device(device_id, type_=type_)
    client = paho_clients(gateway.mqtt_port, device_id, device_id, password)
    await asyncio.to_thread(client.connect)
    return client


async def test_traffic_page_streams_only_the_topics_its_wildcard_matches(gateway: Running, paho_clients: Any) -> None:
    await _users(gateway, ("ines", "installer"))
    sensor = await _device(gateway, paho_clients, "t-1", "sensor")
    button = await _device(gateway, paho_clients, "b-1", "button")
    async with chromium(gateway.url) as browser:
        page = await browser.signed_in("ines", PASSWORD)
        await page.goto("/traffic")
        await page.fill("#traffic-filter input[name=topic]", "bosun/#/x")
        await page.click("#traffic-filter button")
        await expect(page.locator("#filter-error")).to_contain_text("is not an MQTT topic filter")

        await page.fill("#traffic-filter input[name=topic]", "bosun/+/+/sensor/#")
        await page.click("#traffic-filter button")
        await expect(page.locator("#stream-state")).to_have_text("live · bosun/+/+/sensor/#")
        await expect(page.locator("#filter-error")).to_be_hidden()
        assert page.url.endswith("/traffic?topic=bosun%2F%2B%2F%2B%2Fsensor%2F%23")

        await asyncio.to_thread(button.publish, topic("b-1", "heartbeat"), "{}")
        await asyncio.to_thread(sensor.publish, topic("t-1", "temperature", type_="sensor"), json.dumps({"c": 21.5}))
        shown = page.locator("#stream .msg")
        await expect(shown.locator(".topic")).to_have_text([SENSOR], timeout=3000)
        await expect(shown.locator("pre")).to_have_text('{\n  "c": 21.5\n}')  # indented JSON
        await gateway.wait_for("SELECT id FROM traffic WHERE topic = ?", (BUTTON,))
        await asyncio.sleep(0.5)  # two more polls: the heartbeat, logged before the reading, never shows
        await expect(shown).to_have_count(1)

        await page.click("#pause")
        await expect(page.locator("#stream-state")).to_have_text("paused")
        await asyncio.to_thread(sensor.publish, topic("t-1", "temperature", type_="sensor"), json.dumps({"c": 22}))
        await gateway.wait_for("SELECT id FROM traffic WHERE topic = ?", (SENSOR,), count=2)
        await asyncio.sleep(0.5)
        await expect(shown).to_have_count(1)  # paused: nothing new on screen
        await page.click("#pause")  # resume: what came meanwhile arrives, nothing is lost
        await expect(shown).to_have_count(2)
        await expect(shown.first.locator("pre")).to_have_text('{\n  "c": 22\n}')  # newest first
        await browser.shot(page, "traffic-desktop")

        async with page.expect_download() as info:
            await page.click("#export")
        download = await info.value
        saved = await download.path()
        exported = (await asyncio.to_thread(Path(saved).read_text)).splitlines()
        assert [json.loads(line)["topic"] for line in exported] == [SENSOR, SENSOR]
        assert json.loads(json.loads(exported[0])["payload"]) == {"c": 21.5}

        phone = await browser.signed_in("ines", PASSWORD, PHONE)
        await phone.goto("/traffic?topic=bosun/%2B/%2B/%2B/%2B/%2B")
        await expect(phone.locator("#stream-state")).to_have_text("live · bosun/+/+/+/+/+")
        await asyncio.to_thread(button.publish, topic("b-1", "heartbeat"), "{}")
        await expect(phone.locator("#stream .msg .topic")).to_have_text([BUTTON], timeout=3000)
        await expect(phone.locator("#history")).to_contain_text(SENSOR)  # the log, server-rendered
        await browser.shot(phone, "traffic-phone")


async def test_settings_and_users_work_by_form_in_the_browser(gateway: Running, paho_clients: Any) -> None:
    await _users(gateway, ("ada", "admin"))
    await gateway.add_device("b-1", room="c101")
    await gateway.add_device("b-2", room="c102")
    await gateway.add_device("w-1", room="crew", type_="watch")
    async with chromium(gateway.url) as browser:
        page = await browser.signed_in("ada", PASSWORD)
        await page.goto("/settings")
        row = page.locator("tr[data-room='yacht/c101']")
        await row.locator("input[name=name]").fill("Owner's cabin")
        await row.locator("input[name=zone]").fill("aft")
        await row.locator("button:has-text('Save')").click()
        await expect(page.locator("p.ok")).to_have_text("Room yacht/c101 saved.")
        await page.locator("tr[data-room='yacht/c102'] button:has-text('Turn on')").click()
        await expect(page.locator("tr[data-room='yacht/c102'] .badge.dnd")).to_have_text("on")
        await page.fill("input[name='duty-w-1']", "aft")
        await page.click("#duty-form button")
        await expect(page.locator("p.ok")).to_have_text("Duty saved.")
        await expect(page.locator("input[name='duty-w-1']")).to_have_value("aft")
        await page.evaluate("window.scrollTo(0, 0)")  # a full-page shot with the sticky header on top
        await browser.shot(page, "settings-desktop")

        await page.goto("/users")
        await page.fill("#add-user input[name=username]", "bob")
        await page.select_option("#add-user select[name=role]", "crew")
        await page.fill("#add-user input[name=password]", "first-pass-1")
        await page.fill("#add-user input[name=repeat]", "first-pass-1")
        await page.click("#add-user button")
        await expect(page.locator("p.ok")).to_have_text("User bob added.")
        await page.locator("tr[data-user='admin'] button:has-text('Disable')").click()  # the first-start admin
        await expect(page.locator("tr[data-user='admin'] .state")).to_have_text("disabled")
        await page.locator("tr[data-user='ada'] select[name=role]").select_option("crew")
        await page.locator("tr[data-user='ada'] button:has-text('Set role')").click()
        await expect(page.locator("p.error")).to_contain_text("ada is the last enabled admin")
        await page.locator("tr[data-user='bob'] button:has-text('Disable')").click()
        await expect(page.locator("tr[data-user='bob'] .state")).to_have_text("disabled")
        await browser.shot(page, "users-desktop")
    assert gateway.rows("SELECT zone FROM rooms WHERE room = 'c101'") == [("aft",)]
    assert gateway.rows("SELECT role, disabled FROM users WHERE username = 'bob'") == [("crew", 1)]


async def test_crew_is_refused_admin_pages_and_forms_need_their_token(gateway: Running) -> None:
    await _users(gateway, ("maria", "crew"))
    async with chromium(gateway.url) as browser:
        page = await browser.signed_in("maria", PASSWORD, DESKTOP)
        for path in ("/users", "/audit"):
            assert await page.locator(f"nav a[href='{path}']").count() == 0
            response = await page.goto(path)
            assert response is not None and response.status == 403, path  # the server refuses, not just the menu
            await expect(page.locator(".error")).to_contain_text("role crew may not do this")
        await page.goto("/calls")
        status = await page.evaluate("fetch('/logout', {method: 'POST'}).then(r => r.status)")
        assert status == 403  # no CSRF token: refused, still signed in
        await page.reload()
        await expect(page.locator(".who")).to_contain_text("maria (crew)")
        await page.click("button:has-text('Sign out')")
        await page.wait_for_url("**/login")
