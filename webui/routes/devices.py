"""Devices (seed 004's endpoint list): CRUD, measurements, commands."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.params import Parameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from gateway.commands import COMMAND_COLUMNS, command_row
from gateway.errors import NotFound, RegistryError
from gateway.models import DeviceRow
from gateway.store import registry, views
from webui.auth import ANY, STAFF

__all__ = ["DeviceController"]


class DeviceIn(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    site: str
    room: str
    type: str
    name: str | None = None
    password: str | None = None


class DeviceChange(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    site: str | msgspec.UnsetType = msgspec.UNSET
    room: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    name: str | msgspec.UnsetType | None = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    call_priority: str | msgspec.UnsetType | None = msgspec.UNSET  # the least priority of its presses


class CommandIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)


def _device(d: DeviceRow) -> dict[str, Any]:
    return dataclasses.asdict(d)


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags = ["devices"]

    @post("/", opt={"roles": STAFF}, summary="Register a device; its MQTT password is returned once")
    async def create(self, request: Request[Any, Any, Any], data: DeviceIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username
        new = registry.NewDevice(data.device_id, data.site, data.room, data.type, data.password, data.name)
        row, password = await gw.writer.run(lambda c: registry.add_device(c, new, actor))
        await gw.accounts.refresh()
        return {**_device(row), "credentials": {"username": row.device_id, "password": password}}

    @get("/", opt={"roles": ANY}, summary="List devices")
    async def list_(
        self,
        request: Request[Any, Any, Any],
        site: str | None = None,
        room: str | None = None,
        type: str | None = None,
        online: bool | None = None,
    ) -> list[dict[str, Any]]:
        gw = request.app.state.gateway
        rows = await gw.reader.call(lambda c: registry.list_devices(c, site, room, type, online))
        return [_device(r) for r in rows]

    @get("/{device_id:str}", opt={"roles": ANY})
    async def read(self, request: Request[Any, Any, Any], device_id: str) -> dict[str, Any]:
        gw = request.app.state.gateway
        return _device(await gw.reader.call(lambda c: registry.get_device(c, device_id)))

    @put("/{device_id:str}", opt={"roles": STAFF}, summary="Rename, move, disable or enable a device")
    async def update(self, request: Request[Any, Any, Any], device_id: str, data: DeviceChange) -> dict[str, Any]:
        gw = request.app.state.gateway
        changes = msgspec.structs.asdict(data)
        changes = {k: v for k, v in changes.items() if v is not msgspec.UNSET}
        if not changes:
            raise RegistryError("nothing to change: give site, room, type, name, disabled or call_priority")
        actor = request.state.user.username
        row = await gw.writer.run(lambda c: registry.update_device(c, device_id, changes, actor))
        await gw.accounts.refresh()  # a disabled or moved device is disconnected now
        return _device(row)

    @delete("/{device_id:str}", opt={"roles": STAFF}, status_code=HTTP_204_NO_CONTENT)
    async def remove(self, request: Request[Any, Any, Any], device_id: str) -> None:
        gw = request.app.state.gateway
        actor = request.state.user.username
        await gw.writer.run(lambda c: registry.delete_device(c, device_id, actor))
        gw.presence.forget(device_id)
        await gw.accounts.refresh()

    @get(
        "/{device_id:str}/measurements",
        opt={"roles": ANY},
        summary="Measurements, oldest first: from `since` if given, else the latest `limit` rows",
    )
    async def measurements(
        self,
        request: Request[Any, Any, Any],
        device_id: str,
        metric: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: Annotated[int, Parameter(ge=1, le=100_000)] = 1000,
    ) -> list[dict[str, Any]]:
        gw = request.app.state.gateway

        def read(conn: Any) -> list[dict[str, Any]]:
            registry.get_device(conn, device_id)  # 404 for an unknown device, not an empty list
            return views.measurements(conn, device_id, metric, since, until, limit)

        result: list[dict[str, Any]] = await gw.reader.call(read)
        return result

    @post(
        "/{device_id:str}/command",
        opt={"roles": STAFF},
        status_code=HTTP_202_ACCEPTED,
        summary="Publish cmd/{name} at QoS 2 with a command id; its ack is tracked",
    )
    async def command(self, request: Request[Any, Any, Any], device_id: str, data: CommandIn) -> dict[str, Any]:
        gw = request.app.state.gateway
        row = await gw.commands.send(device_id, data.name, data.args, request.state.user.username)
        return dataclasses.asdict(row)

    @get("/{device_id:str}/commands", opt={"roles": ANY})
    async def commands(
        self,
        request: Request[Any, Any, Any],
        device_id: str,
        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 100,
    ) -> list[dict[str, Any]]:
        gw = request.app.state.gateway
        rows = await gw.reader.call(lambda c: views.device_commands(c, device_id, limit))
        return [dataclasses.asdict(r) for r in rows]


@get("/api/v1/commands/{command_id:str}", opt={"roles": ANY}, tags=["devices"])
async def read_command(request: Request[Any, Any, Any], command_id: str) -> dict[str, Any]:
    gw = request.app.state.gateway
    row = await gw.reader.fetchone(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ?", (command_id,))
    if row is None:
        raise NotFound(f"command {command_id} does not exist")
    return dataclasses.asdict(command_row(row))
