"""Who may connect and what they may touch: real broker, real paho and mosquitto clients."""

from __future__ import annotations

import asyncio
import json

from conftest import Paho, Running, require, run_cmd, topic


async def test_device_with_credentials_connects_and_wrong_ones_are_refused(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    ok = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    assert await asyncio.to_thread(ok.connect) == 0

    wrong = paho_clients(gateway.mqtt_port, "btn-1b", "btn-1", "not-the-password")
    assert await asyncio.to_thread(wrong.connect) == 5  # MQTT 3.1.1 section 3.2.2.3: 5 = not authorized

    unknown = paho_clients(gateway.mqtt_port, "ghost", "ghost", password)
    assert await asyncio.to_thread(unknown.connect) == 5

    anonymous = paho_clients(gateway.mqtt_port, "anon")
    assert await asyncio.to_thread(anonymous.connect) == 5

    failures = gateway.gw.health()["counters"]["auth_failures"]
    assert failures == {"bad_password": 1.0, "unknown_user": 1.0, "anonymous": 1.0}


async def test_mosquitto_pub_wrong_password_is_refused(gateway: Running) -> None:
    pub = require("mosquitto_pub")
    await gateway.add_device("btn-1")
    result = await run_cmd(
        pub,
        "-p",
        str(gateway.mqtt_port),
        "-i",
        "btn-1",
        "-u",
        "btn-1",
        "-P",
        "nope",
        "-q",
        "1",
        "-t",
        topic("btn-1", "press"),
        "-m",
        "{}",
    )
    assert result.returncode != 0
    assert b"not authori" in result.stderr.lower()
    assert gateway.rows("SELECT * FROM traffic") == []


async def test_device_may_not_use_another_devices_client_id(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    await gateway.add_device("btn-2")
    thief = paho_clients(gateway.mqtt_port, "btn-2", "btn-1", password)
    assert await asyncio.to_thread(thief.connect) == 5


async def test_foreign_namespace_publish_is_refused_and_not_stored(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    await gateway.add_device("btn-2", room="c102")
    device = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(device.connect)
    # into another device's namespace, into its own cmd/ topics, and outside the protocol root
    for target in (topic("btn-2", "press", room="c102"), topic("btn-1", "cmd/reset"), "other/thing"):
        await asyncio.to_thread(device.publish, target, json.dumps({"sequence_id": 1}), 1)
    # a publish that is allowed, sent last: once it is stored, the refused ones were handled before it
    await asyncio.to_thread(device.publish, topic("btn-1", "heartbeat"), "", 1)
    await gateway.wait_for("SELECT * FROM traffic")
    assert [r[0] for r in gateway.rows("SELECT topic FROM traffic")] == [topic("btn-1", "heartbeat")]
    assert gateway.rows("SELECT * FROM events WHERE type = 'press'") == []
    assert gateway.gw.health()["counters"]["drops"]["acl_publish"] == 3.0


async def test_subscribe_outside_own_cmd_is_refused(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    await gateway.add_device("btn-2")
    device = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(device.connect)
    assert await asyncio.to_thread(device.subscribe, "#") == [0x80]
    assert await asyncio.to_thread(device.subscribe, topic("btn-2", "cmd/#")) == [0x80]
    assert await asyncio.to_thread(device.subscribe, "bosun/yacht/+/button/+/cmd/#") == [0x80]
    assert await asyncio.to_thread(device.subscribe, topic("btn-1", "cmd/#")) == [2]


async def test_device_does_not_receive_another_devices_commands(gateway: Running, paho_clients) -> None:
    p1 = await gateway.add_device("btn-1")
    await gateway.add_device("btn-2")
    one = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", p1)
    await asyncio.to_thread(one.connect)
    await asyncio.to_thread(one.subscribe, topic("btn-1", "cmd/#"))
    assert gateway.gw.commands is not None
    await gateway.gw.commands.send("btn-2", "identify", {}, "test")
    await gateway.gw.commands.send("btn-1", "identify", {}, "test")
    assert await asyncio.to_thread(one.got_message.wait, 5)
    await asyncio.sleep(0.3)
    assert [m.topic for m in one.messages] == [topic("btn-1", "cmd/identify")]


async def test_will_on_a_foreign_topic_is_refused_at_connect(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    await gateway.add_device("btn-2")
    device = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    assert await asyncio.to_thread(device.connect, (topic("btn-2", "availability"), b"offline")) == 5


async def test_anonymous_clients_get_only_the_configured_patterns(tmp_path, paho_clients) -> None:
    from conftest import make_config

    from gateway.runtime import Gateway

    cfg = make_config(
        tmp_path / "var",
        **{
            "mqtt.allow_anonymous": "true",
            "mqtt.anonymous_subscribe": "public/#,bosun/#",
            "mqtt.anonymous_publish": "public/#",
            "mqtt.anonymous_deny": "bosun/+/+/+/+/cmd/#",
        },
    )
    gw = Gateway(cfg)
    await gw.start()
    try:
        anon = paho_clients(gw.mqtt_port, "viewer")
        assert await asyncio.to_thread(anon.connect) == 0
        assert await asyncio.to_thread(anon.subscribe, "public/#") == [2]
        assert await asyncio.to_thread(anon.subscribe, "private/#") == [0x80]
        assert await asyncio.to_thread(anon.subscribe, "bosun/yacht/c1/button/b1/cmd/#") == [0x80]
        await asyncio.to_thread(anon.publish, "private/x", "no", 1)
        await asyncio.to_thread(anon.publish, "public/x", "yes", 1)
        assert await asyncio.to_thread(anon.got_message.wait, 5)
        assert [m.topic for m in anon.messages] == ["public/x"]
        # deny wins over the allow list on delivery too
        anon.got_message.clear()
        assert await asyncio.to_thread(anon.subscribe, "bosun/#") == [2]
        assert gw.commands is not None
        from gateway.store import registry

        await gw.writer.run(lambda c: registry.add_device(c, registry.NewDevice("b1", "yacht", "c1", "button"), "t"))
        await gw.accounts.refresh()
        await gw.commands.send("b1", "identify", {}, "test")
        await asyncio.sleep(0.5)
        assert all("/cmd/" not in m.topic for m in anon.messages)
    finally:
        await gw.stop()


async def test_disabled_device_is_disconnected_and_refused(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    device = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(device.connect)
    async with gateway.http() as http:
        response = await http.put("/api/v1/devices/btn-1", json={"disabled": True})
        assert response.status_code == 200, response.text
    assert await asyncio.to_thread(device.disconnected.wait, 5), "a disabled device must be dropped at once"
    again = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    assert await asyncio.to_thread(again.connect) == 5


async def test_integration_account_is_limited_to_its_patterns(gateway: Running, paho_clients) -> None:
    from gateway.store import registry

    await gateway.gw.writer.run(
        lambda c: registry.add_integration(
            c, "nodered", "correct-horse-battery", ["bosun/+/+/sensor/+/telemetry"], ["lights/#"], "test"
        )
    )
    await gateway.gw.accounts.refresh()
    client = paho_clients(gateway.mqtt_port, "nodered-1", "nodered", "correct-horse-battery")
    assert await asyncio.to_thread(client.connect) == 0
    assert await asyncio.to_thread(client.subscribe, "bosun/yacht/+/sensor/+/telemetry") == [2]
    assert await asyncio.to_thread(client.subscribe, "bosun/#") == [0x80]
    # a device's id is that device's alone
    await gateway.add_device("btn-9")
    squatter = paho_clients(gateway.mqtt_port, "btn-9", "nodered", "correct-horse-battery")
    assert await asyncio.to_thread(squatter.connect) == 5


def test_paho_helper_is_importable() -> None:
    assert Paho


async def test_retained_messages_respect_the_acl(gateway: Running, paho_clients) -> None:
    """MQTT 3.1.1 section 3.3.1.3: a new subscription gets the retained messages it matches, and only those
    its ACL allows; stock amqtt sent every client the retained messages of everyone's filters."""
    from gateway.store import registry

    await gateway.gw.writer.run(
        lambda c: registry.add_integration(c, "dash", "dashboard-password", ["bosun/#"], [], "test")
    )
    await gateway.gw.accounts.refresh()
    dash = paho_clients(gateway.mqtt_port, "dash-1", "dash", "dashboard-password")
    await asyncio.to_thread(dash.connect)
    await asyncio.to_thread(dash.subscribe, "bosun/#")  # someone holds a broad filter

    p1 = await gateway.add_device("btn-1")
    p2 = await gateway.add_device("btn-2")
    one = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", p1)
    await asyncio.to_thread(one.connect)
    await asyncio.to_thread(one.publish, topic("btn-1", "availability"), "online", 1, True)

    two = paho_clients(gateway.mqtt_port, "btn-2", "btn-2", p2)
    await asyncio.to_thread(two.connect)
    await asyncio.to_thread(two.subscribe, topic("btn-2", "cmd/#"))
    await asyncio.sleep(0.5)
    assert two.messages == [], [m.topic for m in two.messages]

    late = paho_clients(gateway.mqtt_port, "dash-2", "dash", "dashboard-password")
    await asyncio.to_thread(late.connect)
    await asyncio.to_thread(late.subscribe, "bosun/+/+/+/+/availability")
    assert await asyncio.to_thread(late.got_message.wait, 5)
    assert [(m.topic, m.retain) for m in late.messages] == [(topic("btn-1", "availability"), True)]


async def test_a_device_added_by_another_process_connects_at_once(gateway: Running, paho_clients) -> None:
    """The CLI writes the registry from its own process; the broker looks again on an unknown name instead of
    refusing the device until its next poll (once a second)."""
    from conftest import db_write

    from gateway.store import registry

    _, password = db_write(
        gateway.data_dir,
        lambda c: registry.add_device(c, registry.NewDevice("btn-new", "yacht", "c101", "button"), "cli"),
    )
    client = paho_clients(gateway.mqtt_port, "btn-new", "btn-new", password)
    assert await asyncio.to_thread(client.connect) == 0
    stranger = paho_clients(gateway.mqtt_port, "nobody", "nobody", "x" * 30)
    assert await asyncio.to_thread(stranger.connect) == 5  # still refused: not authorized
