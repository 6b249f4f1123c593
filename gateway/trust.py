"""What the broker trusts beyond passwords: the local CA, the device certificates it issued and has not revoked,
and each device's security profile; reloaded whenever the registry changes (API or CLI), like the accounts.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway import pki
from gateway.config import Config, MqttSection
from gateway.profiles import Profile, device_profiles
from gateway.provisioning import RateLimiter, valid_certificates
from gateway.store.reader import Reader
from gateway.tls import Clock, LocalCA, utcnow

__all__ = ["Trust"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Snapshot:
    certificates: dict[str, str]
    profiles: dict[str, Profile]


def _load(conn: sqlite3.Connection) -> _Snapshot:
    return _Snapshot(valid_certificates(conn), device_profiles(conn))


class Trust:
    def __init__(self, cfg: Config, reader: Reader, clock: Clock = utcnow) -> None:
        self.cfg = cfg
        self._reader = reader
        self._clock = clock
        self.ca: LocalCA | None = None
        self.limiter = RateLimiter(cfg.provisioning.rate_per_min)
        self._snapshot = _Snapshot({}, {})

    @property
    def tls_on(self) -> bool:
        return self.cfg.tls.port >= 0

    async def start(self, gateway_id: str) -> None:
        """Create or load the CA and the server certificate (first start: a few milliseconds), then the lists."""
        if self.tls_on:
            self.ca = LocalCA(self.cfg.data_dir, self.cfg.tls, gateway_id, self._clock)
            await asyncio.to_thread(self.ca.load_or_create)
            await self.ca.start()
        await self.reload()

    async def stop(self) -> None:
        if self.ca is not None:
            await self.ca.stop()

    async def reload(self) -> None:
        self._snapshot = await self._reader.call(_load)

    def profile(self, device_id: str) -> Profile | None:
        return self._snapshot.profiles.get(device_id)

    def certificate_device(self, peercert: dict[str, Any] | None) -> tuple[str | None, str | None]:
        """(device id, None) for a client certificate we issued and did not revoke; (None, reason) otherwise;
        (None, None) when the client sent no certificate."""
        if not peercert:
            return None, None
        device_id = pki.peer_device_id(peercert)
        if device_id is None:
            return None, "certificate_without_device"
        serial = pki.peer_serial(peercert)
        if serial is None or self._snapshot.certificates.get(serial) != device_id:
            return None, "certificate_revoked"
        return device_id, None

    def listener(self, mqtt: MqttSection) -> dict[str, Any]:
        """amqtt's config for the TLS listener (same bind address and connection limit as plain MQTT)."""
        assert self.ca is not None
        return {
            "type": "tcp",
            "bind": f"{mqtt.bind}:{self.cfg.tls.port}",
            "max_connections": mqtt.max_connections,
            "ssl": True,
            "certfile": str(self.ca.server_cert_path),
            "keyfile": str(self.ca.server_cert_path),
            "cafile": str(self.ca.ca_path),
        }

    def status(self) -> dict[str, Any]:
        if self.ca is None:
            return {"tls": False}
        return {"tls": True, "port": self.cfg.tls.port, **self.ca.status()}
