"""Provisioning API: tokens and QR codes, pending devices and adoption, device enrolment, revocation."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from gateway import provisioning
from gateway.errors import NotFound, RegistryError
from gateway.store import registry
from webui.auth import STAFF

__all__ = ["ProvisioningController", "ca_certificate", "provision", "revoke_device"]

_MAX_SHEET = 200


class TokenIn(msgspec.Struct, forbid_unknown_fields=True):
    site: str
    room: str
    type: str
    device_id: str | None = None
    profile: str | None = None
    ttl_hours: float | None = None


class SheetIn(msgspec.Struct, forbid_unknown_fields=True):
    site: str
    type: str
    rooms: list[str]
    profile: str | None = None
    ttl_hours: float | None = None


class AdoptIn(msgspec.Struct, forbid_unknown_fields=True):
    site: str
    room: str
    type: str | None = None
    profile: str | None = None
    ttl_hours: float | None = None


class ProvisionIn(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    device_id: str | None = None
    mac: str | None = None
    csr: str | None = None
    name: str | None = None


class RevokeIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


def broker_urls(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Where devices reach the broker: `[provisioning] broker_host`, else the host this request came to."""
    gw = request.app.state.gateway
    host = gw.cfg.provisioning.broker_host or request.url.hostname or "localhost"
    out: dict[str, Any] = {"host": host, "mqtt": f"mqtt://{host}:{gw.mqtt_port}"}
    if gw.mqtts_port is not None:
        out["mqtts"] = f"mqtts://{host}:{gw.mqtts_port}"
    out["url"] = out.get("mqtts", out["mqtt"])
    return out


def _provision_url(request: Request[Any, Any, Any]) -> str:
    base = str(request.base_url).rstrip("/")
    return f"{base}/api/v1/provision"


async def token_body(request: Request[Any, Any, Any], issued: provisioning.IssuedToken) -> dict[str, Any]:
    """A new token with its QR payload and the QR code as SVG (the only time the secret is shown).

    segno picks the best of eight masks for a ~500-byte payload in about 0.15 s of pure Python: off the loop,
    so the broker keeps serving while an installer prints a sheet for a deck."""
    gw = request.app.state.gateway
    ca = gw.trust.ca
    payload = provisioning.qr_payload(
        issued, broker_urls(request)["url"], ca.fingerprint if ca else None, _provision_url(request), issued.profile
    )
    svg = await asyncio.to_thread(provisioning.qr_svg, payload)
    return {**dataclasses.asdict(issued), "qr": payload, "qr_svg": svg}


def _ttl(request: Request[Any, Any, Any], hours: float | None) -> float:
    value = hours if hours is not None else request.app.state.gateway.cfg.provisioning.token_hours
    if value <= 0:
        raise RegistryError("ttl_hours must be positive")
    return float(value) * 3600.0


class ProvisioningController(Controller):
    path = "/api/v1/provisioning"
    tags = ["provisioning"]

    @post(
        "/tokens",
        opt={"roles": STAFF},
        status_code=HTTP_201_CREATED,
        summary="A single-use provisioning token for a site, room and device type, with its QR code (shown once)",
    )
    async def create_token(self, request: Request[Any, Any, Any], data: TokenIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username
        ttl = _ttl(request, data.ttl_hours)
        issued = await gw.writer.run(
            lambda c: provisioning.create_token(
                c, data.site, data.room, data.type, ttl, actor, device_id=data.device_id, profile=data.profile
            )
        )
        return await token_body(request, issued)

    @get("/tokens", opt={"roles": STAFF}, summary="Provisioning tokens (never their secrets); all=true adds used ones")
    async def list_tokens(self, request: Request[Any, Any, Any], all: bool = False) -> list[dict[str, Any]]:
        gw = request.app.state.gateway
        rows: list[dict[str, Any]] = await gw.reader.call(lambda c: provisioning.list_tokens(c, include_used=all))
        return rows

    @delete("/tokens/{token_id:str}", opt={"roles": STAFF}, status_code=HTTP_204_NO_CONTENT)
    async def delete_token(self, request: Request[Any, Any, Any], token_id: str) -> None:
        gw = request.app.state.gateway
        actor = request.state.user.username
        await gw.writer.run(lambda c: provisioning.delete_token(c, token_id, actor))

    @post(
        "/sheets",
        opt={"roles": STAFF},
        status_code=HTTP_201_CREATED,
        summary="One token and QR code per room (a printable sheet for a whole deck)",
    )
    async def create_sheet(self, request: Request[Any, Any, Any], data: SheetIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username
        if not data.rooms or len(data.rooms) > _MAX_SHEET:
            raise RegistryError(f"rooms: give 1 to {_MAX_SHEET} rooms")
        ttl = _ttl(request, data.ttl_hours)

        def make(conn: Any) -> list[provisioning.IssuedToken]:
            return [
                provisioning.create_token(conn, data.site, room, data.type, ttl, actor, profile=data.profile)
                for room in data.rooms
            ]

        issued = await gw.writer.run(make)
        return {"site": data.site, "type": data.type, "tokens": [await token_body(request, t) for t in issued]}

    @get("/pending", opt={"roles": STAFF}, summary="Unprovisioned devices seen over mDNS (_bosun-device._tcp)")
    async def pending(self, request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p) for p in await pending_devices(request)]

    @post(
        "/pending/{name:str}/adopt",
        opt={"roles": STAFF},
        status_code=HTTP_201_CREATED,
        summary="Adopt a pending device: a token bound to it (its id, or type-MAC), with its QR code",
    )
    async def adopt(self, request: Request[Any, Any, Any], name: str, data: AdoptIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        found = gw.discovery.get(name) if gw.discovery else None
        if found is None:
            raise NotFound(f"no pending device named {name} (it advertises _bosun-device._tcp while unprovisioned)")
        type_ = data.type or found.type
        if type_ is None:
            raise RegistryError("type: the device does not say its type; give it")
        if found.device_id:
            device_id = found.device_id
        elif found.mac:
            device_id = provisioning.device_id_for_mac(found.mac, type_)
        else:
            raise RegistryError(f"device {name} advertises neither an id nor a MAC")
        actor = request.state.user.username
        ttl = _ttl(request, data.ttl_hours)
        issued = await gw.writer.run(
            lambda c: provisioning.create_token(
                c, data.site, data.room, type_, ttl, actor, device_id=device_id, profile=data.profile
            )
        )
        return await token_body(request, issued)


async def pending_devices(request: Request[Any, Any, Any]) -> list[Any]:
    """Pending devices not registered meanwhile (by their advertised id, or the id their MAC gives)."""
    gw = request.app.state.gateway
    if gw.discovery is None:
        return []
    known = {d.device_id for d in await gw.reader.call(registry.list_devices)}
    return [p for p in gw.discovery.pending() if _pending_id(p) not in known]


def _pending_id(pending: Any) -> str | None:
    if pending.device_id:
        return str(pending.device_id)
    if pending.mac and pending.type:
        try:
            return provisioning.device_id_for_mac(pending.mac, pending.type)
        except RegistryError:
            return None
    return None


@post(
    "/api/v1/provision",
    opt={"public": True},
    tags=["provisioning"],
    summary="Device enrolment with a provisioning token: a password, or (with a CSR) a client certificate",
)
async def provision(request: Request[Any, Any, Any], data: ProvisionIn) -> Response[Any]:
    gw = request.app.state.gateway
    address = request.client.host if request.client else "?"
    wait, first = gw.trust.limiter.check(address)
    enrolment = provisioning.Enrolment(data.token, data.device_id, data.mac, data.csr, data.name)
    if wait:
        if first:  # one audit row per burst, not one per refused request
            await gw.writer.run(lambda c: provisioning.audit_refusal(c, enrolment, address, "rate limited"))
        message = f"too many provisioning attempts from {address}: retry in {wait} s"
        return Response({"status_code": 429, "message": message}, status_code=429, headers={"Retry-After": str(wait)})
    ca = gw.trust.ca
    sign = ca.sign if ca is not None else None
    try:
        result = await gw.writer.run(lambda c: provisioning.enrol(c, enrolment, address, sign))
    except RegistryError as exc:
        reason = str(exc)
        await gw.writer.run(lambda c: provisioning.audit_refusal(c, enrolment, address, reason))
        raise
    await gw.accounts.refresh()  # the device may connect the moment it has the answer
    body = provisioning.enrolled_body(result, broker_urls(request), ca.ca_pem if ca else None)
    return Response(body, status_code=HTTP_201_CREATED)


@get(
    "/api/v1/provisioning/ca.pem",
    opt={"public": True},
    tags=["provisioning"],
    summary="The gateway's CA certificate (PEM); pin it by the fingerprint in the QR code or the mDNS TXT record",
    media_type="application/x-pem-file",
)
async def ca_certificate(request: Request[Any, Any, Any]) -> str:
    ca = request.app.state.gateway.trust.ca
    if ca is None:
        raise NotFound("TLS is off on this gateway: there is no CA")
    pem: str = ca.ca_pem
    return pem


@post(
    "/api/v1/devices/{device_id:str}/revoke",
    opt={"roles": STAFF},
    status_code=200,
    tags=["devices"],
    summary="Revoke a device: disconnected now; its password and certificates are refused from then on",
)
async def revoke_device(
    request: Request[Any, Any, Any], device_id: str, data: RevokeIn | None = None
) -> dict[str, Any]:
    gw = request.app.state.gateway
    actor = request.state.user.username
    reason = data.reason if data else None
    result: dict[str, Any] = await gw.writer.run(lambda c: provisioning.revoke_device(c, device_id, actor, reason))
    await gw.accounts.refresh()  # trust reloads first, then the broker drops the session
    return result
