"""Provisioning and security pages for installers and admins: tokens as QR codes, printable sheets, pending
devices to adopt, the CA's state, issued certificates with revocation, profiles and the ACL simulator.

The same store functions as the JSON API (gateway.provisioning, gateway.profiles) check the rules and write
the audit rows; these pages show their answers, and a QR code only once, right after it was made.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlencode

from litestar import Router, get, post
from litestar.response import Redirect, Template

from gateway import profiles, provisioning
from gateway.errors import Conflict, NotFound, RegistryError
from gateway.store import registry
from webui.pages.base import PAGE, STAFF, Req, go, render
from webui.routes.provisioning import pending_devices, token_body

__all__ = ["security_pages"]

_SHEET_MAX = 200


def _status(exc: RegistryError) -> int:
    return 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400


async def _provisioning(request: Req, status: int = 200, **context: Any) -> Template:
    gw = request.app.state.gateway
    tokens = await gw.reader.call(provisioning.list_tokens)
    names = [p.name for p in await gw.reader.call(profiles.list_profiles)]
    return render(
        request,
        "provisioning.html",
        status_code=status,
        tokens=tokens,
        pending=[dataclasses.asdict(p) for p in await pending_devices(request)],
        discovery=gw.discovery.state if gw.discovery else "off",
        profiles=names,
        types=registry.DEVICE_TYPES,
        warning=gw.trust.ca.ca_warning() if gw.trust.ca else None,
        issued=context.pop("issued", None),
        error=context.pop("error", None),
        form={"site": gw.cfg.gateway.site, "room": "", "type": "button", **context.pop("form", {})},
    )


def _text(form: Any, key: str) -> str:
    return str(form.get(key) or "").strip()


def _hours(form: Any, default: int) -> float:
    try:
        value = float(_text(form, "hours") or default)
    except ValueError:
        raise RegistryError("hours: expected a number") from None
    if value <= 0:
        raise RegistryError("hours: expected a positive number")
    return value * 3600.0


@get("/provisioning", opt=PAGE(*STAFF))
async def provisioning_page(request: Req) -> Template:
    return await _provisioning(request)


@post("/provisioning/token", opt=PAGE(*STAFF))
async def token_make(request: Req) -> Template:
    gw = request.app.state.gateway
    form = await request.form()
    site, room, type_, profile = (_text(form, k) for k in ("site", "room", "type", "profile"))
    actor = request.state.user.username
    try:
        ttl = _hours(form, gw.cfg.provisioning.token_hours)
        issued = await gw.writer.run(
            lambda c: provisioning.create_token(c, site, room, type_, ttl, actor, profile=profile or None)
        )
    except RegistryError as exc:
        return await _provisioning(
            request, _status(exc), error=str(exc), form={"site": site, "room": room, "type": type_}
        )
    return await _provisioning(request, 201, issued=[await token_body(request, issued)])


@post("/provisioning/sheet", opt=PAGE(*STAFF))
async def sheet_make(request: Req) -> Template:
    """One token per room, rendered as a sheet to print and stick on each cabin's button."""
    gw = request.app.state.gateway
    form = await request.form()
    site, type_, profile = (_text(form, k) for k in ("site", "type", "profile"))
    rooms = [r for r in re.split(r"[\s,;]+", _text(form, "rooms")) if r]
    actor = request.state.user.username
    try:
        if not rooms or len(rooms) > _SHEET_MAX:
            raise RegistryError(f"rooms: give 1 to {_SHEET_MAX} room names, separated by spaces or commas")
        ttl = _hours(form, gw.cfg.provisioning.token_hours)

        def make(conn: Any) -> list[provisioning.IssuedToken]:
            return [
                provisioning.create_token(conn, site, room, type_, ttl, actor, profile=profile or None)
                for room in rooms
            ]

        issued = await gw.writer.run(make)
    except RegistryError as exc:
        return await _provisioning(request, _status(exc), error=str(exc), form={"site": site, "type": type_})
    return render(
        request,
        "provisioning_sheet.html",
        status_code=201,
        site=site,
        type=type_,
        sheet=[await token_body(request, t) for t in issued],
    )


@post("/provisioning/adopt/{name:str}", opt=PAGE(*STAFF))
async def adopt(request: Req, name: str) -> Template:
    gw = request.app.state.gateway
    form = await request.form()
    site, room, type_ = (_text(form, k) for k in ("site", "room", "type"))
    found = gw.discovery.get(name) if gw.discovery else None
    actor = request.state.user.username
    try:
        if found is None:
            raise NotFound(f"{name} is no longer advertising itself; is it still powered and unprovisioned?")
        type_ = type_ or found.type or ""
        device_id = found.device_id or (provisioning.device_id_for_mac(found.mac, type_) if found.mac else "")
        if not device_id:
            raise RegistryError(f"{name} advertises neither an id nor a MAC")
        ttl = gw.cfg.provisioning.token_hours * 3600.0
        issued = await gw.writer.run(
            lambda c: provisioning.create_token(c, site, room, type_, ttl, actor, device_id=device_id)
        )
    except RegistryError as exc:
        return await _provisioning(request, _status(exc), error=str(exc))
    return await _provisioning(request, 201, issued=[await token_body(request, issued)])


# -- security ------------------------------------------------------------------------------------------------


async def _security(request: Req, status: int = 200, error: str | None = None) -> Template:
    gw = request.app.state.gateway
    q = request.query_params
    simulated = None
    sim = {k: q.get(k) or "" for k in ("who", "action", "topic", "qos", "retain")}
    if sim["who"] and sim["topic"]:
        is_device = gw.accounts.device(sim["who"]) is not None
        principal = gw.gate.principal(sim["who"])
        profile = gw.trust.profile(sim["who"]) if is_device else None
        qos = int(sim["qos"]) if sim["qos"] in ("0", "1", "2") else 0
        action = sim["action"] if sim["action"] in ("publish", "subscribe") else "publish"
        decision = profiles.decide(
            principal, profile, action, sim["topic"], gw.cfg.mqtt.root, qos, sim["retain"] == "1"
        )
        simulated = dataclasses.asdict(decision)
    done = q.get("done")
    return render(
        request,
        "security.html",
        status_code=status,
        tls=gw.trust.status(),
        certificates=await gw.reader.call(lambda c: provisioning.certificates(c)),
        profiles=[p.body() for p in await gw.reader.call(profiles.list_profiles)],
        revoked=await gw.reader.fetchall("SELECT device_id, revoked_at, revoked_by, reason FROM revocations"),
        sim=sim,
        simulated=simulated,
        error=error,
        message=f"{q.get('device', '')} is revoked." if done == "revoked" else None,
    )


@get("/security", opt=PAGE(*STAFF))
async def security_page(request: Req) -> Template:
    return await _security(request)


@post("/security/revoke", opt=PAGE(*STAFF))
async def revoke(request: Req) -> Template | Redirect:
    """Revoke the device named in the form (a password or a certificate device alike)."""
    gw = request.app.state.gateway
    form = await request.form()
    device_id = _text(form, "device")
    reason = _text(form, "reason") or None
    actor = request.state.user.username
    try:
        await gw.writer.run(lambda c: provisioning.revoke_device(c, device_id, actor, reason))
    except RegistryError as exc:
        return await _security(request, _status(exc), str(exc))
    await gw.accounts.refresh()  # the device is dropped now
    return go(f"/security?{urlencode({'done': 'revoked', 'device': device_id})}")


def security_pages() -> Router:
    """These pages, kept out of the OpenAPI document like the others."""
    handlers = [provisioning_page, token_make, sheet_make, adopt, security_page, revoke]
    return Router(path="/", route_handlers=handlers, include_in_schema=False)
