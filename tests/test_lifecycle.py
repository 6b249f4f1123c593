"""The gateway as a process: start-up errors name the key; SIGTERM and kill -9 lose nothing acknowledged."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, db_rows, db_write, start_gateway

from gateway.store import registry


def test_bad_config_stops_startup_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bosun.toml"
    bad.write_text('[mqtt]\nport = "eighteen"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(bad), "--data-dir", str(tmp_path / "var")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "mqtt.port" in result.stderr and "integer" in result.stderr
    env = {**os.environ, "BOSUN_STORE_SYNCHRONOUS": "sometimes"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--data-dir", str(tmp_path / "var")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode != 0 and "store.synchronous" in result.stderr and "NORMAL" in result.stderr
    assert not (tmp_path / "var").exists(), "nothing may be created before the config is valid"


def test_first_start_prints_the_admin_password_once(tmp_path: Path) -> None:
    data = tmp_path / "var"
    banners = []
    for _ in range(2):
        proc, _, _ = start_gateway(data)
        banners.append(proc.banner)  # type: ignore[attr-defined]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    first = re.search(r"created user 'admin' with password.*\n\s+(\S+)", banners[0])
    assert first, banners[0]
    assert "created user 'admin'" not in banners[1] and first.group(1) not in banners[1]
    # only an argon2 hash is stored, never the password itself
    hashes = db_rows(data, "SELECT password_hash FROM users WHERE username = 'admin'")
    assert len(hashes) == 1 and hashes[0][0].startswith("$argon2id$") and first.group(1) not in hashes[0][0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_acknowledged_messages_survive_stop_under_load(tmp_path: Path, sig: signal.Signals) -> None:
    data = tmp_path / "var"
    devices = [f"s{i}" for i in range(4)]
    secrets = {}
    for device_id in devices:
        _, secrets[device_id] = db_write(
            data,
            lambda c, d=device_id: registry.add_device(c, registry.NewDevice(d, "yacht", "engine", "sensor"), "test"),
        )
    proc, mqtt_port, _ = start_gateway(data)
    sent: dict[str, list[tuple[int, mqtt.MQTTMessageInfo]]] = {d: [] for d in devices}
    stop = threading.Event()

    def publisher(device_id: str) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        client.username_pw_set(device_id, secrets[device_id])
        client.max_inflight_messages_set(50)
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        i = 0
        while not stop.is_set():
            info = client.publish(f"bosun/yacht/engine/sensor/{device_id}/temperature", json.dumps({"value": i}), qos=1)
            sent[device_id].append((i, info))
            i += 1
            if len(sent[device_id]) % 50 == 0:
                time.sleep(0.005)
        time.sleep(0.5)
        client.loop_stop()

    threads = [threading.Thread(target=publisher, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    time.sleep(2.0)
    proc.send_signal(sig)
    code = proc.wait(30)
    stop.set()
    for t in threads:
        t.join(10)
    if sig == signal.SIGTERM:
        assert code == 0, f"clean stop expected, got {code}"
    total_acked = 0
    for device_id in devices:
        acked = {i for i, info in sent[device_id] if info.is_published()}
        stored = {int(v) for (v,) in db_rows(data, "SELECT value FROM measurements WHERE device_id = ?", (device_id,))}
        assert acked, f"{device_id}: nothing was acknowledged, the test proves nothing"
        lost = acked - stored
        assert not lost, f"{device_id}: {len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
        total_acked += len(acked)
    assert total_acked > 500
    integrity = subprocess.run(
        [sys.executable, "-m", "gateway", "db", "check", "--data-dir", str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert integrity.returncode == 0 and "integrity ok" in integrity.stdout
