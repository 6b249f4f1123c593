"""GET /api/v1/live: the live bus as Server-Sent Events, against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from conftest import Paho, Running, topic


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str | None, str | None]]:
    """(event, data, comment) per SSE message, parsed from the raw lines."""
    event = data = comment = None
    async for line in lines:
        if line == "":
            yield event, data, comment
            event = data = comment = None
        elif line.startswith(":"):
            comment = line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()


async def test_press_appears_on_the_stream(gateway: Running, paho_clients: Callable[..., Paho]) -> None:
    password = await gateway.add_device("btn-live")
    async with (
        gateway.http() as http,
        http.stream("GET", "/api/v1/live", timeout=httpx.Timeout(10, read=10)) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = _sse(response.aiter_lines())
        assert (await asyncio.wait_for(anext(messages), 5))[2] == "subscribed"

        client = paho_clients(gateway.mqtt_port, "btn-live", "btn-live", password)
        assert await asyncio.to_thread(client.connect) == 0
        press = {"timestamp": time.time(), "press_type": "long", "duration": 900, "sequence_id": 4242}
        await asyncio.to_thread(client.publish, topic("btn-live", "press"), json.dumps(press), 1)

        async def first_press() -> dict[str, Any]:
            async for event, data, _ in messages:
                if event == "event.press" and data is not None:
                    body: dict[str, Any] = json.loads(data)
                    return body
            raise AssertionError("stream ended")

        got = await asyncio.wait_for(first_press(), 5)
    assert got["device_id"] == "btn-live"
    assert got["sequence_id"] == 4242
    assert got["press_type"] == "long"
    assert got["room"] == "c101"


async def test_needs_a_token(gateway: Running) -> None:
    async with gateway.http(token=None) as http:
        assert (await http.get("/api/v1/live")).status_code == 401
    async with gateway.http(token="not-a-token") as http:
        assert (await http.get("/api/v1/live")).status_code == 401


async def test_stream_ends_promptly_when_the_gateway_stops(gateway: Running) -> None:
    async with (
        gateway.http() as http,
        http.stream("GET", "/api/v1/live", timeout=httpx.Timeout(10, read=10)) as response,
    ):
        messages = _sse(response.aiter_lines())
        assert (await asyncio.wait_for(anext(messages), 5))[2] == "subscribed"
        started = time.monotonic()
        stopping = asyncio.create_task(gateway.gw.stop())

        async def drain() -> None:
            async for _ in messages:
                pass

        await asyncio.wait_for(drain(), 5)
        await asyncio.wait_for(stopping, 5)
        # uvicorn's graceful timeout is 2 s: an open stream that ignored the stop would hold it that long
        assert time.monotonic() - started < 1.5


async def test_a_client_that_leaves_unsubscribes(gateway: Running) -> None:
    for _ in range(3):
        async with (
            gateway.http() as http,
            http.stream("GET", "/api/v1/live", timeout=httpx.Timeout(10, read=10)) as response,
        ):
            assert (await asyncio.wait_for(anext(_sse(response.aiter_lines())), 5))[2] == "subscribed"
    for _ in range(60):  # the server notices the disconnect on its next read
        if not gateway.gw.hub._subscribers:
            break
        await asyncio.sleep(0.05)
    assert not gateway.gw.hub._subscribers, "a closed stream kept its live-bus queue"
