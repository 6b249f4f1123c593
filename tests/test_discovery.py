"""mDNS on real loopback sockets: the gateway's services and TXT records, pending devices, adoption, no multicast."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Running, make_config
from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gateway import __version__
from gateway.runtime import Gateway
from gateway.store import registry

TYPES = ["_mqtt._tcp.local.", "_mqtts._tcp.local.", "_http._tcp.local.", "_bosun._tcp.local."]


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Running]:
    cfg = make_config(tmp_path / "var", **{"discovery.enabled": True, "gateway.site": "yacht-1"})
    gateway = Gateway(cfg)
    await gateway.start()
    token = await gateway.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
    try:
        yield Running(gateway, cfg.data_dir, token)
    finally:
        await gateway.stop()


@pytest.fixture
async def lan() -> AsyncIterator[AsyncZeroconf]:
    """Another mDNS host on loopback: a phone browsing, or a device advertising itself."""
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        yield zc
    finally:
        await zc.async_unregister_all_services()
        await zc.async_close()


async def browse(zc: AsyncZeroconf, types: list[str], timeout: float = 10.0) -> dict[str, AsyncServiceInfo]:
    """Browse until every type has a resolved service whose name mentions the gateway."""
    found: dict[str, str] = {}
    seen = asyncio.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            found[service_type] = name
            if len(found) == len(types):
                seen.set()

    browser = AsyncServiceBrowser(zc.zeroconf, types, handlers=[on_change])
    try:
        await asyncio.wait_for(seen.wait(), timeout)
    finally:
        await browser.async_cancel()
    out = {}
    for service_type, name in found.items():
        info = AsyncServiceInfo(service_type, name)
        assert await info.async_request(zc.zeroconf, 3000), name
        out[service_type] = info
    return out


async def test_a_browser_on_loopback_finds_every_service_with_its_txt_records(gw: Running, lan: AsyncZeroconf) -> None:
    started = time.monotonic()
    infos = await browse(lan, TYPES)
    elapsed = time.monotonic() - started
    gateway = gw.gw
    ports = {
        "_mqtt._tcp.local.": gateway.mqtt_port,
        "_mqtts._tcp.local.": gateway.mqtts_port,
        "_http._tcp.local.": gateway.http_port,
        "_bosun._tcp.local.": gateway.http_port,
    }
    assert gateway.trust.ca is not None
    for service_type, info in infos.items():
        assert info.port == ports[service_type], service_type
        assert info.parsed_addresses() == ["127.0.0.1"]
        assert info.decoded_properties == {
            "gateway_id": gateway.gateway_id,
            "site": "yacht-1",
            "version": __version__,
            "provisioning_path": "/api/v1/provision",
            "ca_fingerprint": gateway.trust.ca.fingerprint,
        }
    assert gateway.discovery is not None
    await asyncio.wait_for(gateway.discovery.registered.wait(), 5)
    assert gateway.discovery.state == "ok"
    assert gateway.health()["discovery"] == "ok"
    assert elapsed < 10


async def pending(gw: Running, present: bool, timeout: float = 10.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    async with gw.http() as http:
        while True:
            rows: list[dict[str, object]] = (await http.get("/api/v1/provisioning/pending")).json()
            if bool(rows) == present or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.2)


async def test_an_unprovisioned_device_shows_up_as_pending_and_is_adopted(gw: Running, lan: AsyncZeroconf) -> None:
    device = ServiceInfo(
        "_bosun-device._tcp.local.",
        "bosun-button-0001._bosun-device._tcp.local.",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=80,
        properties={"mac": "a4:cf:12:00:00:01", "model": "bosun-button-v2", "firmware": "1.4.0", "type": "button"},
        server="bosun-button-0001.local.",
    )
    await lan.async_register_service(device)
    rows = await pending(gw, present=True)
    assert rows == [
        {
            "name": "bosun-button-0001",
            "mac": "a4:cf:12:00:00:01",
            "model": "bosun-button-v2",
            "firmware": "1.4.0",
            "address": "127.0.0.1",
            "port": 80,
            "device_id": None,
            "type": "button",
            "seen_at": rows[0]["seen_at"],
        }
    ]
    async with gw.http() as http:
        adopted = await http.post(
            "/api/v1/provisioning/pending/bosun-button-0001/adopt", json={"site": "yacht", "room": "c101"}
        )
        assert adopted.status_code == 201, adopted.text
        assert adopted.json()["device_id"] == "button-a4cf12000001"
        assert adopted.json()["qr"]["deviceId"] == "button-a4cf12000001"
        enrolled = await http.post(
            "/api/v1/provision", json={"token": adopted.json()["token"], "mac": "a4:cf:12:00:00:01"}
        )
        assert enrolled.status_code == 201, enrolled.text
    assert await pending(gw, present=False) == []  # registered now: no longer pending


async def test_a_device_that_stops_advertising_leaves_the_pending_list(gw: Running, lan: AsyncZeroconf) -> None:
    device = ServiceInfo(
        "_bosun-device._tcp.local.",
        "sensor-7._bosun-device._tcp.local.",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=80,
        properties={"mac": "a4:cf:12:00:00:07", "id": "temp-7"},
    )
    await lan.async_register_service(device)
    assert [r["device_id"] for r in await pending(gw, present=True)] == ["temp-7"]
    await lan.async_unregister_service(device)
    assert await pending(gw, present=False) == []


async def test_without_multicast_one_warning_and_everything_else_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the multicast socket cannot be opened, as on a host without it
    cfg = make_config(tmp_path / "var", **{"discovery.enabled": True, "discovery.interfaces": ["192.0.2.1"]})
    gateway = Gateway(cfg)
    with caplog.at_level(logging.WARNING, logger="gateway.discovery"):
        await gateway.start()
    try:
        warnings = [r for r in caplog.records if r.name == "gateway.discovery"]
        assert len(warnings) == 1 and "everything else keeps working" in warnings[0].getMessage()
        assert gateway.health()["discovery"] == "unavailable"
        assert gateway.health()["status"] == "ok"
        token = await gateway.writer.run(lambda c: registry.create_token(c, "admin", "tests", "test"))
        async with Running(gateway, cfg.data_dir, token).http() as http:
            assert (await http.get("/api/v1/provisioning/pending")).json() == []
    finally:
        await gateway.stop()
