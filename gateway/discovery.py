"""mDNS: the gateway advertises its services and lists devices waiting to be adopted (python-zeroconf, asyncio).

Advertised: `_mqtt._tcp`, `_mqtts._tcp` (when TLS is on), `_http._tcp` and `_bosun._tcp`, each with the TXT
records `gateway_id`, `site`, `version`, `provisioning_path` and `ca_fingerprint`. Browsed:
`_bosun-device._tcp`, which unprovisioned devices advertise (TXT `mac`, `model`, `firmware`, optionally `id`
and `type`); each resolved one is listed as pending. Records are built and parsed by pure functions; a record
that does not parse is dropped, never raised into the loop. On a host without multicast the gateway logs one
warning and runs on without discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zeroconf import BadTypeInNameException, InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gateway.config import DiscoverySection

__all__ = [
    "DEVICE_TYPE",
    "Advert",
    "Discovery",
    "PendingDevice",
    "gateway_properties",
    "parse_device",
    "service_infos",
]

log = logging.getLogger(__name__)

DEVICE_TYPE = "_bosun-device._tcp.local."
MQTT_TYPE = "_mqtt._tcp.local."
MQTTS_TYPE = "_mqtts._tcp.local."
HTTP_TYPE = "_http._tcp.local."
BOSUN_TYPE = "_bosun._tcp.local."
_RESOLVE_MS = 3000
_TXT_MAX = 64  # longest TXT value we keep from a device (anything longer is cut)


@dataclass(frozen=True)
class Advert:
    """What the gateway announces."""

    gateway_id: str
    site: str
    version: str
    provisioning_path: str
    ca_fingerprint: str | None
    addresses: tuple[str, ...]
    mqtt_port: int
    http_port: int
    mqtts_port: int | None


@dataclass(frozen=True)
class PendingDevice:
    """An unprovisioned device seen on the LAN."""

    name: str
    mac: str | None
    model: str | None
    firmware: str | None
    address: str | None
    port: int
    device_id: str | None
    type: str | None
    seen_at: float


def gateway_properties(advert: Advert) -> dict[str, str]:
    """The TXT records every advertised service carries."""
    props = {
        "gateway_id": advert.gateway_id,
        "site": advert.site,
        "version": advert.version,
        "provisioning_path": advert.provisioning_path,
    }
    if advert.ca_fingerprint:
        props["ca_fingerprint"] = advert.ca_fingerprint
    return props


def service_infos(advert: Advert) -> list[ServiceInfo]:
    """One ServiceInfo per advertised service type (pure: builds records, opens nothing)."""
    props = gateway_properties(advert)
    packed = [socket.inet_aton(a) for a in advert.addresses]
    server = f"bosun-{advert.gateway_id}.local."
    ports = [(MQTT_TYPE, advert.mqtt_port), (HTTP_TYPE, advert.http_port), (BOSUN_TYPE, advert.http_port)]
    if advert.mqtts_port is not None:
        ports.insert(1, (MQTTS_TYPE, advert.mqtts_port))
    return [
        ServiceInfo(
            kind, f"Bosun {advert.gateway_id}.{kind}", addresses=packed, port=port, properties=props, server=server
        )
        for kind, port in ports
    ]


def _text(props: dict[bytes, bytes | None], key: str) -> str | None:
    value = props.get(key.encode())
    if not value:
        return None
    try:
        return value.decode("utf-8")[:_TXT_MAX]
    except UnicodeDecodeError:
        return None


def parse_device(info: ServiceInfo, now: float) -> PendingDevice | None:
    """A resolved `_bosun-device._tcp` record as a pending device; None if it is not one."""
    if not info.name.endswith("." + DEVICE_TYPE) or info.port is None:
        return None
    props = info.properties or {}
    addresses = info.parsed_addresses(IPVersion.V4Only)
    return PendingDevice(
        name=info.name[: -len(DEVICE_TYPE) - 1],
        mac=_text(props, "mac"),
        model=_text(props, "model"),
        firmware=_text(props, "firmware"),
        address=addresses[0] if addresses else None,
        port=info.port,
        device_id=_text(props, "id"),
        type=_text(props, "type"),
        seen_at=now,
    )


def interfaces_for(cfg: DiscoverySection, binds: Iterable[str]) -> list[str] | InterfaceChoice:
    """Configured interfaces; else loopback only when every listener binds loopback; else all."""
    if cfg.interfaces:
        return list(cfg.interfaces)
    if all(b.startswith("127.") for b in binds):
        return ["127.0.0.1"]
    return InterfaceChoice.All


class Discovery:
    """Owns the zeroconf sockets: registers the gateway's services, browses for pending devices."""

    def __init__(self, cfg: DiscoverySection, interfaces: list[str] | InterfaceChoice) -> None:
        self._cfg = cfg
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._infos: list[ServiceInfo] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: dict[str, PendingDevice] = {}
        self.state = "off"
        self.registered = asyncio.Event()

    def pending(self) -> list[PendingDevice]:
        return sorted(self._pending.values(), key=lambda p: p.name)

    def get(self, name: str) -> PendingDevice | None:
        return self._pending.get(name)

    async def start(self, advert: Advert) -> None:
        if not self._cfg.enabled:
            return
        try:
            self._zc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            log.warning("mDNS discovery is unavailable on this host (%s); everything else keeps working", exc)
            self.state = "unavailable"
            return
        self.state = "starting"
        self._infos = service_infos(advert)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [DEVICE_TYPE], handlers=[self._on_change])
        # registration probes the name for about 1.3 s: in the background, so start-up does not wait for it
        self._spawn(self._register())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _register(self) -> None:
        assert self._zc is not None
        zc = self._zc

        async def register(info: ServiceInfo) -> None:
            await (await zc.async_register_service(info, allow_name_change=True))

        try:
            await asyncio.gather(*(register(info) for info in self._infos))  # probing in parallel: ~1.3 s in all
        except (OSError, BadTypeInNameException) as exc:
            log.warning("mDNS advertisement failed (%s); devices must be given the gateway's address", exc)
            self.state = "unavailable"
            return
        self.state = "ok"
        self.registered.set()
        log.info("mDNS: advertising %s", ", ".join(i.type for i in self._infos))

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._pending.pop(name[: -len(DEVICE_TYPE) - 1], None)
            return
        self._spawn(self._resolve(service_type, name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        try:
            if not await info.async_request(self._zc.zeroconf, _RESOLVE_MS):
                return
        except (OSError, BadTypeInNameException) as exc:
            log.debug("mDNS: could not resolve %s: %s", name, exc)
            return
        device = parse_device(info, time.time())
        if device is None:
            log.debug("mDNS: ignored a malformed device record %s", name)
            return
        if device.name not in self._pending:
            log.info("mDNS: device %s (%s) is waiting to be adopted", device.name, device.mac or "no MAC")
        self._pending[device.name] = device

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        if self.state == "ok":
            with contextlib.suppress(OSError):  # goodbye packets are a courtesy
                await zc.async_unregister_all_services()
        await zc.async_close()
        self.state = "stopped"
