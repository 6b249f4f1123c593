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
from gateway.models import Principal
from gateway.profiles import Profile, action_refusal, device_profiles, limits_refusal
from gateway.provisioning import RateLimiter, valid_certificates
from gateway.store.reader import Reader
from gateway.tls import Clock, LocalCA, utcnow
from gateway.topics import device_prefix

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
        self.profiled = False

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
        self.profiled = bool(self._snapshot.profiles)  # the broker's fast path skips profile checks when none

    def profile(self, device_id: str) -> Profile | None:
        return self._snapshot.profiles.get(device_id)

    # -- what the broker asks (the same rules gateway.profiles.decide reports to the ACL simulator) -----------

    def _device_profile(self, principal: Principal) -> Profile | None:
        if principal.kind != "device" or not self._snapshot.profiles:
            return None
        return self._snapshot.profiles.get(principal.name)

    def action_allowed(self, principal: Principal, topic: str, root: str) -> bool:
        """A device's profile allows this action (topic already inside its namespace)."""
        profile = self._device_profile(principal)
        if profile is None:
            return True
        d = principal.device
        assert d is not None
        return action_refusal(profile, topic, device_prefix(root, d.site, d.room, d.type, d.device_id)) is None

    def within_limits(self, principal: Principal | None, qos: int, retain: bool) -> bool:
        """A device's profile allows a PUBLISH with this QoS and retain flag."""
        if principal is None:
            return True
        return limits_refusal(self._device_profile(principal), qos, retain) is None

    def max_qos(self, principal: Principal | None) -> int:
        """The highest QoS a SUBSCRIBE of this principal is granted."""
        profile = self._device_profile(principal) if principal is not None else None
        return 2 if profile is None else profile.max_qos

    def certificate_required(self, principal: Principal) -> bool:
        profile = self._device_profile(principal)
        return profile is not None and profile.client_cert_required

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
