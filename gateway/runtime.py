"""The gateway's lifecycle: components start in a fixed order on one AsyncExitStack and stop in reverse.

Order: store (writer, reader) -> registry cache -> presence, retention -> ingest + broker -> calls -> uplink
-> API.
Stopping closes the listeners first, ingests what sessions still hold, and lets the writer commit
everything queued before the process exits.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psutil

from gateway import __version__
from gateway.accounts import Accounts
from gateway.broker.security import Gatekeeper
from gateway.broker.server import GatewayBroker, broker_config
from gateway.calls.service import Calls
from gateway.commands import Commands
from gateway.config import Config
from gateway.discovery import Advert, Discovery, interfaces_for
from gateway.hub import Hub
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.retention import Retention, used_bytes
from gateway.store import registry
from gateway.store.indexer import Indexer
from gateway.store.reader import Reader
from gateway.store.schema import LEGACY_INDEX
from gateway.store.writer import Writer
from gateway.trust import Trust
from gateway.uplink.worker import Uplink
from gateway.webserver import WebServer

__all__ = ["Bootstrap", "Gateway"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bootstrap:
    """What the first start created and must be shown once."""

    admin_password: str | None


def _ensure_identity(conn: sqlite3.Connection, configured: str) -> tuple[str, str | None]:
    """Gateway id (configured, or generated once and kept) and, on the very first start, an admin user."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'gateway_id'").fetchone()
    gateway_id = configured or (row[0] if row else f"gw-{secrets.token_hex(6)}")
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('gateway_id', ?)", (gateway_id,))
    password = None
    if registry.count_users(conn) == 0:
        password = secrets.token_urlsafe(12)
        registry.add_user(conn, "admin", "admin", password, actor="bootstrap")
    return gateway_id, password


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.hub = Hub(self.metrics)
        self.writer = Writer(cfg.db_path, cfg.store, self.metrics)
        self.indexer = Indexer(cfg.db_path, self._drop_legacy_index, self.metrics)
        self.reader = Reader(cfg.db_path)
        self.accounts = Accounts(self.reader)
        self.presence = Presence(cfg.presence, self.writer, self.hub, self.metrics)
        self.retention = Retention(cfg.store, self.writer, self.metrics, cfg.uplink, index=self.indexer)
        self.uplink = Uplink(
            cfg.uplink, cfg.store, cfg.db_path, self.writer, self.metrics, lambda: self.retention.freed_bytes
        )
        self.retention.attach(self.uplink.in_flight)
        self.ingest = Ingest(cfg, self.writer, self.accounts, self.presence, self.hub, self.metrics)
        self.trust = Trust(cfg, self.reader)  # the local CA, issued certificates, security profiles
        self.gate = Gatekeeper(cfg.mqtt, self.accounts, self.metrics, self.trust)
        self.calls = Calls(
            cfg.calls, cfg.mqtt.root, self.writer, self.reader, self.hub, self.metrics, self.presence.is_online
        )
        self.discovery: Discovery | None = None
        self.broker: GatewayBroker | None = None
        self.commands: Commands | None = None
        self.web: WebServer | None = None
        self.gateway_id = ""
        self.bootstrap = Bootstrap(None)
        self.started_at = 0.0
        self.state: dict[str, str] = {}
        self._stack = AsyncExitStack()

    @property
    def mqtt_port(self) -> int:
        assert self.broker is not None
        return self.broker.port()

    @property
    def http_port(self) -> int:
        assert self.web is not None
        return self.web.port

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        stack = self._stack
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        await self.writer.start()
        stack.push_async_callback(self._stopped, "store", self.writer.stop)
        self.gateway_id, password = await self.writer.run(lambda c: _ensure_identity(c, self.cfg.gateway.id))
        self.bootstrap = Bootstrap(password)
        await self.indexer.start()  # creates the index file, which the readers attach
        stack.push_async_callback(self.indexer.stop)
        await self.reader.start()
        stack.push_async_callback(self.reader.stop)
        self.state["store"] = "ok"

        await self.accounts.start()
        stack.push_async_callback(self.accounts.stop)
        await self.trust.start(self.gateway_id)  # first start: creates the CA and the server certificate
        stack.push_async_callback(self.trust.stop)
        self.accounts.on_change(self.trust.reload)  # before the broker's own listener: revocations apply first
        await self.presence.start()
        stack.push_async_callback(self._stopped, "presence", self.presence.stop)
        await self.retention.start()
        stack.push_async_callback(self.retention.stop)

        listeners = broker_config(self.cfg.mqtt)
        if self.trust.ca is not None:
            listeners["listeners"]["tls"] = self.trust.listener(self.cfg.mqtt)
        self.broker = GatewayBroker(listeners, self.gate, self.ingest, self.metrics, self.cfg.mqtt, self.writer)
        if self.trust.ca is not None:
            self.broker.tls_context = self.trust.ca.server_context()
        self.calls.attach(self.broker)
        self.ingest.calls = self.calls  # before the first PUBLISH: every press opens or joins a call
        await self.broker.start()
        stack.push_async_callback(self._stopped, "broker", self._stop_broker)
        await self.calls.start()
        stack.push_async_callback(self._stopped, "calls", self.calls.stop)
        self.state["calls"] = "ok"
        await self.uplink.start(self.gateway_id)
        stack.push_async_callback(self.uplink.stop)  # its state is health()["uplink"]: a link down is not "degraded"
        self.accounts.on_change(self._enforce_registry)
        self.commands = Commands(self.cfg.mqtt.root, self.writer, self.broker)
        self.state["broker"] = "ok"
        self.state["ingest"] = "ok"

        from webui.app import create_app  # webui depends on gateway, never the reverse at import time

        self.web = WebServer(create_app(self), self.cfg.http.bind, self.cfg.http.port)
        await self.web.start()
        stack.push_async_callback(self._stopped, "api", self.web.stop)
        self.state["api"] = "ok"
        self.discovery = Discovery(self.cfg.discovery, interfaces_for(self.cfg.discovery, self._binds()))
        await self.discovery.start(self._advert())  # registration goes on in the background (about 1.3 s)
        stack.push_async_callback(self.discovery.stop)
        self.started_at = time.time()
        log.info(
            "gateway %s ready: MQTT %s:%d, HTTP %s:%d",
            self.gateway_id,
            self.cfg.mqtt.bind,
            self.mqtt_port,
            self.cfg.http.bind,
            self.http_port,
        )

    @property
    def mqtts_port(self) -> int | None:
        return self.broker.port("tls") if self.broker is not None and self.trust.ca is not None else None

    def _binds(self) -> list[str]:
        return [self.cfg.mqtt.bind, self.cfg.http.bind]

    def _advert(self) -> Advert:
        from gateway.tls import host_addresses

        interfaces = interfaces_for(self.cfg.discovery, self._binds())
        if isinstance(interfaces, list):
            addresses = [a for a in interfaces if a.count(".") == 3]
        else:
            addresses = sorted(a for a in host_addresses(self.cfg.tls.hostnames) if not a.startswith("127."))
        return Advert(
            gateway_id=self.gateway_id,
            site=self.cfg.gateway.site,
            version=__version__,
            provisioning_path="/api/v1/provision",
            ca_fingerprint=self.trust.ca.fingerprint if self.trust.ca else None,
            addresses=tuple(addresses),
            mqtt_port=self.mqtt_port,
            http_port=self.http_port,
            mqtts_port=self.mqtts_port,
        )

    async def _stopped(self, name: str, stop: Any) -> None:
        self.state[name] = "stopping"
        await stop()
        self.state[name] = "stopped"

    async def _stop_broker(self) -> None:
        assert self.broker is not None
        await self.broker.shutdown()

    async def _enforce_registry(self) -> None:
        """After any registry change: fresh ACL decisions; devices disabled, moved or deleted are disconnected."""
        if self.broker is not None:
            self.broker.accounts_changed()

    async def stop(self) -> None:
        await self._stack.aclose()

    def health(self) -> dict[str, Any]:
        process = psutil.Process()
        broker = self.broker
        return {
            "status": "ok" if all(v == "ok" for v in self.state.values()) else "degraded",
            "version": __version__,
            "gateway_id": self.gateway_id,
            "uptime_s": round(time.time() - self.started_at, 1) if self.started_at else 0,
            "components": dict(self.state),
            "mqtt": {
                "port": self.mqtt_port if broker else None,
                "connected_clients": broker.connected_clients() if broker else 0,
                "queued_messages": broker.queued_messages() if broker else 0,
            },
            "writer": {
                "queue_depth": self.writer.depth,
                "commits": self.writer.commits,
                "rows": self.writer.rows,
                "last_batch": self.writer.last_batch,
            },
            "index": {  # the measurements' per-device index (store.mindex)
                "indexed_to": self.indexer.indexed_to,
                "behind_rows": self.indexer.behind,
                "used_bytes": self.indexer.used_bytes,
            },
            "counters": {
                "messages": self.metrics.counter_values(self.metrics.messages),
                "drops": self.metrics.counter_values(self.metrics.drops),
                "auth_failures": self.metrics.counter_values(self.metrics.auth_failures),
                "stored": self.metrics.counter_values(self.metrics.stored),
            },
            "uplink": self.uplink.health(),
            "security": self.trust.status(),
            "discovery": self.discovery.state if self.discovery else "off",
            "process": {
                "rss_bytes": process.memory_info().rss,
                "cpu_seconds": round(sum(process.cpu_times()[:2]), 3),
            },
        }

    async def _drop_legacy_index(self) -> None:
        await self.writer.run(lambda c: c.execute(f"DROP INDEX IF EXISTS {LEGACY_INDEX}"))

    async def db_used_bytes(self) -> int:
        return await self.reader.call(used_bytes)
