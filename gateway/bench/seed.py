"""A fresh data directory for one gateway run: N sensor devices, one probe button, a crew API token, and a
watch plus a guest button for the press-to-watch-notify probe.

Written with the registry functions the CLI uses, in one transaction, before the gateway starts.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway import config
from gateway.store import registry
from gateway.store.schema import connect, migrate

__all__ = ["Device", "Seeded", "mqtt_root", "seed"]

SITE = "bench"
PROBE_ID = "bench-probe"
WATCH_ID = "bench-watch"
CALLER_ID = "bench-caller"


@dataclass(frozen=True)
class Device:
    device_id: str
    room: str
    type: str
    password: str

    def topic(self, root: str, action: str) -> str:
        return f"{root}/{SITE}/{self.room}/{self.type}/{self.device_id}/{action}"


@dataclass(frozen=True)
class Seeded:
    data_dir: Path
    token: str
    devices: list[Device]
    probe: Device
    watch: Device
    caller: Device


def mqtt_root() -> str:
    """The gateway's topic root as the child will see it (BOSUN_* variables pass through to it)."""
    return config.load(None, os.environ).mqtt.root


def seed(data_dir: Path, count: int) -> Seeded:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(data_dir / "bosun.db")
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        registry.add_user(conn, "bench", "crew", secrets.token_urlsafe(16), actor="bench")
        token = registry.create_token(conn, "bench", "benchmark", actor="bench")
        devices = []
        for index in range(count):
            new = registry.NewDevice(f"bench-s{index:05d}", SITE, f"deck-{index % 10}", "sensor")
            row, password = registry.add_device(conn, new, actor="bench")
            devices.append(Device(row.device_id, row.room, row.type, password))
        row, password = registry.add_device(conn, registry.NewDevice(PROBE_ID, SITE, "bridge", "button"), "bench")
        probe = Device(row.device_id, row.room, row.type, password)
        extra = []
        for device_id, room, type_ in ((WATCH_ID, "crew", "watch"), (CALLER_ID, "suite", "button")):
            row, password = registry.add_device(conn, registry.NewDevice(device_id, SITE, room, type_), "bench")
            extra.append(Device(row.device_id, row.room, row.type, password))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return Seeded(data_dir, token, devices, probe, *extra)
