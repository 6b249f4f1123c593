"""MQTT 3.1.1 persistent sessions across a gateway restart, and acknowledged messages across kill -9.

The in-process tests stop a gateway and start a new one on the same data dir (the MQTT port changes, the
sessions must not); the kill -9 test runs the gateway as a subprocess, as tests/test_lifecycle.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import subprocess
from pathlib import Path

import pytest
from mqttraw import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    ConnectionClosedError,
    MakeRaw,
    Packet,
    add_integration,
    publish_packet,
    start_gateway,
    started,
    topic,
)

ROOT = Path(__file__).resolve().parent.parent


def command_name(p: Packet) -> str:
    return p.topic.rsplit("/", 1)[-1]


@pytest.mark.parametrize("qos", [1, 2])
async def test_unacknowledged_deliveries_survive_a_restart(tmp_path: Path, raw: MakeRaw, qos: int) -> None:
    """MQTT 3.1.1 sections 3.1.2.4 and 4.4 [MQTT-4.4.0-1]: the session state of a CleanSession=0 client
    includes QoS 1 and 2 messages sent but not acknowledged and, for QoS 2, messages whose PUBREC was
    received but not their PUBCOMP. After a full gateway stop and start on the same data dir, the client
    reconnects with CleanSession=0, gets Session Present=1, the unacknowledged PUBLISH again with DUP=1
    and the same packet id, and (QoS 2) the PUBREL again; nothing else is re-sent.

    Stock amqtt 0.12.1 kept sessions only in memory: a restart (an SD-card appliance rebooting) lost every
    undelivered command.
    """
    data = tmp_path / "var"
    async with started(data) as gw:
        password = await gw.add_device("btn-1")
        dev = raw(gw.mqtt_port)
        connack = await dev.connect("btn-1", "btn-1", password, clean=False)
        assert connack.return_code == 0 and not connack.session_present, connack
        assert await dev.subscribe((topic("btn-1", "cmd/#"), qos)) == [qos]
        assert gw.gw.commands is not None
        await gw.gw.commands.send("btn-1", "identify", {}, "test")
        unacked = await dev.expect_publish()
        assert (unacked.qos, command_name(unacked)) == (qos, "identify")
        released: Packet | None = None
        if qos == 2:
            await gw.gw.commands.send("btn-1", "reset", {}, "test")
            released = await dev.expect_publish(where=lambda p: command_name(p) == "reset")
            dev.ack(PUBREC, released.pid)
            await dev.expect(PUBREL, where=lambda p: released is not None and p.pid == released.pid)
        dev.abort()  # no acknowledgement beyond this point

    async with started(data) as gw:
        again = raw(gw.mqtt_port)
        connack = await again.connect("btn-1", "btn-1", password, clean=False)
        assert connack.return_code == 0 and connack.session_present, connack
        resent = await again.expect_publish(where=lambda p: command_name(p) == "identify")
        assert (resent.dup, resent.pid, resent.qos, resent.payload) == (True, unacked.pid, qos, unacked.payload), resent
        if qos == 1:
            again.ack(PUBACK, resent.pid)
        else:
            assert released is not None
            await again.expect(PUBREL, where=lambda p: released is not None and p.pid == released.pid)
            again.ack(PUBCOMP, released.pid)
            again.ack(PUBREC, resent.pid)
            await again.expect(PUBREL, where=lambda p: p.pid == resent.pid)
            again.ack(PUBCOMP, resent.pid)
        assert gw.gw.commands is not None
        await gw.gw.commands.send("btn-1", "ota", {}, "test")
        after = await again.publishes_until(lambda p: command_name(p) == "ota")
        assert [command_name(p) for p in after] == ["ota"], f"re-sent again after acknowledgement: {after}"


async def test_persistent_subscriptions_and_queue_survive_a_restart(tmp_path: Path, raw: MakeRaw) -> None:
    """MQTT 3.1.1 section 3.1.2.4: a CleanSession=0 session (its subscriptions and the QoS 1/2 messages
    queued while it is offline) outlives the connection, here also a gateway restart: a command queued
    before the restart and one published after it, while the device is still offline, both arrive on
    reconnect (Session Present=1, no new SUBSCRIBE), in order, with RETAIN=0. A CleanSession=1 client's
    state is not restored.

    Stock amqtt 0.12.1 kept sessions in memory only; after a restart the device had no subscription and
    commands sent to it went nowhere.
    """
    data = tmp_path / "var"
    async with started(data) as gw:
        password = await gw.add_device("btn-1")
        other = await gw.add_device("btn-2")
        dev = raw(gw.mqtt_port)
        assert (await dev.connect("btn-1", "btn-1", password, clean=False)).return_code == 0
        assert await dev.subscribe((topic("btn-1", "cmd/#"), 1)) == [1]
        await dev.disconnect()
        transient = raw(gw.mqtt_port)
        assert (await transient.connect("btn-2", "btn-2", other, clean=True)).return_code == 0
        assert await transient.subscribe((topic("btn-2", "cmd/#"), 1)) == [1]
        await transient.disconnect()
        assert gw.gw.commands is not None
        await gw.gw.commands.send("btn-1", "identify", {}, "test")  # queued while offline

    async with started(data) as gw:
        assert gw.gw.commands is not None
        await gw.gw.commands.send("btn-1", "reset", {}, "test")  # offline after the restart: routed by the session
        again = raw(gw.mqtt_port, auto_ack=True)
        connack = await again.connect("btn-1", "btn-1", password, clean=False)
        assert connack.return_code == 0 and connack.session_present, connack
        got = [await again.expect_publish(), await again.expect_publish()]
        assert [command_name(p) for p in got] == ["identify", "reset"], got
        assert all(p.qos == 1 and not p.retain for p in got), got
        await gw.gw.commands.send("btn-1", "ota", {}, "test")  # and the subscription is live again
        assert command_name(await again.expect_publish()) == "ota"

        clean_one = raw(gw.mqtt_port)
        connack = await clean_one.connect("btn-2", "btn-2", other, clean=False)
        assert connack.return_code == 0 and not connack.session_present, "a clean session was restored"


async def test_retained_messages_survive_a_restart(tmp_path: Path, raw: MakeRaw) -> None:
    """MQTT 3.1.1 section 3.3.1.3 [MQTT-3.3.1-5]: the server stores a retained message so it can deliver it
    to future subscribers; a device's retained availability is still there after a gateway restart (and
    one cleared with an empty payload stays cleared).

    Stock amqtt 0.12.1 kept retained messages in memory only: after a reboot every dashboard showed no
    state until each device happened to publish again.
    """
    data = tmp_path / "var"
    async with started(data) as gw:
        p1 = await gw.add_device("btn-1")
        p2 = await gw.add_device("btn-2")
        one, two = raw(gw.mqtt_port), raw(gw.mqtt_port)
        assert (await one.connect("btn-1", "btn-1", p1)).return_code == 0
        assert (await two.connect("btn-2", "btn-2", p2)).return_code == 0
        await one.publish(topic("btn-1", "availability"), "online", qos=1, retain=True)
        await two.publish(topic("btn-2", "availability"), "online", qos=1, retain=True)
        await two.publish(topic("btn-2", "availability"), b"", qos=1, retain=True)
        await one.disconnect()
        await two.disconnect()
        watcher_password = await add_integration(gw, "ops", ["bosun/#"])

    async with started(data) as gw:
        watcher = raw(gw.mqtt_port, auto_ack=True)
        assert (await watcher.connect("ops-1", "ops", watcher_password)).return_code == 0
        assert await watcher.subscribe(("bosun/+/+/+/+/availability", 1)) == [1]
        got = await watcher.expect_publish()
        assert (got.topic, got.payload, got.retain) == (topic("btn-1", "availability"), b"online", True), got
        p3 = await gw.add_device("btn-3")
        three = raw(gw.mqtt_port)
        assert (await three.connect("btn-3", "btn-3", p3)).return_code == 0
        await three.publish(topic("btn-3", "availability"), "online", qos=1)  # live marker
        rest = await watcher.publishes_until(lambda p: p.topic == topic("btn-3", "availability"))
        assert [p.topic for p in rest] == [topic("btn-3", "availability")], f"cleared retained came back: {rest}"


# ---------------------------------------------------------------------------------------------- kill -9


def stop_gateway(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_every_pubacked_message_survives_kill_9_and_restart(tmp_path: Path, raw: MakeRaw) -> None:
    """MQTT 3.1.1 section 4.3.2: PUBACK transfers ownership of a QoS 1 message to the server. A device
    publishes numbered QoS 1 messages as fast as its 50-message in-flight window allows; the gateway is
    killed with SIGKILL mid-stream and restarted on the same data dir; every number that was PUBACKed is
    in the database.

    Stock amqtt 0.12.1 sent PUBACK as soon as the message was in an in-memory queue, so a crash lost
    acknowledged messages (research section 5). tests/test_lifecycle.py reads the database right after the
    kill; this one counts PUBACKs on the wire and checks after the gateway itself has recovered the file.
    """
    from gateway.store import registry

    conftest = importlib.import_module("conftest")  # at run time only: mypy would check conftest too
    db_rows, db_write = conftest.db_rows, conftest.db_write

    data = tmp_path / "var"
    _, password = db_write(
        data, lambda c: registry.add_device(c, registry.NewDevice("s1", "yacht", "engine", "sensor"), "test")
    )
    where = topic("s1", "temperature", room="engine", type_="sensor")
    proc, port, _ = await asyncio.to_thread(start_gateway, data)
    try:
        dev = raw(port)
        assert (await dev.connect("s1", "s1", password)).return_code == 0
        window = asyncio.Semaphore(50)
        in_flight: dict[int, int] = {}
        acked: set[int] = set()
        enough = asyncio.Event()

        async def send() -> None:
            n = 0
            while True:
                await window.acquire()
                pid = dev.pid()
                in_flight[pid] = n
                dev.send(publish_packet(where, json.dumps({"value": n}), qos=1, pid=pid))
                n += 1
                if n % 50 == 0:
                    await dev.flush()

        async def receive() -> None:
            while True:
                ack = await dev.expect(PUBACK, timeout=30)
                assert ack.pid is not None
                acked.add(in_flight.pop(ack.pid))
                window.release()
                if len(acked) >= 300:
                    enough.set()

        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), 10)
        proc.send_signal(signal.SIGKILL)  # mid-stream: the window is full of unacknowledged messages
        await asyncio.to_thread(proc.wait, 10)
        with contextlib.suppress(ConnectionClosedError):
            await asyncio.wait_for(receiver, 5)  # the PUBACKs already on the wire, then the closed socket
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError, AssertionError):
            await sender
        assert len(acked) >= 300, f"only {len(acked)} PUBACKs before the kill: the test proves little"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    proc, port, _ = await asyncio.to_thread(start_gateway, data)
    try:
        stored = {int(v) for (v,) in db_rows(data, "SELECT value FROM measurements WHERE device_id = 's1'")}
        lost = acked - stored
        assert not lost, f"{len(lost)} of {len(acked)} PUBACKed messages lost, e.g. {sorted(lost)[:5]}"
        after = raw(port)  # and the restarted gateway takes the device's next message
        assert (await after.connect("s1", "s1", password)).return_code == 0
        await after.publish(where, json.dumps({"value": -1}), qos=1)
        assert db_rows(data, "SELECT count(*) FROM measurements WHERE device_id = 's1' AND value = -1") == [(1,)]
    finally:
        await asyncio.to_thread(stop_gateway, proc)
