"""Crew calls at the transaction level: priority, attach and upgrade, escalation tiers from stored times."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from conftest import Running, topic


async def _watch(gateway: Running, paho_clients: Any, watch_id: str, room: str = "crew") -> Any:
    password = await gateway.add_device(watch_id, room=room, type_="watch")
    client = paho_clients(gateway.mqtt_port, watch_id, watch_id, password)
    await asyncio.to_thread(client.connect)
    await asyncio.to_thread(client.subscribe, topic(watch_id, "cmd/#", room=room, type_="watch"), 2)
    await asyncio.to_thread(client.publish, topic(watch_id, "availability", room=room, type_="watch"), "online")
    return client


async def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _notifies(client: Any) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in client.messages if m.topic.endswith("/cmd/notify")]


async def test_press_notifies_watches_and_accept_wins(gateway: Running, paho_clients: Any) -> None:
    w1 = await _watch(gateway, paho_clients, "w1")
    w2 = await _watch(gateway, paho_clients, "w2")
    password = await gateway.add_device("b1")
    button = paho_clients(gateway.mqtt_port, "b1", "b1", password)
    await asyncio.to_thread(button.connect)
    await asyncio.to_thread(button.subscribe, topic("b1", "cmd/#"), 2)
    await asyncio.to_thread(button.publish, topic("b1", "press"), json.dumps({"sequence_id": 1}))
    await _wait(lambda: _notifies(w1) and _notifies(w2) and _notifies(button))
    new = _notifies(w1)[0]
    assert new["state"] == "new" and new["priority"] == "normal" and new["room"] == "c101"
    assert _notifies(button)[0]["state"] == "received"
    ack = {"command_id": new["command_id"], "status": "accepted"}
    await asyncio.to_thread(w1.publish, topic("w1", "ack", room="crew", type_="watch"), json.dumps(ack))
    await _wait(lambda: len(_notifies(w2)) == 2 and len(_notifies(button)) == 2)
    assert _notifies(w2)[1]["state"] == "taken"
    assert _notifies(w1)[1]["state"] == "accepted"
    assert _notifies(button)[1]["state"] == "accepted"
    async with gateway.http() as http:
        calls = (await http.get("/api/v1/calls")).json()
        assert [(c["state"], c["accepted_by"]) for c in calls] == [("accepted", "device:w1")]
        detail = (await http.get(f"/api/v1/calls/{calls[0]['id']}")).json()
        kinds = [t["kind"] for t in detail["timeline"]]
        assert kinds[0] == "created" and "accepted" in kinds
