"""Everything a device publishes lands in its table and in the API; bad input is counted, never fatal."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
from conftest import Running, require, run_cmd, topic


async def _device(gateway: Running, paho_clients, device_id: str = "btn-1", **kw):
    password = await gateway.add_device(device_id, **kw)
    client = paho_clients(gateway.mqtt_port, device_id, device_id, password)
    await asyncio.to_thread(client.connect)
    return client, password


async def test_status_telemetry_and_press_land_in_tables_and_api(gateway: Running, paho_clients) -> None:
    device, _ = await _device(gateway, paho_clients, "sen-1", type_="sensor")
    status = {"battery": "85", "signalStrength": -45, "firmwareVersion": "1.2.3", "metadata": {"tempC": 23.5}}
    await asyncio.to_thread(device.publish, topic("sen-1", "status", type_="sensor"), json.dumps(status))
    await asyncio.to_thread(
        device.publish,
        topic("sen-1", "telemetry", type_="sensor"),
        json.dumps({"temperature": "21.5", "humidity": 40, "bad": "n/a", "memory": {"heapFreeKb": 12}}),
    )
    await asyncio.to_thread(
        device.publish,
        topic("sen-1", "co2", type_="sensor"),
        json.dumps({"value": 612, "time": "2026-01-02T03:04:05Z"}),
    )
    press = {
        "timestamp": "2026-01-02T03:04:06Z",
        "device_id": "liar",
        "press_type": "long",
        "duration": 1500,
        "sequence_id": 42,
        "priority": "urgent",
    }
    await asyncio.to_thread(device.publish, topic("sen-1", "press", type_="sensor"), json.dumps(press))

    async with gateway.http() as http:
        dev = (await http.get("/api/v1/devices/sen-1")).json()
        assert (dev["battery"], dev["signal"], dev["firmware"], dev["online"]) == (85.0, -45.0, "1.2.3", True)
        assert dev["status"]["metadata"] == {"temp_c": 23.5}

        rows = (await http.get("/api/v1/devices/sen-1/measurements")).json()
        assert {(r["metric"], r["value"]) for r in rows} == {
            ("temperature", 21.5),
            ("humidity", 40.0),
            ("memory.heap_free_kb", 12.0),
            ("co2", 612.0),
        }
        co2 = next(r for r in rows if r["metric"] == "co2")
        assert co2["ts"] == 1767323045.0  # the device's own timestamp
        assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
        only = (await http.get("/api/v1/devices/sen-1/measurements", params={"metric": "humidity"})).json()
        assert [(r["metric"], r["value"]) for r in only] == [("humidity", 40.0)]

        events = (await http.get("/api/v1/events", params={"type": "press"})).json()
        assert len(events) == 1
        event = events[0]
        assert (event["device_id"], event["sequence_id"], event["press_type"], event["priority"]) == (
            "sen-1",
            42,
            "long",
            "urgent",
        )  # device id from the topic, not the payload

    assert gateway.rows("SELECT kind, lane FROM outbox WHERE kind = 'event'") == [
        ("event", "state"),
        ("event", "priority"),
    ]


async def test_mosquitto_pub_messages_are_stored(gateway: Running) -> None:
    pub = require("mosquitto_pub")
    password = await gateway.add_device("btn-7")
    lines = "\n".join(json.dumps({"value": i}) for i in range(50)).encode()
    result = await run_cmd(
        pub,
        "-p",
        str(gateway.mqtt_port),
        "-i",
        "btn-7",
        "-u",
        "btn-7",
        "-P",
        password,
        "-q",
        "1",
        "-l",
        "-t",
        topic("btn-7", "temperature"),
        input_=lines,
    )
    assert result.returncode == 0, result.stderr
    # QoS 1 PUBACK is sent only after COMMIT: every acknowledged message is already in the database
    assert len(gateway.rows("SELECT * FROM measurements WHERE device_id = 'btn-7'")) == 50


async def test_duplicate_press_yields_one_event(gateway: Running, paho_clients) -> None:
    device, _ = await _device(gateway, paho_clients)
    press = json.dumps({"press_type": "single", "sequence_id": 9})
    for _ in range(3):
        await asyncio.to_thread(device.publish, topic("btn-1", "press"), press)
    await asyncio.to_thread(device.publish, topic("btn-1", "press"), json.dumps({"sequence_id": 10}))
    assert [r[0] for r in gateway.rows("SELECT sequence_id FROM events WHERE type='press' ORDER BY id")] == [
        9,
        10,
    ]
    assert gateway.gw.health()["counters"]["drops"]["duplicate_press"] == 2.0
    assert len(gateway.rows("SELECT * FROM traffic WHERE topic LIKE '%/press'")) == 4


async def test_bad_input_is_counted_and_the_gateway_keeps_serving(gateway: Running, paho_clients) -> None:
    device, _ = await _device(gateway, paho_clients)
    await asyncio.to_thread(device.publish, topic("btn-1", "status"), "{not json")
    await asyncio.to_thread(device.publish, topic("btn-1", "status"), b"\xff\xfe\x00")
    await asyncio.to_thread(device.publish, topic("btn-1", "bad level!"), "{}")
    await asyncio.to_thread(device.publish, topic("btn-1", "telemetry"), "x" * 70_000)
    await asyncio.to_thread(device.publish, topic("btn-1", "telemetry.mp"), b"\xc1")  # 0xc1 is never valid msgpack
    await asyncio.to_thread(device.publish, topic("btn-1", "temperature.mp"), msgpack.packb({"value": 3.5}))
    drops = gateway.gw.health()["counters"]["drops"]
    assert drops["bad_json"] == 1 and drops["not_utf8"] == 1 and drops["bad_segment"] == 1
    assert drops["oversized_payload"] == 1 and drops["bad_msgpack"] == 1
    errors = [r[0] for r in gateway.rows("SELECT error FROM traffic WHERE error IS NOT NULL ORDER BY id")]
    assert errors == ["bad_json", "not_utf8", "bad_segment", "bad_msgpack"]  # oversized is not even logged
    assert gateway.rows("SELECT metric, value FROM measurements") == [("temperature", 3.5)]
    # still serving, same connection and a new one
    await asyncio.to_thread(device.publish, topic("btn-1", "press"), json.dumps({"sequence_id": 1}))
    assert len(gateway.rows("SELECT * FROM events WHERE type = 'press'")) == 1


async def test_unknown_device_in_topic_is_counted(gateway: Running, paho_clients) -> None:
    from gateway.store import registry

    await gateway.gw.writer.run(
        lambda c: registry.add_integration(c, "bridge", "a-long-password", ["bosun/#"], ["bosun/#"], "test")
    )
    await gateway.gw.accounts.refresh()
    client = paho_clients(gateway.mqtt_port, "bridge-1", "bridge", "a-long-password")
    await asyncio.to_thread(client.connect)
    await asyncio.to_thread(client.publish, topic("nobody", "press"), json.dumps({"sequence_id": 1}))
    assert gateway.gw.health()["counters"]["drops"]["unknown_device"] == 1
    assert gateway.rows("SELECT * FROM events") == []

    # the topic's device check is cached per topic, and made again once the registry changes
    await gateway.add_device("nobody")
    await asyncio.to_thread(client.publish, topic("nobody", "press"), json.dumps({"sequence_id": 2}))
    assert gateway.gw.health()["counters"]["drops"]["unknown_device"] == 1
    assert [row[0] for row in gateway.rows("SELECT sequence_id FROM events WHERE type = 'press'")] == [2]


async def test_command_reaches_device_at_qos2_and_its_ack_marks_it_done(gateway: Running, paho_clients) -> None:
    device, _ = await _device(gateway, paho_clients)
    await asyncio.to_thread(device.subscribe, topic("btn-1", "cmd/#"), 2)
    async with gateway.http() as http:
        response = await http.post("/api/v1/devices/btn-1/command", json={"name": "identify", "args": {"blink": 3}})
        assert response.status_code == 202, response.text
        command = response.json()
        assert command["status"] in ("sent", "received")
        assert await asyncio.to_thread(device.got_message.wait, 5)
        message = device.messages[0]
        assert (message.topic, message.qos) == (topic("btn-1", "cmd/identify"), 2)
        body = json.loads(message.payload)
        assert body == {"command_id": command["command_id"], "blink": 3}
        await asyncio.to_thread(
            device.publish,
            topic("btn-1", "ack"),
            json.dumps({"command_id": body["command_id"], "status": "done", "detail": "ok"}),
        )
        after = (await http.get(f"/api/v1/commands/{command['command_id']}")).json()
        assert (after["status"], after["detail"]) == ("done", "ok")
        assert after["acked_at"] >= after["created_at"]
        listed = (await http.get("/api/v1/devices/btn-1/commands")).json()
        assert [c["command_id"] for c in listed] == [command["command_id"]]


async def test_ack_from_another_device_does_not_complete_a_command(gateway: Running, paho_clients) -> None:
    await gateway.add_device("btn-1")
    other, _ = await _device(gateway, paho_clients, "btn-2")
    assert gateway.gw.commands is not None
    command = await gateway.gw.commands.send("btn-1", "reset", {}, "test")
    await asyncio.to_thread(
        other.publish, topic("btn-2", "ack"), json.dumps({"command_id": command.command_id, "status": "done"})
    )
    assert gateway.rows("SELECT status FROM commands") == [("sent",)]


async def test_availability_and_last_will_drive_presence(gateway: Running, paho_clients) -> None:
    password = await gateway.add_device("btn-1")
    device = paho_clients(gateway.mqtt_port, "btn-1", "btn-1", password)
    await asyncio.to_thread(device.connect, (topic("btn-1", "availability"), b"offline"))
    await asyncio.to_thread(device.publish, topic("btn-1", "availability"), "online", 1, True)
    assert gateway.rows("SELECT online FROM devices") == [(1,)]
    # an abnormal disconnect: the broker publishes the will, ingest records it
    device.client._sock.close()  # no DISCONNECT packet: the connection just dies
    rows = await gateway.wait_for("SELECT payload FROM events WHERE type = 'presence'", count=2)
    assert [json.loads(r[0]) for r in rows] == [
        {"online": True, "reason": "availability"},
        {"online": False, "reason": "availability"},
    ]
    assert gateway.rows("SELECT online FROM devices") == [(0,)]


async def test_missed_heartbeats_mark_a_device_offline(tmp_path, paho_clients) -> None:
    from conftest import make_config

    from gateway.runtime import Gateway
    from gateway.store import registry

    gw = Gateway(make_config(tmp_path / "var", **{"presence.timeout_s": 1, "presence.check_s": 1}))
    await gw.start()
    try:
        _, password = await gw.writer.run(
            lambda c: registry.add_device(c, registry.NewDevice("w1", "yacht", "bridge", "watch"), "t")
        )
        await gw.accounts.refresh()
        client = paho_clients(gw.mqtt_port, "w1", "w1", password)
        await asyncio.to_thread(client.connect)
        await asyncio.to_thread(client.publish, "bosun/yacht/bridge/watch/w1/heartbeat", "", 0)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            rows = await gw.reader.fetchall("SELECT payload FROM events WHERE type = 'presence' ORDER BY id")
            if len(rows) == 2:
                break
            await asyncio.sleep(0.1)
        assert [json.loads(r[0])["reason"] for r in rows] == ["message", "timeout"]
    finally:
        await gw.stop()


async def test_a_write_that_fails_is_not_acknowledged(gateway: Running, paho_clients) -> None:
    """MQTT 3.1.1 section 4.3.2: PUBACK hands the message over; if it did not reach the disk, no PUBACK."""
    from conftest import db_write

    device, _ = await _device(gateway, paho_clients)
    db_write(
        gateway.data_dir,
        lambda c: c.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.type = 'press' "
            "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END"
        ),
    )
    info = device.client.publish(topic("btn-1", "press"), json.dumps({"sequence_id": 1}), qos=1)
    await asyncio.to_thread(info.wait_for_publish, 2)
    assert not info.is_published()
    assert gateway.gw.health()["counters"]["drops"]["store_error"] == 1
    # the connection and other messages are unaffected
    await asyncio.to_thread(device.publish, topic("btn-1", "heartbeat"), "", 1)


async def test_traffic_log_is_capped_but_every_measurement_is_stored(tmp_path) -> None:
    """store.traffic_rate caps the diagnostic traffic log; the records (measurements) are all kept."""
    from mqttraw import RawClient, started
    from mqttraw import topic as raw_topic

    async with started(tmp_path, **{"store.traffic_rate": 5}) as gw:
        password = await gw.add_device("sen-9", type_="sensor")
        client = RawClient(gw.mqtt_port)
        await client.connect("sen-9", "sen-9", password)
        for i in range(40):
            await client.publish(raw_topic("sen-9", "telemetry", type_="sensor"), json.dumps({"t": i}).encode(), qos=1)
        rows = await gw.wait_for("SELECT COUNT(*) FROM measurements WHERE device_id = 'sen-9' HAVING COUNT(*) = 40")
        assert rows == [(40,)]
        traffic = gw.rows("SELECT COUNT(*) FROM traffic WHERE client_id = 'sen-9'")[0][0]
        assert 5 <= traffic <= 8  # one second's burst, plus what refilled meanwhile
        assert gw.gw.metrics.traffic_skipped._value.get() == 40 - traffic
        await client.close()
