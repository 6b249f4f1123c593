"""Crew calls at the transaction level: priority, attach and upgrade, escalation tiers from stored times."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
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
    # three clients, three sockets: no order between them
    await _wait(lambda: len(_notifies(w1)) == 2 and len(_notifies(w2)) == 2 and len(_notifies(button)) == 2)
    assert _notifies(w2)[1]["state"] == "taken"
    assert _notifies(w1)[1]["state"] == "accepted"
    assert _notifies(button)[1]["state"] == "accepted"
    async with gateway.http() as http:
        calls = (await http.get("/api/v1/calls")).json()
        assert [(c["state"], c["accepted_by"]) for c in calls] == [("accepted", "device:w1")]
        detail = (await http.get(f"/api/v1/calls/{calls[0]['id']}")).json()
        kinds = [t["kind"] for t in detail["timeline"]]
        assert kinds[0] == "created" and "accepted" in kinds


async def _button(gateway: Running, paho_clients: Any, button_id: str, room: str = "c101") -> Any:
    password = await gateway.add_device(button_id, room=room)
    client = paho_clients(gateway.mqtt_port, button_id, button_id, password)
    await asyncio.to_thread(client.connect)
    return client


async def test_priority_is_the_highest_of_payload_press_type_and_device(gateway: Running, paho_clients: Any) -> None:
    plain = await _button(gateway, paho_clients, "b-plain", room="r1")
    vip = await _button(gateway, paho_clients, "b-vip", room="r2")
    async with gateway.http() as http:
        response = await http.put("/api/v1/devices/b-vip", json={"call_priority": "urgent"})
        assert response.status_code == 200, response.text
        bad = await http.put("/api/v1/devices/b-vip", json={"call_priority": "high"})
        assert bad.status_code == 400 and "call_priority" in bad.json()["message"]
    presses = [
        (plain, "b-plain", "r1", {"sequence_id": 1}),  # normal
        (vip, "b-vip", "r2", {"sequence_id": 1, "priority": "normal"}),  # the device's urgent wins
    ]
    for client, device, room, body in presses:
        await asyncio.to_thread(client.publish, topic(device, "press", room=room), json.dumps(body))
    rows = await gateway.wait_for("SELECT room, priority FROM calls ORDER BY room", count=2)
    assert rows == [("r1", "normal"), ("r2", "urgent")]
    # a long press asks for urgent (calls.press_priority default) and upgrades the open call of r1
    await asyncio.to_thread(
        plain.publish, topic("b-plain", "press", room="r1"), json.dumps({"sequence_id": 2, "press_type": "long"})
    )
    rows = await gateway.wait_for("SELECT presses, priority FROM calls WHERE room = 'r1' AND presses = 2")
    assert rows == [(2, "urgent")]
    audit = gateway.rows("SELECT actor, detail FROM audit_log WHERE action = 'call.upgraded'")
    assert audit == [("device:b-plain", json.dumps({"from": "normal", "to": "urgent"}, sort_keys=True))]


async def test_a_failing_call_transition_never_costs_the_press(gateway: Running, paho_clients: Any) -> None:
    """The press is the guest's record: a broken calls table fails the call, not the PUBACK or the event."""
    button = await _button(gateway, paho_clients, "b-1")
    await gateway.gw.writer.run(lambda c: c.execute("ALTER TABLE calls RENAME TO calls_gone"))
    await asyncio.to_thread(button.publish, topic("b-1", "press"), json.dumps({"sequence_id": 7}))  # PUBACKed
    events = await gateway.wait_for("SELECT sequence_id FROM events WHERE type = 'press'")
    assert events == [(7,)]
    assert gateway.gw.metrics.call_errors._value.get() == 1
    outbox = [msgpack.unpackb(body) for (body,) in gateway.rows("SELECT body FROM outbox")]
    assert [b["sequence_id"] for b in outbox if b.get("type") == "press"] == [7]  # the press still goes to HQ
    assert gateway.rows("SELECT 1 FROM outbox WHERE kind = 'call'") == []  # and no half-made call does


async def test_duty_and_rooms_validate_and_are_audited(gateway: Running, paho_clients: Any) -> None:
    await gateway.add_device("w-1", room="crew", type_="watch")
    await gateway.add_device("b-a", site="yacht", room="c7")
    await gateway.add_device("b-b", site="villa", room="c7")
    async with gateway.http() as http:
        ok = await http.put("/api/v1/duty", json={"w-1": ["deck-1", "c101"]})
        assert ok.status_code == 200 and ok.json() == {"w-1": ["c101", "deck-1"]}
        assert (await http.get("/api/v1/duty")).json() == {"w-1": ["c101", "deck-1"]}
        not_watch = await http.put("/api/v1/duty", json={"b-a": ["*"]})
        assert not_watch.status_code == 400 and "b-a is not a registered watch" in not_watch.json()["message"]
        assert (await http.get("/api/v1/duty")).json() == {"w-1": ["c101", "deck-1"]}  # nothing half-replaced
        ambiguous = await http.put("/api/v1/rooms/c7/dnd", json={"dnd": True})
        assert ambiguous.status_code == 400 and "villa, yacht" in ambiguous.json()["message"]
        dnd = await http.put("/api/v1/rooms/c7/dnd", params={"site": "villa"}, json={"dnd": True})
        assert dnd.status_code == 200 and dnd.json()["dnd"] is True and dnd.json()["changed_by"] == "admin"
        zone = await http.put("/api/v1/rooms/c7", params={"site": "yacht"}, json={"zone": "deck-1"})
        assert zone.json()["zone"] == "deck-1"
        rooms = {(r["site"], r["room"]): r for r in (await http.get("/api/v1/rooms")).json()}
        assert rooms[("villa", "c7")]["dnd"] is True and rooms[("yacht", "c7")]["dnd"] is False
        assert (await http.get("/api/v1/rooms/nowhere/dnd")).status_code == 404
    actions = [
        r[0] for r in gateway.rows("SELECT action FROM audit_log WHERE action LIKE 'duty%' OR action LIKE 'room%'")
    ]
    assert actions == ["duty.set", "room.dnd", "room.update"]


async def test_done_only_from_the_watch_that_has_the_call(gateway: Running, paho_clients: Any) -> None:
    w1 = await _watch(gateway, paho_clients, "w1")
    w2 = await _watch(gateway, paho_clients, "w2")
    button = await _button(gateway, paho_clients, "b1")
    await asyncio.to_thread(button.publish, topic("b1", "press"), json.dumps({"sequence_id": 1}))
    await _wait(lambda: _notifies(w1) and _notifies(w2))
    first, second = _notifies(w1)[0], _notifies(w2)[0]
    accept = {"command_id": first["command_id"], "status": "accepted"}
    await asyncio.to_thread(w1.publish, topic("w1", "ack", room="crew", type_="watch"), json.dumps(accept))
    await _wait(lambda: len(_notifies(w2)) == 2)  # taken
    stray = {"command_id": second["command_id"], "status": "done"}
    await asyncio.to_thread(w2.publish, topic("w2", "ack", room="crew", type_="watch"), json.dumps(stray))
    await _wait(lambda: len(_notifies(w2)) == 3)
    assert _notifies(w2)[2]["state"] == "taken"
    assert gateway.rows("SELECT state, accepted_by FROM calls") == [("accepted", "device:w1")]
    done = {"command_id": first["command_id"], "status": "done"}
    await asyncio.to_thread(w1.publish, topic("w1", "ack", room="crew", type_="watch"), json.dumps(done))
    rows = await gateway.wait_for("SELECT completed_by FROM calls WHERE state = 'completed'")
    assert rows == [("device:w1",)]
