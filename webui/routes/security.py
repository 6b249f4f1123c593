"""Security API (seed 004): security profiles, issued certificates, the CA's state and the ACL simulator."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.status_codes import HTTP_204_NO_CONTENT

from gateway import profiles, provisioning
from gateway.errors import RegistryError
from webui.auth import ADMIN, ANY, STAFF

__all__ = ["SecurityController", "set_device_profile"]


class ProfileIn(msgspec.Struct, forbid_unknown_fields=True):
    device_type: str | None = None
    actions: list[str] = msgspec.field(default_factory=list)
    max_qos: int = 2
    retain: bool = True
    max_connections: int = 1
    client_cert_required: bool = False
    description: str | None = None


class SimulateIn(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    action: str = "publish"
    device_id: str | None = None
    username: str | None = None  # an integration; neither: an anonymous client
    qos: int = 0
    retain: bool = False


class AssignIn(msgspec.Struct, forbid_unknown_fields=True):
    profile: str | None


class SecurityController(Controller):
    path = "/api/v1/security"
    tags = ["security"]

    @get("/profiles", opt={"roles": STAFF}, summary="Security profiles (seed 004's MQTTSecurityProfile)")
    async def list_profiles(self, request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
        gw = request.app.state.gateway
        return [p.body() for p in await gw.reader.call(profiles.list_profiles)]

    @put(
        "/profiles/{name:str}", opt={"roles": ADMIN}, summary="Create or replace a profile; its devices follow at once"
    )
    async def put_profile(self, request: Request[Any, Any, Any], name: str, data: ProfileIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username
        profile = profiles.Profile(
            name,
            data.device_type,
            tuple(data.actions),
            data.max_qos,
            data.retain,
            data.max_connections,
            data.client_cert_required,
            data.description,
        )
        saved: profiles.Profile = await gw.writer.run(lambda c: profiles.put_profile(c, profile, actor))
        await gw.accounts.refresh()
        return saved.body()

    @delete("/profiles/{name:str}", opt={"roles": ADMIN}, status_code=HTTP_204_NO_CONTENT)
    async def delete_profile(self, request: Request[Any, Any, Any], name: str) -> None:
        gw = request.app.state.gateway
        actor = request.state.user.username
        await gw.writer.run(lambda c: profiles.delete_profile(c, name, actor))
        await gw.accounts.refresh()

    @get("/certificates", opt={"roles": STAFF}, summary="Device certificates the gateway's CA issued")
    async def certificates(self, request: Request[Any, Any, Any], device_id: str | None = None) -> list[dict[str, Any]]:
        gw = request.app.state.gateway
        rows: list[dict[str, Any]] = await gw.reader.call(lambda c: provisioning.certificates(c, device_id))
        return rows

    @get("/tls", opt={"roles": ANY}, summary="The CA and server certificate: fingerprint, expiry, renewals, warning")
    async def tls(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        status: dict[str, Any] = request.app.state.gateway.trust.status()
        return status

    @post(
        "/acl/simulate",
        opt={"roles": STAFF},
        status_code=200,
        summary="May this device (or integration) publish or subscribe to this topic, and by which rule",
    )
    async def simulate(self, request: Request[Any, Any, Any], data: SimulateIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        if data.device_id and data.username:
            raise RegistryError("give device_id or username, not both")
        if data.qos not in (0, 1, 2):
            raise RegistryError("qos must be 0, 1 or 2")
        name = data.device_id or data.username
        principal = gw.gate.principal(name)
        profile = gw.trust.profile(data.device_id) if data.device_id else None
        decision = profiles.decide(principal, profile, data.action, data.topic, gw.cfg.mqtt.root, data.qos, data.retain)
        return {
            "allowed": decision.allowed,
            "rule": decision.rule,
            "principal": principal.kind if principal else None,
            "profile": profile.name if profile else None,
        }


@put(
    "/api/v1/devices/{device_id:str}/profile",
    opt={"roles": STAFF},
    tags=["devices"],
    summary="Assign a security profile to a device (null: none)",
)
async def set_device_profile(request: Request[Any, Any, Any], device_id: str, data: AssignIn) -> dict[str, Any]:
    gw = request.app.state.gateway
    actor = request.state.user.username
    await gw.writer.run(lambda c: profiles.assign(c, device_id, data.profile, actor))
    await gw.accounts.refresh()
    return {"device_id": device_id, "profile": data.profile}
