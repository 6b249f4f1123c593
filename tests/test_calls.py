"""Crew calls (issue 4) end to end: a real gateway, paho clients as a call button and two crew watches.

Every assertion is on what people and devices see: `cmd/notify` messages on the watches and the button,
the JSON API, and audit_log rows. Waits poll with a deadline; the only fixed waits prove a DND call does not
escalate and place the restart test's kill between two tiers.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mqttraw import GatewayUnderTest, start_gateway, started

from gateway.store import registry

Json = dict[str, Any]
MakeClient = Callable[..., Any]  # the conftest `paho_clients` factory (conftest.Paho)

SITE = "yacht"
ROOM = "c101"  # the guest cabin with the call button
CREW_ROOM = "crew-mess"  # where the watches are registered: their notify topics use it, not the call's room
FAST = {"calls.escalation_normal": [1, 2, 3]}  # tiers after 1, 2 and 3 seconds
DEVICES = [("btn-1", ROOM, "button"), ("watch-a", CREW_ROOM, "watch"), ("watch-b", CREW_ROOM, "watch")]


@dataclass
class Device:
    """A registered, connected device (a paho client) that reads its own `cmd/notify` messages."""

    device_id: str
    room: str
    type_: str
    client: Any
    seq: int = 0

    def topic(self, action: str) -> str:
        return f"bosun/{SITE}/{self.room}/{self.type_}/{self.device_id}/{action}"

    def notify_messages(self, call_id: Any = None) -> list[tuple[Json, int]]:
        """(payload, delivery QoS) of every cmd/notify received, oldest first."""
        out = []
        for message in list(self.client.messages):
            if message.topic != self.topic("cmd/notify"):
                continue
            body = json.loads(message.payload)
            if call_id is None or body.get("call_id") == call_id:
                out.append((body, message.qos))
        return out

    def notifies(self, call_id: Any = None) -> list[Json]:
        return [body for body, _ in self.notify_messages(call_id)]

    def states(self, call_id: Any = None) -> list[str]:
        return [n["state"] for n in self.notifies(call_id)]

    async def wait(self, state: str, call_id: Any = None, count: int = 1, timeout: float = 5.0) -> Json:
        """The `count`-th notify in `state` (for `call_id`), waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = [n for n in self.notifies(call_id) if n["state"] == state]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.device_id}: wanted {count} cmd/notify {state!r} for call {call_id}, "
                    f"got states {self.states(call_id)} (all: {self.notifies()})"
                )
            await asyncio.sleep(0.02)

    async def publish(self, action: str, body: Json) -> None:
        await asyncio.to_thread(self.client.publish, self.topic(action), json.dumps(body), 1)

    async def press(self, sequence_id: int | None = None, **extra: Any) -> int:
        """A button press (QoS 1); a fresh sequence_id unless one is given."""
        if sequence_id is None:
            self.seq += 1
            sequence_id = self.seq
        await self.publish("press", {"sequence_id": sequence_id, "timestamp": time.time(), **extra})
        return sequence_id

    async def ack(self, call_id: Any, status: str, latest: bool = False) -> None:
        """Answer on `ack` with the command id of the first (or latest) notify received for the call."""
        received = self.notifies(call_id)
        assert received, f"{self.device_id} got no notify for call {call_id} to answer"
        command_id = received[-1 if latest else 0]["command_id"]
        await self.publish("ack", {"command_id": command_id, "status": status})

    async def new_call(self, **press: Any) -> Any:
        """Press and return the id of the call the button is told was `received` (a call not seen before)."""
        known = {n["call_id"] for n in self.notifies()}
        await self.press(**press)
        deadline = time.monotonic() + 5
        while True:
            fresh = [n for n in self.notifies() if n["state"] == "received" and n["call_id"] not in known]
            if fresh:
                return fresh[0]["call_id"]
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.device_id}: no 'received' for a new call; notifies: {self.notifies()}")
            await asyncio.sleep(0.02)


def connect(
    make: MakeClient, port: int, device_id: str, password: str, room: str, type_: str, clean: bool = True
) -> Device:
    """Connect with the device's credentials, subscribe to its own cmd/# at QoS 2 and say it is online."""
    client = make(port, device_id, device_id, password, clean)
    assert client.connect() == 0
    assert client.subscribe(f"bosun/{SITE}/{room}/{type_}/{device_id}/cmd/#", 2) == [2]
    device = Device(device_id, room, type_, client)
    client.publish(device.topic("availability"), "online", 1, True)
    return device


async def crew(gw: GatewayUnderTest, make: MakeClient) -> tuple[Device, Device, Device]:
    """A call button in the cabin and two watches (watch-a, watch-b), all registered, connected and online."""
    devices = []
    for device_id, room, type_ in DEVICES:
        password = await gw.add_device(device_id, SITE, room, type_)
        devices.append(await asyncio.to_thread(connect, make, gw.mqtt_port, device_id, password, room, type_))
    online = await gw.wait_for("SELECT device_id FROM devices WHERE online = 1", count=3)
    assert len(online) == 3, online
    return devices[0], devices[1], devices[2]


async def user_token(gw: GatewayUnderTest, username: str, role: str) -> str:
    await gw.gw.writer.run(lambda c: registry.add_user(c, username, role, "a-good-password", "test"))
    return str(await gw.gw.writer.run(lambda c: registry.create_token(c, username, None, "test")))


async def get_call(http: httpx.AsyncClient, call_id: Any) -> Json:
    response = await http.get(f"/api/v1/calls/{call_id}")
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


async def wait_call(
    http: httpx.AsyncClient, call_id: Any, predicate: Callable[[Json], bool], timeout: float = 5.0
) -> Json:
    """GET the call until `predicate` holds, or fail showing the last state."""
    deadline = time.monotonic() + timeout
    while True:
        call = await get_call(http, call_id)
        if predicate(call):
            return call
        if time.monotonic() > deadline:
            raise AssertionError(f"call {call_id} never matched; last: {call}")
        await asyncio.sleep(0.05)


def audit_rows(gw: GatewayUnderTest, call_id: Any) -> list[tuple[float, str, str]]:
    """(ts, actor, action) of the call's audit rows, in the order written."""
    rows = gw.rows("SELECT ts, actor, action FROM audit_log WHERE target = ? ORDER BY id", (f"call:{call_id}",))
    return [(float(ts), str(actor), str(action)) for ts, actor, action in rows]


async def post(http: httpx.AsyncClient, call_id: Any, verb: str, body: Json | None = None) -> httpx.Response:
    return await http.post(f"/api/v1/calls/{call_id}/{verb}", json=body if body is not None else {})


# --- a press reaches the crew -----------------------------------------------------------------------------------


async def test_press_creates_one_call_and_both_watches_get_new_at_qos_2(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    for watch in (a, b):
        new = await watch.wait("new", call_id)
        assert [qos for _, qos in watch.notify_messages(call_id)] == [2], "cmd/notify must arrive at QoS 2"
        assert new["site"] == SITE and new["room"] == ROOM, new  # the call's place, not the watch's
        assert new["priority"] == "normal" and new["device_id"] == "btn-1" and new["presses"] == 1, new
        assert new["command_id"] and new["created_at"], new
    assert a.notifies(call_id)[0]["command_id"] != b.notifies(call_id)[0]["command_id"]
    assert button.states(call_id) == ["received"]
    assert [qos for _, qos in button.notify_messages(call_id)] == [2]

    async with gateway.http() as http:
        calls = (await http.get("/api/v1/calls")).json()
        assert [c["id"] for c in calls] == [call_id], calls
        call = calls[0]
        assert call["state"] == "open" and call["presses"] == 1 and call["priority"] == "normal", call
        assert (call["device_id"], call["site"], call["room"]) == ("btn-1", SITE, ROOM)
        assert call["dnd"] is False and call["escalation"] == 0 and call["escalation_state"] == "none"
        assert call["accepted_by"] is None and call["completed_at"] is None and call["cancelled_at"] is None

        # a delivery receipt is recorded for the watch that sent it, and only for it
        await a.ack(call_id, "received")

        def receipt(c: Json) -> bool:
            return any(n["device_id"] == "watch-a" and n["received_at"] for n in c["notifies"])

        detail = await wait_call(http, call_id, receipt)
        watch_b = [n for n in detail["notifies"] if n["device_id"] == "watch-b"]
        assert watch_b and all(n["received_at"] is None for n in watch_b), detail["notifies"]
    assert len(gateway.rows("SELECT 1 FROM events WHERE type = 'press'")) == 1


async def test_first_watch_accept_wins_and_the_other_is_told_taken(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)

    await a.ack(call_id, "accepted")
    await a.wait("accepted", call_id)
    await b.wait("taken", call_id)
    await button.wait("accepted", call_id)
    async with gateway.http() as http:
        call = await wait_call(http, call_id, lambda c: c["state"] == "accepted")
        assert call["accepted_by"] == "device:watch-a" and call["accepted_at"] >= call["created_at"], call

        # watch-b answers the screen it saw before "taken" arrived: it is told "taken" again, nothing changes
        await b.ack(call_id, "accepted")
        await b.wait("taken", call_id, count=2)
        again = await get_call(http, call_id)
    assert again["state"] == "accepted" and again["accepted_by"] == "device:watch-a", again
    assert again["accepted_at"] == call["accepted_at"]
    assert a.states(call_id) == ["new", "accepted"]
    assert b.states(call_id) == ["new", "taken", "taken"]
    assert button.states(call_id) == ["received", "accepted"]
    assert [r[2] for r in audit_rows(gateway, call_id)].count("call.accepted") == 1


async def test_second_press_attaches_and_a_higher_priority_upgrades(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)
    async with gateway.http() as http:
        first = await get_call(http, call_id)
        await button.press()
        attached = await wait_call(http, call_id, lambda c: c["presses"] == 2)
        assert attached["state"] == "open" and attached["priority"] == "normal", attached
        assert attached["last_press_at"] >= first["created_at"]
        assert [c["id"] for c in (await http.get("/api/v1/calls")).json()] == [call_id]

        await button.press(priority="urgent")
        upgraded = await wait_call(http, call_id, lambda c: c["presses"] == 3)
        assert upgraded["priority"] == "urgent" and upgraded["state"] == "open", upgraded
        assert [c["id"] for c in (await http.get("/api/v1/calls")).json()] == [call_id]
    for watch in (a, b):  # both were told of it already: the upgrade reaches them as "escalated"
        escalated = await watch.wait("escalated", call_id)
        assert escalated["priority"] == "urgent" and escalated["presses"] == 3, escalated
        assert "new" not in watch.states(call_id)[1:]
    actions = [r[2] for r in audit_rows(gateway, call_id)]
    assert actions.count("call.created") == 1 and actions.count("call.upgraded") == 1, actions


async def test_a_repeated_sequence_id_does_not_attach(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, _, _ = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    repeated = button.seq
    await button.press(sequence_id=repeated)  # a retransmission of the same press
    await button.press()  # a real second press, sent after it on the same connection
    async with gateway.http() as http:
        await wait_call(http, call_id, lambda c: c["presses"] >= 2)
        call = await get_call(http, call_id)
        assert call["presses"] == 2, call
        assert len((await http.get("/api/v1/calls")).json()) == 1
    assert len(gateway.rows("SELECT 1 FROM events WHERE type = 'press'")) == 2


# --- escalation -------------------------------------------------------------------------------------------------


async def test_an_unanswered_call_escalates_on_schedule(tmp_path: Path, paho_clients: MakeClient) -> None:
    async with started(tmp_path / "var", **FAST) as gw:
        button, a, b = await crew(gw, paho_clients)
        async with gw.http() as http:
            duty = await http.put("/api/v1/duty", json={"watch-a": [ROOM]})
            assert duty.status_code == 200 and duty.json() == {"watch-a": [ROOM]}, duty.text
            call_id = await button.new_call()
            await a.wait("new", call_id)

            seen: list[tuple[int, str]] = []
            deadline = time.monotonic() + 8
            while True:
                call = await get_call(http, call_id)
                step = (call["escalation"], call["escalation_state"])
                if not seen or seen[-1] != step:
                    seen.append(step)
                if call["escalation"] == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert seen == [(0, "none"), (1, "renotified"), (2, "all"), (3, "overdue")], seen
            assert call["state"] == "open" and call["escalated_at"] is not None, call
            stats = (await http.get("/api/v1/calls/stats")).json()
        assert stats["escalated"] == 1 and stats["missed"] == 1, stats

        await a.wait("escalated", call_id)  # tier 1: the same watch again
        first_for_b = await b.wait("escalated", call_id)  # tier 2: every watch, on duty or not
        assert b.states(call_id)[0] == "escalated", "watch-b is not on duty: it hears of the call at tier 2 only"
        assert first_for_b["priority"] == "normal", first_for_b
        async with gw.http() as http:
            notifies = (await get_call(http, call_id))["notifies"]
        sent_to_b = [n["sent_at"] for n in notifies if n["device_id"] == "watch-b"]
        assert sent_to_b and min(sent_to_b) >= call["created_at"] + 2 - 0.05, notifies

        rows = audit_rows(gw, call_id)
        escalations = [(ts, actor) for ts, actor, action in rows if action == "call.escalated"]
        assert [actor for _, actor in escalations] == ["system"] * 3, rows
        created = call["created_at"]
        for tier, (ts, _) in enumerate(escalations, start=1):
            assert ts >= created + tier - 0.05, f"tier {tier} came {ts - created:.2f} s after the call, before T{tier}"


async def test_escalation_continues_after_a_restart(
    tmp_path: Path, paho_clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bosun run` killed between T1 and T2 and started again: T2 and T3 come on the call's own schedule."""
    conftest = importlib.import_module("conftest")
    data = tmp_path / "var"
    passwords: dict[str, str] = {}
    for device_id, room, type_ in DEVICES:
        new = registry.NewDevice(device_id, SITE, room, type_)
        _, passwords[device_id] = conftest.db_write(data, lambda c, n=new: registry.add_device(c, n, "test"))

    def admin(c: Any) -> str:
        registry.add_user(c, "skipper", "admin", "a-good-password", "test")
        return str(registry.create_token(c, "skipper", None, "test"))

    headers = {"Authorization": f"Bearer {conftest.db_write(data, admin)}"}
    monkeypatch.setenv("BOSUN_CALLS_ESCALATION_NORMAL", "1,4,6")
    procs: list[subprocess.Popen[str]] = []

    async def run() -> tuple[list[Device], httpx.AsyncClient]:
        proc, mqtt_port, http_port = await asyncio.to_thread(start_gateway, data)
        procs.append(proc)
        devices = [
            # watches keep their session (clean=False): a notify sent while one reconnects is queued for it
            await asyncio.to_thread(connect, paho_clients, mqtt_port, d, passwords[d], room, type_, type_ == "button")
            for d, room, type_ in DEVICES
        ]
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", headers=headers, timeout=10)
        return devices, http

    try:
        first_run, http = await run()
        button = first_run[0]
        async with http:
            call_id = await button.new_call()
            call = await wait_call(http, call_id, lambda c: c["escalation"] == 1)
        created = call["created_at"]
        await asyncio.sleep(max(0.0, created + 1.5 - time.time()))  # well inside T1..T2
        procs[0].kill()
        assert await asyncio.to_thread(procs[0].wait, 10) == -signal.SIGKILL
        for device in first_run:
            device.client.close()
        restart_at = time.time()

        (_, a, b), http = await run()
        ready_at = time.time()  # the restarted gateway is serving (start-up can take seconds on a busy machine)
        async with http:
            seen: list[int] = []
            deadline = time.monotonic() + 10
            while True:
                call = await get_call(http, call_id)
                if not seen or seen[-1] != call["escalation"]:
                    seen.append(call["escalation"])
                if call["escalation"] == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert seen[-1] == 3 and seen == sorted(seen) and seen[0] >= 1, seen  # a slow start may see 2 and 3 due
        assert call["escalation_state"] == "overdue" and call["state"] == "open", call
        for watch in (a, b):  # tier 2, sent by the restarted gateway
            await watch.wait("escalated", call_id)

        rows = conftest.db_rows(
            data,
            "SELECT ts, actor FROM audit_log WHERE target = ? AND action = 'call.escalated' ORDER BY id",
            (f"call:{call_id}",),
        )
        times = [ts for ts, _ in rows]
        assert {actor for _, actor in rows} == {"system"}, rows
        # tier 1 before the kill and never again; then tier 2 and 3 (or one 1 -> 3 step if the start was so slow
        # that both were due by the first sweep)
        assert len(rows) in (2, 3) and times[0] < restart_at < times[1], (created, restart_at, rows)
        assert times[0] >= created + 1 - 0.05, f"tier 1 {times[0] - created:.2f} s after the call"
        if len(rows) == 3:
            assert times[1] >= created + 4 - 0.05, f"tier 2 {times[1] - created:.2f} s after the call"
        assert times[-1] >= created + 6 - 0.05, f"tier 3 {times[-1] - created:.2f} s after the call"
        # from stored times, T3 fires at created + 6 or, if that passed while the gateway was down, at its first
        # sweep; timers counted from the restart would fire it no sooner than restart_at + 6
        due = max(created + 6, ready_at)
        assert times[-1] < due + 1.5, f"T3 {times[-1] - due:.2f} s after it was due ({times[-1] - restart_at:.2f} s)"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --- emergency and DND ------------------------------------------------------------------------------------------


async def test_an_emergency_goes_to_every_watch_and_only_an_admin_cancels_it(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    crew_token = await user_token(gateway, "carol", "crew")
    installer_token = await user_token(gateway, "ivan", "installer")
    async with gateway.http() as admin:
        assert (await admin.put("/api/v1/duty", json={"watch-a": [ROOM]})).status_code == 200
        call_id = await button.new_call(priority="emergency")
        for watch in (a, b):  # watch-b is off duty and still told at once
            new = await watch.wait("new", call_id)
            assert new["priority"] == "emergency", new

        for token in (crew_token, installer_token):
            async with gateway.http(token) as http:
                refused = await post(http, call_id, "cancel", {"reason": "pressed by mistake"})
                assert refused.status_code == 403, refused.text
                assert refused.json()["message"], refused.text
        still = await get_call(admin, call_id)
        assert still["state"] == "open" and still["cancelled_at"] is None, still

        cancelled = await post(admin, call_id, "cancel", {"reason": "drill"})
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["state"] == "cancelled" and body["cancelled_by"] == "admin" and body["cancel_reason"] == "drill"
        for device in (a, b, button):
            await device.wait("cancelled", call_id)
        again = await post(admin, call_id, "cancel", {"reason": "twice"})
        assert again.status_code == 409 and again.json()["message"], again.text
    actions = [(actor, action) for _, actor, action in audit_rows(gateway, call_id)]
    assert ("admin", "call.cancelled") in actions and [x for _, x in actions].count("call.cancelled") == 1, actions


async def test_dnd_suppresses_a_normal_call_but_not_an_emergency(tmp_path: Path, paho_clients: MakeClient) -> None:
    async with started(tmp_path / "var", **FAST) as gw:
        button, a, b = await crew(gw, paho_clients)
        async with gw.http() as http:
            dnd = await http.put(f"/api/v1/rooms/{ROOM}/dnd", params={"site": SITE}, json={"dnd": True})
            assert dnd.status_code == 200, dnd.text
            assert dnd.json()["dnd"] is True and dnd.json()["room"] == ROOM and dnd.json()["site"] == SITE
            assert dnd.json()["changed_by"] == "admin"
            read = (await http.get(f"/api/v1/rooms/{ROOM}/dnd", params={"site": SITE})).json()
            assert read["dnd"] is True, read

            quiet = await button.new_call()  # the guest still sees the press was received
            call = await get_call(http, quiet)
            assert call["dnd"] is True and call["state"] == "open", call
            # past T1 and T2 of the shortened policy: a DND call never escalates and no watch hears of it
            await asyncio.sleep(max(0.0, call["created_at"] + 2.5 - time.time()))
            call = await get_call(http, quiet)
            assert call["escalation"] == 0 and call["escalation_state"] == "none", call
            assert a.notifies(quiet) == [] and b.notifies(quiet) == []

            assert (await post(http, quiet, "cancel", {"reason": "guest asleep"})).status_code == 200
            loud = await button.new_call(priority="emergency")
            assert loud != quiet
            for watch in (a, b):
                new = await watch.wait("new", loud)
                assert new["priority"] == "emergency", new
            assert a.notifies(quiet) == [] and b.notifies(quiet) == []


# --- answers from watches and from the API ----------------------------------------------------------------------


async def test_done_from_the_accepting_watch_completes_the_call(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)
    await a.ack(call_id, "accepted")
    await b.wait("taken", call_id)
    await b.ack(call_id, "done")  # not the watch that accepted it
    await a.ack(call_id, "done", latest=True)
    for device in (a, b, button):
        await device.wait("completed", call_id)
    async with gateway.http() as http:
        call = await wait_call(http, call_id, lambda c: c["state"] == "completed")
    assert call["completed_by"] == "device:watch-a" and call["completed_at"] >= call["accepted_at"], call
    assert button.states(call_id) == ["received", "accepted", "completed"]


async def test_declined_by_every_notified_watch_jumps_to_tier_2(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)
    async with gateway.http() as http:
        await a.ack(call_id, "declined")
        declined = await gateway.wait_for(
            "SELECT actor FROM audit_log WHERE target = ? AND action = 'call.declined'", (f"call:{call_id}",)
        )
        assert declined == [("device:watch-a",)], declined
        one = await get_call(http, call_id)
        assert one["escalation"] == 0 and one["state"] == "open", one

        await b.ack(call_id, "declined")
        call = await wait_call(http, call_id, lambda c: c["escalation"] == 2)
        assert call["escalation_state"] == "all" and call["state"] == "open", call
    for watch in (a, b):
        await watch.wait("escalated", call_id)
    actions = [action for _, _, action in audit_rows(gateway, call_id)]
    assert actions.count("call.declined") == 2 and "call.escalated" in actions, actions


async def test_accept_from_the_api_tells_the_watches_taken(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, a, b = await crew(gateway, paho_clients)
    token = await user_token(gateway, "carol", "crew")
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)
    async with gateway.http(token) as http:
        accepted = await post(http, call_id, "accept")
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["state"] == "accepted" and accepted.json()["accepted_by"] == "carol", accepted.text
        for watch in (a, b):
            await watch.wait("taken", call_id)
        await button.wait("accepted", call_id)

        await a.ack(call_id, "accepted")  # too late: told "taken" again
        await a.wait("taken", call_id, count=2)
        call = await get_call(http, call_id)
        assert call["accepted_by"] == "carol" and call["state"] == "accepted", call

        done = await post(http, call_id, "complete")
        assert done.status_code == 200 and done.json()["completed_by"] == "carol", done.text
    for device in (a, b, button):
        await device.wait("completed", call_id)


# --- the record -------------------------------------------------------------------------------------------------


async def test_every_transition_is_in_the_audit_log_with_actor_and_time(
    gateway: GatewayUnderTest, paho_clients: MakeClient
) -> None:
    started_at = time.time()
    button, a, b = await crew(gateway, paho_clients)
    token = await user_token(gateway, "carol", "crew")
    by_press = {"system", "device:btn-1"}

    # by the watches: declined, upgraded by a second press, accepted, done
    first = await button.new_call()
    await b.wait("new", first)
    await b.ack(first, "declined")
    await gateway.wait_for("SELECT 1 FROM audit_log WHERE target = ? AND action = 'call.declined'", (f"call:{first}",))
    await button.press(priority="urgent")
    await a.wait("escalated", first)
    await a.ack(first, "accepted", latest=True)
    await a.wait("accepted", first)
    await a.ack(first, "done", latest=True)
    await button.wait("completed", first)

    # from the API: accepted and completed by a crew member, then one cancelled
    async with gateway.http(token) as http:
        second = await button.new_call()
        assert (await post(http, second, "accept")).status_code == 200
        assert (await post(http, second, "complete")).status_code == 200
        third = await button.new_call()
        assert (await post(http, third, "cancel", {"reason": "guest changed their mind"})).status_code == 200

    expected = {
        first: [
            ("call.created", by_press),
            ("call.declined", {"device:watch-b"}),
            ("call.upgraded", by_press),
            ("call.accepted", {"device:watch-a"}),
            ("call.completed", {"device:watch-a"}),
        ],
        second: [("call.created", by_press), ("call.accepted", {"carol"}), ("call.completed", {"carol"})],
        third: [("call.created", by_press), ("call.cancelled", {"carol"})],
    }
    for call_id, wanted in expected.items():
        rows = await gateway.wait_for(
            "SELECT ts, actor, action FROM audit_log WHERE target = ? ORDER BY id", (f"call:{call_id}",), len(wanted)
        )
        got = [(str(action), str(actor)) for _, actor, action in rows]
        assert [action for action, _ in got] == [action for action, _ in wanted], (call_id, got)
        for (action, actor), (_, actors) in zip(got, wanted, strict=True):
            assert actor in actors, f"call {call_id} {action}: actor {actor!r}, expected one of {actors}"
        times = [float(ts) for ts, _, _ in rows]
        assert times == sorted(times) and times[0] >= started_at, (call_id, times)


async def test_the_timeline_lists_the_call_in_order(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, a, b = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    await a.wait("new", call_id)
    await b.wait("new", call_id)
    await a.ack(call_id, "accepted")
    await a.wait("accepted", call_id)
    await a.ack(call_id, "done", latest=True)
    await button.wait("completed", call_id)
    async with gateway.http() as http:
        call = await wait_call(http, call_id, lambda c: c["state"] == "completed")
    kinds = [entry["kind"] for entry in call["timeline"]]
    order = [kinds.index(kind) if kind in kinds else -1 for kind in ("created", "notified", "accepted", "completed")]
    assert -1 not in order and order == sorted(order), kinds
    assert kinds[0] == "created", kinds
    times = [entry["ts"] for entry in call["timeline"]]
    assert times == sorted(times), call["timeline"]
    accepted = call["timeline"][kinds.index("accepted")]
    completed = call["timeline"][kinds.index("completed")]
    assert accepted["actor"] == "device:watch-a" and completed["actor"] == "device:watch-a", call["timeline"]
    roles = {(n["device_id"], n["role"]) for n in call["notifies"]}
    assert {("watch-a", "watch"), ("watch-b", "watch"), ("btn-1", "button")} <= roles, call["notifies"]
    assert all(n["command_id"] and n["sent_at"] for n in call["notifies"]), call["notifies"]


async def test_stats_match_the_calls_created(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, _, _ = await crew(gateway, paho_clients)
    token = await user_token(gateway, "carol", "crew")
    async with gateway.http(token) as http:
        ids = []
        for press in ({}, {"press_type": "long"}):  # a long press is urgent (calls.press_priority default)
            call_id = await button.new_call(**press)
            assert (await post(http, call_id, "accept")).status_code == 200
            assert (await post(http, call_id, "complete")).status_code == 200
            ids.append(call_id)
        cancelled = await button.new_call()
        assert (await post(http, cancelled, "cancel", {"reason": "test"})).status_code == 200
        emergency = await button.new_call(priority="emergency")
        ids += [cancelled, emergency]

        assert (await get_call(http, ids[1]))["priority"] == "urgent"
        stats = (await http.get("/api/v1/calls/stats")).json()
        assert stats["total"] == 4, stats
        assert stats["by_priority"] == {"normal": 2, "urgent": 1, "emergency": 1}, stats
        states = {k: v for k, v in stats["by_state"].items() if v}
        assert states == {"completed": 2, "cancelled": 1, "open": 1}, stats
        for key in ("accept_s", "complete_s"):
            assert stats[key]["count"] == 2, stats
            assert 0 <= stats[key]["median"] <= stats[key]["p90"], stats
        assert stats["escalated"] == 0 and stats["missed"] == 0, stats
        assert stats["since"] <= time.time() - 23 * 3600, stats

        later = (await http.get("/api/v1/calls/stats", params={"since": time.time() + 60})).json()
        assert later["total"] == 0, later

        listed = (await http.get("/api/v1/calls")).json()
        assert [c["id"] for c in listed] == ids[::-1], "newest first"
        closed = (await http.get("/api/v1/calls", params={"state": "completed,cancelled"})).json()
        assert {c["id"] for c in closed} == set(ids[:3])
        assert [c["id"] for c in (await http.get("/api/v1/calls", params={"limit": 1})).json()] == [emergency]


async def test_roles_and_unknown_ids(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, _, _ = await crew(gateway, paho_clients)
    call_id = await button.new_call()
    async with gateway.http(token=None) as anonymous:
        for path in ("/api/v1/calls", f"/api/v1/calls/{call_id}", "/api/v1/calls/stats", "/api/v1/duty"):
            response = await anonymous.get(path)
            assert response.status_code == 401, path
            assert response.json()["message"], path
        for verb in ("accept", "complete", "cancel"):
            assert (await post(anonymous, call_id, verb)).status_code == 401, verb
    token = await user_token(gateway, "carol", "crew")
    async with gateway.http(token) as http:
        missing = await http.get("/api/v1/calls/987654")
        assert missing.status_code == 404 and missing.json()["message"], missing.text
        for verb in ("accept", "complete", "cancel"):
            response = await post(http, 987654, verb, {"reason": "x"} if verb == "cancel" else None)
            assert response.status_code == 404 and response.json()["message"], (verb, response.text)

        # crew may accept and complete; a closed call refuses with 409
        assert (await post(http, call_id, "accept")).status_code == 200
        twice = await post(http, call_id, "accept")
        assert twice.status_code == 409 and twice.json()["message"], twice.text
        assert (await post(http, call_id, "complete")).status_code == 200
        for verb in ("complete", "accept", "cancel"):
            late = await post(http, call_id, verb, {"reason": "x"} if verb == "cancel" else None)
            assert late.status_code == 409 and late.json()["message"], (verb, late.text)
        assert (await get_call(http, call_id))["state"] == "completed"


# --- duty, rooms, priorities, the live bus ----------------------------------------------------------------------


async def test_duty_labels_choose_the_watches(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, a, b = await crew(gateway, paho_clients)
    async with gateway.http() as http:
        assert (await http.get("/api/v1/duty")).json() == {}
        unknown = await http.put("/api/v1/duty", json={"ghost": ["*"]})
        assert unknown.status_code == 400 and "ghost" in unknown.json()["message"], unknown.text
        assert (await http.put("/api/v1/rooms/c101", params={"site": SITE}, json={"zone": "deck-2"})).status_code == 200
        mapping = {"watch-a": ["deck-9"], "watch-b": ["deck-2"]}
        put = await http.put("/api/v1/duty", json=mapping)
        assert put.status_code == 200 and put.json() == mapping, put.text
        assert (await http.get("/api/v1/duty")).json() == mapping
        rooms = (await http.get("/api/v1/rooms")).json()
        cabin = [r for r in rooms if r["site"] == SITE and r["room"] == ROOM]
        assert len(cabin) == 1 and cabin[0]["zone"] == "deck-2" and cabin[0]["dnd"] is False, rooms

        call_id = await button.new_call()
        await b.wait("new", call_id)  # its label is the cabin's zone
        call = await get_call(http, call_id)
        watches = {n["device_id"] for n in call["notifies"] if n["role"] == "watch"}
        assert watches == {"watch-b"}, call["notifies"]
        assert call["zone"] == "deck-2", call
    assert a.notifies(call_id) == []


async def test_a_device_default_priority_applies(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, a, _ = await crew(gateway, paho_clients)
    async with gateway.http() as http:
        changed = await http.put("/api/v1/devices/btn-1", json={"call_priority": "urgent"})
        assert changed.status_code == 200, changed.text
        call_id = await button.new_call()
        assert (await get_call(http, call_id))["priority"] == "urgent"
    assert (await a.wait("new", call_id))["priority"] == "urgent"


async def _sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str | None]]:
    event = data = None
    async for line in response.aiter_lines():
        if line == "":
            yield event, data
            event = data = None
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()


async def test_call_changes_are_live_bus_events(gateway: GatewayUnderTest, paho_clients: MakeClient) -> None:
    button, a, _ = await crew(gateway, paho_clients)
    async with (
        gateway.http() as http,
        http.stream("GET", "/api/v1/live", timeout=httpx.Timeout(10, read=10)) as response,
    ):
        assert response.status_code == 200
        events = _sse_events(response)
        await asyncio.wait_for(anext(events), 5)  # the "subscribed" comment
        call_id = await button.new_call()
        await a.wait("new", call_id)
        await a.ack(call_id, "accepted")

        async def call_events() -> list[Json]:
            got: list[Json] = []
            async for event, data in events:
                if event == "call" and data is not None:
                    got.append(json.loads(data))
                    if got[-1].get("state") == "accepted":
                        return got
            raise AssertionError("stream ended")

        got = await asyncio.wait_for(call_events(), 5)
    assert all(e["id"] == call_id and e.get("change") for e in got), got
    assert got[0]["state"] == "open" and got[-1]["accepted_by"] == "device:watch-a", got
