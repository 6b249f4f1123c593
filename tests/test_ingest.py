"""Everything a device publishes lands in its table and in the API; bad input is counted, never fatal."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
import pytest
from conftest import Running, require, run_cmd, topic

from gateway import config
from gateway.hub import Hub
from gateway.ingest import Ingest, Message
from gateway.metrics import Metrics
from gateway.models import Device


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
    # the traffic log is the bulk writer's, committed apart from the presses' own transactions
    assert len(await gateway.wait_for("SELECT * FROM traffic WHERE topic LIKE '%/press'", count=4)) == 4


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


# --- Ingest.submit on the loop, with a recording writer -------------------------------------------------------
# What submit does per message (rows and their order, presence, counters, drops, latency tracking) pinned without
# a broker or a database, so the hot path can be made cheaper without changing what it does.


class _Writer:
    """Records appends and ops; appended rows share one group future until `commit_group`. Telemetry is decoded on
    the loop, as with no bulk child (the child's decoding is tested against the real one)."""

    decodes_telemetry = False

    def on_telemetry(self, hook: Any) -> None:
        pass

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.group: asyncio.Future[Any] | None = None
        self.ops: list[asyncio.Future[Any]] = []

    def append(self, sql: str, row: tuple[Any, ...]) -> asyncio.Future[Any]:
        self.log.append((sql.split()[2].split("(")[0], *row))
        if self.group is None:
            self.group = asyncio.get_running_loop().create_future()
        return self.group

    def append_many(self, sql: str, rows: list[tuple[Any, ...]]) -> asyncio.Future[Any]:
        future = self.group
        for row in rows:
            future = self.append(sql, row)
        assert future is not None
        return future

    def submit(self, op: Any) -> asyncio.Future[Any]:
        self.log.append(("op",))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ops.append(future)
        return future

    def commit_group(self) -> None:
        assert self.group is not None
        self.group.set_result(None)
        self.group = None


class _Presence:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def seen(self, device_id: str, ts: float, transition: bool = True) -> None:
        self.log.append(("seen", device_id, ts, transition))

    def apply(self, kind: str, data: dict[str, Any]) -> None:
        self.log.append(("apply", kind))


class _Accounts:
    def __init__(self, devices: list[Device]) -> None:
        self.accounts: dict[str, Any] = {d.device_id: d for d in devices}

    def device(self, device_id: str) -> Device | None:
        return self.accounts.get(device_id)


def _ingest(**overrides: Any) -> tuple[Ingest, _Writer, _Accounts, Metrics]:
    cfg = config.load(None, {}, {"store.traffic_rate": 0, **overrides})
    writer = _Writer()
    accounts = _Accounts(
        [Device("s1", "yacht", "c101", "sensor", False), Device("b1", "yacht", "c101", "button", False)]
    )
    metrics = Metrics()
    presence = _Presence(writer.log)
    ingest = Ingest(cfg, writer, accounts, presence, Hub(metrics), metrics)  # type: ignore[arg-type]
    return ingest, writer, accounts, metrics


def _sample(metric: Any, name: str, **labels: str) -> float:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


S1 = "bosun/yacht/c101/sensor/s1/"
NOW = 1_767_323_000.0


async def test_submit_telemetry_rows_presence_and_counters() -> None:
    ingest, writer, _, metrics = _ingest()
    payload = b'{"temperature": 21.53, "humidity": 40.1}   '
    first = ingest.submit(Message("s1", S1 + "telemetry", payload, 1, False, NOW))
    second = ingest.submit(Message("s1", S1 + "telemetry", b'{"temperature": 22}', 0, True, NOW + 1))
    assert first is not None and first is second is writer.group  # one group: one latency callback
    assert writer.log == [
        ("seen", "s1", NOW, True),
        ("measurements", "s1", "temperature", NOW, 21.53),
        ("measurements", "s1", "humidity", NOW, 40.1),
        ("traffic", NOW, "in", "s1", S1 + "telemetry", 1, 0, len(payload), payload, None),
        ("seen", "s1", NOW + 1, True),
        ("measurements", "s1", "temperature", NOW + 1, 22.0),
        ("traffic", NOW + 1, "in", "s1", S1 + "telemetry", 0, 1, 19, b'{"temperature": 22}', None),
    ]
    assert all(type(row[4]) is float for row in writer.log if row[0] == "measurements")
    assert _sample(metrics.messages, "bosun_mqtt_messages_total", action="telemetry") == 0  # at the turn's end
    await asyncio.sleep(0)
    assert _sample(metrics.messages, "bosun_mqtt_messages_total", action="telemetry", direction="in") == 2
    assert _sample(metrics.stored, "bosun_stored_rows_total", table="measurements") == 3
    writer.commit_group()
    await asyncio.sleep(0)
    assert _sample(metrics.commit_latency, "bosun_ingest_commit_seconds_count") == 2


@pytest.mark.parametrize(
    ("action", "payload", "rows"),
    [
        # the device's own time when it is plausible, the receive time otherwise
        ("telemetry", b'{"t": 1, "time": 1767322000}', [("t", 1767322000.0, 1.0)]),
        ("telemetry", b'{"t": 1, "ts": 1767322000500}', [("t", 1767322000.5, 1.0)]),
        ("telemetry", b'{"t": 1, "time": 100}', [("t", NOW, 1.0)]),
        ("telemetry", b'{"t": 1, "time": 1767500000}', [("t", NOW, 1.0)]),
        ("telemetry", b'{"t": 1, "timestamp": "2026-01-02T03:04:05Z", "time": 5}', [("t", NOW, 1.0)]),
        ("telemetry", b'{"t": 1, "timestamp": "2026-01-02T03:04:05Z"}', [("t", 1767323045.0, 1.0)]),
        # seed 002 normalization, nesting, invalid numbers, identity keys
        (
            "telemetry",
            b'{"heapFreeKb": "12", "tempC": " 21.5 ", "bad": "n/a", "memory": {"usedPct": 3}, "nan": NaN, "big": 1e400,'
            b' "list": [1], "on": true, "none": null, "deviceId": "x", "sequence_id": 4, "fw_version": "1"}',
            [
                ("heap_free_kb", NOW, 12.0),
                ("temp_c", NOW, 21.5),
                ("memory.used_pct", NOW, 3.0),
                ("nan", NOW, None),
                ("big", NOW, None),
                ("on", NOW, 1.0),
                ("none", NOW, None),
            ],
        ),
        ("telemetry", b'{"a": 1, "A": 2, "a": 3}', [("a", NOW, 2.0)]),  # duplicate keys: the last one wins
        ("telemetry", b'{"n": 123456789012345678901234567890}', [("n", NOW, 1.2345678901234568e29)]),
        ("telemetry", '\ufeff {"t": 2}\u00a0'.encode(), [("t", NOW, 2.0)]),  # BOM and Unicode spaces
        # one value named after the action (levels become dots), a bare number
        ("temperature", b'{"value": "7", "unit": "C"}', [("temperature", NOW, 7.0)]),
        ("env/temp", b'{"value": 7, "time": 1767322000}', [("env.temp", 1767322000.0, 7.0)]),
        ("env/temp", b"21.5", [("env.temp", NOW, 21.5)]),
        ("env/temp", b' "-3" ', [("env.temp", NOW, -3.0)]),
        ("temperature.mp", msgpack.packb({"value": 3.5, "heapFreeKb": b"\x01"}), [("value", NOW, 3.5)]),
        ("temperature.mp", msgpack.packb(4), [("temperature", NOW, 4.0)]),
        ("telemetry", b'{"value": 1, "extra": 2}', [("value", NOW, 1.0), ("extra", NOW, 2.0)]),
        ("telemetry", b'{"": 5, "t": {"": 6}}', [("", NOW, 5.0), ("t.", NOW, 6.0)]),
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_submit_telemetry_forms(action: str, payload: bytes, rows: list[tuple[Any, ...]]) -> None:
    ingest, writer, _, _ = _ingest()
    future = ingest.submit(Message("s1", S1 + action, payload, 1, False, NOW))
    assert future is writer.group is not None
    assert writer.log == [
        ("seen", "s1", NOW, True),
        *[("measurements", "s1", name, when, value) for name, when, value in rows],
        ("traffic", NOW, "in", "s1", S1 + action, 1, 0, len(payload), payload, None),
    ]


@pytest.mark.parametrize(
    ("topic_", "payload", "reason", "action"),
    [
        (S1 + "telemetry", b'{"t": 1,}', "bad_json", "telemetry"),
        (S1 + "telemetry", b"[" * 5000, "bad_json", "telemetry"),
        (S1 + "telemetry", b'{"t": "\xff"}', "not_utf8", "telemetry"),
        (S1 + "telemetry", b'{"t": "\x01"}', "bad_json", "telemetry"),
        (S1 + "telemetry", b'{"t": 1} {}', "bad_json", "telemetry"),
        (S1 + "telemetry.mp", b"\xc1", "bad_msgpack", "telemetry"),
        (S1 + "telemetry", b"x" * 70_000, "oversized_payload", "other"),
        ("bosun/yacht/c101/sensor/s1", b"{}", "short_topic", "bad_topic"),
        (S1 + "bad level", b"{}", "bad_segment", "bad_topic"),
        ("bosun/yacht/c101/sensor/nobody/telemetry", b'{"t": 1}', "unknown_device", "telemetry"),
        ("bosun/yacht/c102/sensor/s1/telemetry", b'{"t": 1}', "wrong_namespace", "telemetry"),
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_submit_refusals_are_logged_and_counted(topic_: str, payload: bytes, reason: str, action: str) -> None:
    ingest, writer, _, metrics = _ingest()
    future = ingest.submit(Message("s1", topic_, payload, 1, False, NOW))
    kept = payload[:1024]
    assert writer.log == [("traffic", NOW, "in", "s1", topic_, 1, 0, len(payload), kept, reason)]
    assert future is writer.group is not None
    assert _sample(metrics.drops, "bosun_drops_total", reason=reason) == 1
    await asyncio.sleep(0)
    assert _sample(metrics.messages, "bosun_mqtt_messages_total", action=action, direction="in") == 1
    assert _sample(metrics.stored, "bosun_stored_rows_total", table="measurements") == 0


async def test_submit_other_routes() -> None:
    ingest, writer, _, metrics = _ingest()
    b1 = "bosun/yacht/c101/button/b1/"
    assert ingest.submit(Message("x", "other/thing", b"hi", 0, False, NOW)) is None
    nothing = ingest.submit(Message("s1", S1 + "telemetry", b'{"state": "ok", "t": [1]}', 0, False, NOW))
    empty = ingest.submit(Message("s1", S1 + "telemetry", b"", 0, False, NOW))
    command = ingest.submit(Message("s1", S1 + "cmd/notify", b'{"a": 1}', 0, False, NOW))
    status = ingest.submit(Message("b1", b1 + "status", b'{"battery": 80}', 1, False, NOW))
    availability = ingest.submit(Message("b1", b1 + "availability", b"online", 1, True, NOW))
    assert writer.log == [
        ("traffic", NOW, "in", "x", "other/thing", 0, 0, 2, b"hi", None),
        ("seen", "s1", NOW, True),
        ("traffic", NOW, "in", "s1", S1 + "telemetry", 0, 0, 25, b'{"state": "ok", "t": [1]}', None),
        ("seen", "s1", NOW, True),
        ("traffic", NOW, "in", "s1", S1 + "telemetry", 0, 0, 0, b"", None),
        ("seen", "s1", NOW, True),
        ("traffic", NOW, "in", "s1", S1 + "cmd/notify", 0, 0, 8, b'{"a": 1}', None),
        ("seen", "b1", NOW, True),
        ("traffic", NOW, "in", "b1", b1 + "status", 1, 0, 15, b'{"battery": 80}', None),
        ("op",),
        ("seen", "b1", NOW, False),
        ("traffic", NOW, "in", "b1", b1 + "availability", 1, 1, 6, b"online", None),
        ("op",),
    ]
    assert nothing is empty is command is writer.group is not None
    assert (status, availability) == tuple(writer.ops)
    assert _sample(metrics.drops, "bosun_drops_total", reason="no_measurements") == 2
    await asyncio.sleep(0)
    counts = {a: _sample(metrics.messages, "bosun_mqtt_messages_total", action=a) for a in ("other", "telemetry")}
    assert counts == {"other": 1, "telemetry": 2}
    assert _sample(metrics.messages, "bosun_mqtt_messages_total", action="cmd") == 1
    writer.commit_group()
    writer.ops[0].set_result([("device.status", {"device_id": "b1"})])
    writer.ops[1].set_result([])
    await asyncio.sleep(0)
    assert writer.log[-1] == ("apply", "device.status")
    assert _sample(metrics.commit_latency, "bosun_ingest_commit_seconds_count") == 3 + 2


async def test_submit_checks_a_topic_again_after_a_registry_reload() -> None:
    ingest, writer, accounts, metrics = _ingest()
    new = "bosun/yacht/c101/sensor/s2/telemetry"
    ingest.submit(Message("s2", new, b'{"t": 1}', 0, False, NOW))
    accounts.accounts = {**accounts.accounts, "s2": Device("s2", "yacht", "c101", "sensor", False)}
    ingest.submit(Message("s2", new, b'{"t": 2}', 0, False, NOW))
    accounts.accounts = {k: v for k, v in accounts.accounts.items() if k != "s1"}  # s1 removed
    ingest.submit(Message("s1", S1 + "telemetry", b'{"t": 3}', 0, False, NOW))
    assert [row for row in writer.log if row[0] != "traffic"] == [
        ("seen", "s2", NOW, True),
        ("measurements", "s2", "t", NOW, 2.0),
    ]
    assert [row[-1] for row in writer.log if row[0] == "traffic"] == ["unknown_device", None, "unknown_device"]
    assert _sample(metrics.drops, "bosun_drops_total", reason="unknown_device") == 2


async def test_submit_traffic_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    ingest, writer, _, metrics = _ingest(**{"store.traffic_rate": 3})
    logged = []
    for step in (0, 0, 0, 0, 0, 0.2, 0.2, 0.1, 5.0, 0, 0, 0, 0):
        clock[0] += step
        before = len(writer.log)
        ingest.submit(Message("s1", S1 + "telemetry", b'{"t": 1}', 0, False, NOW))
        logged.append(writer.log[before:][-1][0] == "traffic")
        await asyncio.sleep(0)  # the bucket is refilled at most once per loop turn
    ingest.submit(Message("s1", S1 + "telemetry", b"{", 0, False, NOW))  # errors are always logged
    assert writer.log[-1][-1] == "bad_json"
    assert logged == [True, True, True, False, False, False, True, False, True, True, True, False, False]
    await asyncio.sleep(0)
    assert _sample(metrics.traffic_skipped, "bosun_traffic_log_skipped_total") == logged.count(False)
    assert _sample(metrics.stored, "bosun_stored_rows_total", table="measurements") == len(logged)


async def test_traffic_budget_reads_the_clock_once_per_loop_turn_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst beyond the rate in one loop turn: the bucket is refilled once, then rows are skipped until the next
    turn even if the clock moved (one loop turn may carry thousands of messages)."""
    clock = [1000.0]
    reads = [0]

    def monotonic() -> float:
        reads[0] += 1
        return clock[0]

    monkeypatch.setattr(time, "monotonic", monotonic)
    ingest, writer, _, _ = _ingest(**{"store.traffic_rate": 2})
    reads[0] = 0
    logged = []
    for _ in range(6):
        clock[0] += 1.0
        before = len(writer.log)
        ingest.submit(Message("s1", S1 + "telemetry", b'{"t": 1}', 0, False, NOW))
        logged.append(writer.log[before:][-1][0] == "traffic")
    # two from the full bucket, one refill (1 s later: two more tokens), then nothing until the next turn
    assert logged == [True, True, True, True, False, False]
    assert reads[0] == 1
    await asyncio.sleep(0)
    clock[0] += 1.0
    before = len(writer.log)
    ingest.submit(Message("s1", S1 + "telemetry", b'{"t": 1}', 0, False, NOW))
    assert writer.log[before:][-1][0] == "traffic"


async def test_telemetry_the_bulk_child_decodes_is_stored_counted_and_logged(gateway: Running, paho_clients) -> None:
    """After a topic's first message (classified on the loop), its telemetry goes to the bulk child undecoded
    (gateway/telemetry.py): rows, device timestamps, the stored counter, and payloads that fail or hold no
    measurement (counted, logged, in the traffic log with the reason, still acknowledged) as on the loop."""
    assert gateway.gw.writer.decodes_telemetry
    device, _ = await _device(gateway, paho_clients, "sen-2", type_="sensor")
    telemetry_topic = topic("sen-2", "telemetry", type_="sensor")
    co2 = topic("sen-2", "co2", type_="sensor")
    for i in range(3):
        await asyncio.to_thread(device.publish, telemetry_topic, json.dumps({"temperature": 20.0 + i, "rh": 40.5}))
        await asyncio.to_thread(device.publish, co2, json.dumps({"value": 600 + i, "time": 1767322000 + i}))
    await asyncio.to_thread(device.publish, telemetry_topic, "{not json")
    await asyncio.to_thread(device.publish, telemetry_topic, json.dumps({"note": "no numbers"}))
    await asyncio.to_thread(device.publish, telemetry_topic, json.dumps({"temperature": 23.0}))
    rows = gateway.rows("SELECT metric, ts, value FROM measurements WHERE device_id = 'sen-2' ORDER BY id")
    assert [(m, v) for m, _, v in rows if m != "co2"] == [
        ("temperature", 20.0),
        ("rh", 40.5),
        ("temperature", 21.0),
        ("rh", 40.5),
        ("temperature", 22.0),
        ("rh", 40.5),
        ("temperature", 23.0),
    ]
    assert [(ts, v) for m, ts, v in rows if m == "co2"] == [(1767322000.0 + i, 600.0 + i) for i in range(3)]
    health = gateway.gw.health()["counters"]
    assert health["drops"]["bad_json"] == 1 and health["drops"]["no_measurements"] == 1
    assert health["stored"]["measurements"] == 10
    logged = await gateway.wait_for("SELECT payload, error FROM traffic WHERE error IS NOT NULL")
    assert logged == [(b"{not json", "bad_json")]


async def test_a_bad_payload_past_the_traffic_budget_is_still_logged_with_its_reason(tmp_path) -> None:
    """The traffic budget decides on the loop whether the child writes a message's traffic row; a payload the child
    then finds bad gets its row whatever the budget, with the reason (as every refusal on the loop)."""
    from mqttraw import RawClient, started
    from mqttraw import topic as raw_topic

    async with started(tmp_path, **{"store.traffic_rate": 1}) as gw:
        password = await gw.add_device("sen-8", type_="sensor")
        client = RawClient(gw.mqtt_port)
        await client.connect("sen-8", "sen-8", password)
        telemetry_topic = raw_topic("sen-8", "telemetry", type_="sensor")
        for i in range(5):
            await client.publish(telemetry_topic, json.dumps({"t": float(i)}).encode(), qos=1)
        await client.publish(telemetry_topic, b'{"t": 1,}', qos=1)  # acknowledged: after its group's COMMIT
        logged = await gw.wait_for("SELECT topic, payload, error FROM traffic WHERE error IS NOT NULL")
        assert logged == [(telemetry_topic, b'{"t": 1,}', "bad_json")]
        assert gw.rows("SELECT COUNT(*) FROM traffic WHERE client_id = 'sen-8'")[0][0] <= 3  # the budget held
        assert gw.rows("SELECT COUNT(*) FROM measurements WHERE device_id = 'sen-8'") == [(5,)]
        await client.close()
