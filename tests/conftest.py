"""Shared fixtures: a real gateway on ephemeral loopback ports, real clients, and a leak check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from gateway import config
from gateway.runtime import Gateway
from gateway.store import registry
from gateway.store.schema import connect, migrate

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["mqttraw"]  # its `raw` fixture: raw MQTT clients closed after each test
BOSUN = [sys.executable, "-m", "gateway"]


def make_config(data_dir: Path, **extra: Any) -> config.Config:
    overrides = {
        "gateway.data_dir": str(data_dir),
        "mqtt.port": 0,
        "http.port": 0,
        "mqtt.bind": "127.0.0.1",
        "http.bind": "127.0.0.1",
        "presence.check_s": 1,
        "tls.port": 0,  # a free port for the TLS listener; tests that need mDNS turn discovery on
        "discovery.enabled": False,
        **extra,
    }
    return config.load(None, {}, overrides)


def db_write(data_dir: Path, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """What the CLI does: our own connection, one transaction (works while the gateway runs)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(data_dir / "bosun.db")
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        result = fn(conn)
        conn.execute("COMMIT")
        return result
    finally:
        conn.close()


def db_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = connect(data_dir / "bosun.db", readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


@dataclass
class Running:
    """A started gateway plus helpers to reach it."""

    gw: Gateway
    data_dir: Path
    token: str

    @property
    def mqtt_port(self) -> int:
        return self.gw.mqtt_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw.http_port}"

    def http(self, token: str | None = "default") -> httpx.AsyncClient:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def add_device(self, device_id: str, site: str = "yacht", room: str = "c101", type_: str = "button") -> str:
        new = registry.NewDevice(device_id, site, room, type_)
        _, password = await self.gw.writer.run(lambda c: registry.add_device(c, new, "test"))
        await self.gw.accounts.refresh()
        return str(password)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return db_rows(self.data_dir, sql, params)

    async def wait_for(
        self, sql: str, params: tuple[Any, ...] = (), count: int = 1, timeout: float = 5.0
    ) -> list[tuple[Any, ...]]:
        """Poll until the query returns at least `count` rows (committed data only)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(sql, params)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.05)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Running]:
    cfg = make_config(tmp_path / "var")
    gw = Gateway(cfg)
    await gw.start()
    token = await gw.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
    try:
        yield Running(gw, cfg.data_dir, token)
    finally:
        await gw.stop()


def topic(device_id: str, action: str, site: str = "yacht", room: str = "c101", type_: str = "button") -> str:
    return f"bosun/{site}/{room}/{type_}/{device_id}/{action}"


class Paho:
    """A paho-mqtt client with blocking helpers that wait on real protocol events."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        clean: bool = True,
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = port
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: int | None = None
        self.suback: list[int] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.got_message = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *a: self.disconnected.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        # paho 2 reports MQTT 5 reason codes; map back to the MQTT 3.1.1 CONNACK return code (section 3.2.2.3)
        value = reason.value if hasattr(reason, "value") else int(reason)
        self.connack = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}.get(value, value)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.append(message)
        self.got_message.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.suback = [r.value if hasattr(r, "value") else int(r) for r in reasons]
        self.subscribed.set()

    def connect(self, will: tuple[str, bytes] | None = None, keepalive: int = 30) -> int:
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect("127.0.0.1", self.port, keepalive=keepalive)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(5)
            assert info.is_published(), f"no ack for {topic}"

    def subscribe(self, topic_filter: str, qos: int = 2) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos)
        assert self.subscribed.wait(5), "no SUBACK"
        return self.suback

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_clients() -> Iterator[Callable[..., Paho]]:
    made: list[Paho] = []

    def make(*args: Any, **kwargs: Any) -> Paho:
        client = Paho(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):  # the gateway may have dropped it already
            client.close()


async def run_cmd(*args: str, input_: bytes | None = None, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    """Run a command without blocking the event loop (mosquitto_pub/sub, bosun)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if input_ else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(input_), timeout)
    return subprocess.CompletedProcess(list(args), proc.returncode or 0, out, err)


def require(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    return path


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves our own threads behind (writer, readers)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = [
            t for t in threading.enumerate() if t.ident not in before and t.name.startswith("bosun-") and t.is_alive()
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"leaked threads: {[t.name for t in leaked]}"


def start_gateway(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int, int]:
    """`bosun run` as a subprocess on ephemeral loopback ports; returns it, its MQTT and HTTP ports once ready."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--data-dir",
            str(data_dir),
            "--mqtt-port",
            "0",
            "--mqtts-port",
            "0",
            "--http-port",
            "0",
            "--bind",
            "127.0.0.1",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    banner = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner += line
        if "HTTP   http://" in line:
            mqtt_port = int(re.search(r"mqtt://[^:]+:(\d+)", banner).group(1))  # type: ignore[union-attr]
            http_port = int(re.search(r"http://[^:]+:(\d+)", line).group(1))  # type: ignore[union-attr]
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            proc.banner = banner  # type: ignore[attr-defined]
            return proc, mqtt_port, http_port
    proc.kill()
    raise AssertionError(f"gateway did not start:\n{banner}")
