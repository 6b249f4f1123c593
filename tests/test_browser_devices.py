"""The devices grid, a device's page and the dashboard in a real browser: live presence, markup shown as text,
a command whose ack arrives without a reload, and the screenshots the README links to."""

from __future__ import annotations

import asyncio
import json
import math
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


async def _device(gateway: Running, paho_clients: Any, device_id: str, room: str, type_: str, status: Any) -> Any:
    """A connected paho device with its Last Will (`availability: offline`) that has sent its status."""
    password = await gateway.add_device(device_id, room=room, type_=type_)
    client = paho_clients(gateway.mqtt_port, device_id, device_id, password)
    await asyncio.to_thread(client.connect, (topic(device_id, "availability", room=room, type_=type_), b"offline"))
    status_topic = topic(device_id, "status", room=room, type_=type_)
    await asyncio.to_thread(client.publish, status_topic, json.dumps(status))
    return client


async def _fits(page: Any, viewport: dict[str, int] | None) -> None:
    """Nothing makes the page wider than the screen (tables scroll inside their box)."""
    if viewport is not None:
        assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]


def _power_cut(client: Any) -> None:
    """The device loses power: the connection ends without DISCONNECT, so the broker publishes its will."""
    client.client.loop_stop()  # and paho does not reconnect
    client.client.socket().close()


async def test_the_grid_shows_a_device_going_offline_live_and_names_as_text(
    gateway: Running, paho_clients: Any
) -> None:
    await _users(gateway, ("maria", "crew"))
    button = await _device(gateway, paho_clients, "btn-1", "c101", "button", {"battery": 74, "rssi": -62})
    await _device(gateway, paho_clients, "btn-2", "c102", "button", {"battery": 9, "rssi": -88, "firmware": "1.4.2"})
    await _device(gateway, paho_clients, "watch-1", "crew", "watch", {"battery": 51, "rssi": -58, "firmware": "2.1"})
    await gateway.add_device("rep-1", room="deck2", type_="repeater")  # registered, never connected
    await gateway.gw.writer.run(lambda c: registry.update_device(c, "btn-1", {"name": "<b>bold</b>"}, "test"))
    await gateway.wait_for("SELECT 1 FROM devices WHERE online = 1 AND battery IS NOT NULL", count=3)

    async with chromium(gateway.url) as browser:
        page = await browser.signed_in("maria", PASSWORD, PHONE)
        await page.goto("/devices")
        await expect(page.locator("#live-state")).to_have_text("live")
        tile = page.locator('.tile[data-device="btn-1"]')
        await expect(tile.locator(".dot")).to_have_class("dot online")
        # the name is the text "<b>bold</b>", not a bold element
        await expect(tile.locator(".name")).to_have_text("<b>bold</b>")
        await expect(tile.locator(".name b")).to_have_count(0)
        await expect(page.locator('.tile[data-device="btn-2"] .battery')).to_have_class("battery low")
        await expect(page.locator('.tile[data-device="rep-1"] .state')).to_have_text("offline")
        await _fits(page, PHONE)
        await browser.shot(page, "devices-phone")

        await asyncio.to_thread(_power_cut, button)
        # no reload: the will's `availability: offline` is a presence change on the live bus
        await expect(tile.locator(".dot")).to_have_class("dot offline", timeout=3000)
        await expect(tile.locator(".state")).to_have_text("offline")
        await expect(page.locator('.tile[data-device="btn-2"] .dot')).to_have_class("dot online")

        await page.fill("input[name=q]", "watch")  # the search is a GET form: it works the same without script
        await page.click("button:has-text('Show')")
        await expect(page.locator(".tile")).to_have_count(1)
        await expect(page.locator(".tile .name")).to_have_text("watch-1")


async def test_device_page_and_dashboard_at_phone_and_desktop_width(gateway: Running, paho_clients: Any) -> None:
    await _users(gateway, ("ines", "installer"))
    sensor = await _device(
        gateway, paho_clients, "env-1", "bridge", "sensor", {"battery": 18, "rssi": -71, "firmware": "0.9.3"}
    )
    button = await _device(gateway, paho_clients, "btn-1", "c101", "button", {"battery": 80, "rssi": -60})
    await _device(gateway, paho_clients, "watch-1", "crew", "watch", {"battery": 64, "rssi": -55})
    await gateway.add_device("btn-9", room="c109")
    now = time.time()
    env = lambda action: topic("env-1", action, room="bridge", type_="sensor")  # noqa: E731
    for i in range(40):  # the last 40 minutes of a cabin's climate, one reading a minute
        reading = {
            "temperature": round(21 + 2 * math.sin(i / 6), 2),
            "humidity": 45 + i % 7,
            "time": now - 60 * (40 - i),
        }
        await asyncio.to_thread(sensor.publish, env("telemetry"), json.dumps(reading), 0)
    await asyncio.to_thread(sensor.publish, env("press"), json.dumps({"sequence_id": 1}))
    await gateway.wait_for("SELECT 1 FROM measurements WHERE metric = 'humidity'", count=40)
    await asyncio.to_thread(sensor.subscribe, env("cmd/#"))

    async with chromium(gateway.url) as browser:
        for viewport, suffix in ((None, "desktop"), (PHONE, "phone")):
            page = await browser.signed_in("ines", PASSWORD, viewport)
            await page.goto("/devices/env-1")
            await expect(page.locator("#live-state")).to_have_text("live")
            await expect(page.locator("figure.chart-card svg")).to_have_count(2)
            await expect(page.locator('figure[data-metric="temperature"] svg')).to_have_attribute("data-points", "40")
            await expect(page.locator("#device-events")).to_contain_text("press")
            if suffix == "desktop":
                # identify posts in place; the device's ack comes back over the live bus, no reload
                sensor.got_message.clear()
                await page.click("#device-commands button:has-text('Identify')")
                assert await asyncio.to_thread(sensor.got_message.wait, 5)
                command_id = json.loads(sensor.messages[-1].payload)["command_id"]
                ack = {"command_id": command_id, "status": "done", "detail": "blinked 3 times"}
                await asyncio.to_thread(sensor.publish, env("ack"), json.dumps(ack))
                row = page.locator(f'tr[data-command="{command_id}"] .status')
                await expect(row).to_contain_text("done", timeout=3000)
                await expect(row).to_contain_text("blinked 3 times")
            await _fits(page, viewport)
            await browser.shot(page, f"device-{suffix}")

            await page.goto("/dashboard")
            await expect(page.locator("#devices-online")).to_have_text("3")
            await expect(page.locator("#devices-offline")).to_have_text("1")
            await expect(page.locator("#devices-low")).to_have_text("1")
            await expect(page.locator("#open-calls")).to_have_text("1")
            await expect(page.locator("#dash-rate svg.spark")).to_be_visible()
            await expect(page.locator("#dash-system-health")).to_contain_text("Memory")
            await _fits(page, viewport)
            await browser.shot(page, f"dashboard-{suffix}")

        await asyncio.to_thread(_power_cut, button)  # the dashboard's device figures are live too
        await expect(page.locator("#devices-offline")).to_have_text("2", timeout=3000)
        await expect(page.locator("#devices-online")).to_have_text("2")
