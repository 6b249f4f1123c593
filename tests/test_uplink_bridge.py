"""The MQTT bridge sink against a real Mosquitto started by the test: batches arrive as QoS 1 messages under
the topic prefix, and the cursor moves only once the broker has acknowledged them (PUBACK)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Paho, make_config, require
from test_uplink import fill, free_port, until

from gateway.runtime import Gateway
from gateway.uplink import batch


class Mosquitto:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([require("mosquitto"), "-c", str(self.conf)], stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


def gw_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(data_dir / "bosun.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def cursor(data_dir: Path) -> dict[str, int]:
    return dict(gw_rows(data_dir, "SELECT lane, acked FROM uplink_lanes"))


async def test_batches_reach_the_fleet_broker_and_the_cursor_moves_on_puback(
    tmp_path: Path, mosquitto: Mosquitto, paho_clients: Callable[..., Paho]
) -> None:
    data = tmp_path / "var"
    cfg = make_config(
        data,
        **{
            "gateway.id": "gw-bridge",
            "uplink.url": f"mqtt://127.0.0.1:{mosquitto.port}",
            "uplink.token": "secret",
            "uplink.topic_prefix": "fleet/in",
            "uplink.backoff_max_s": 1,
            "uplink.batch_records": 2000,
        },
    )
    mosquitto.start()
    consumer = paho_clients(mosquitto.port, "fleet-consumer")
    await until(lambda: _connects(consumer), 10, "mosquitto")
    await asyncio.to_thread(consumer.subscribe, "fleet/in/#", 1)
    gw = Gateway(cfg)
    await gw.start()
    try:
        await gw.writer.run(lambda c: fill(c, 1, 10_000))
        expected_ids = [r[0] for r in gw_rows(data, "SELECT id FROM measurements ORDER BY id")]
        await until(lambda: cursor(data)["telemetry"] == expected_ids[-1], 30, "the drain")
        await until(lambda: _telemetry_seqs(consumer) == expected_ids, 10, "every batch at the consumer")
        topics = {m.topic for m in consumer.messages}
        assert topics == {"fleet/in/gw-bridge/priority", "fleet/in/gw-bridge/state", "fleet/in/gw-bridge/telemetry"}
        assert all(m.qos == 1 for m in consumer.messages)
        first = batch.decode(consumer.messages[0].payload)
        assert first.lane == "priority" and first.gateway_id == "gw-bridge"  # calls first
        assert gw.uplink.connected
        # the broker goes away: sends fail, nothing more is acknowledged, the cursor stays where it was
        mosquitto.stop()
        before = cursor(data)
        await gw.writer.run(lambda c: fill(c, 20_001, 1_000))
        await until(lambda: not gw.uplink.connected, 10, "the lost connection")
        assert cursor(data) == before and "MQTT broker" in (gw.uplink.last_error or "")
    finally:
        await gw.stop()


def _connects(client: Paho) -> bool:
    try:
        return client.connect() == 0
    except OSError:
        return False


def _telemetry_seqs(client: Paho) -> list[Any]:
    seqs: list[int] = []
    for message in list(client.messages):
        decoded = batch.decode(message.payload)
        seqs.extend(m.seq for m in decoded.measurements)
    return seqs
