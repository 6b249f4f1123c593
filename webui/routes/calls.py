"""Crew calls, duty and rooms: the API the crew's pages and watches' companions use."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.params import Parameter

from gateway.calls import places
from gateway.calls.queries import call_detail, call_stats, list_calls
from webui.auth import ANY

__all__ = ["CallController", "RoomController", "get_duty", "put_duty"]

Req = Request[Any, Any, Any]


class CancelIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


class DndIn(msgspec.Struct, forbid_unknown_fields=True):
    dnd: bool


class RoomChange(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str | msgspec.UnsetType | None = msgspec.UNSET
    zone: str | msgspec.UnsetType | None = msgspec.UNSET


class CallController(Controller):
    path = "/api/v1/calls"
    tags = ["calls"]

    @get("/", opt={"roles": ANY}, summary="Calls, newest first; state is a comma list (open,accepted)")
    async def list_(
        self,
        request: Req,
        state_: Annotated[str | None, Parameter(query="state")] = None,  # `state` is Litestar's own kwarg
        site: str | None = None,
        room: str | None = None,
        since: float | None = None,
        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 200,
    ) -> list[dict[str, Any]]:
        states = [s.strip() for s in state_.split(",") if s.strip()] if state_ else None
        gw = request.app.state.gateway
        result: list[dict[str, Any]] = await gw.reader.call(lambda c: list_calls(c, states, site, room, since, limit))
        return result

    @get("/stats", opt={"roles": ANY}, summary="Counts and response times of the calls made since `since`")
    async def stats(self, request: Req, since: float | None = None) -> dict[str, Any]:
        start = since if since is not None else time.time() - 86400
        result: dict[str, Any] = await request.app.state.gateway.reader.call(lambda c: call_stats(c, start))
        return result

    @get("/{call_id:int}", opt={"roles": ANY}, summary="One call with its timeline and the notifies it sent")
    async def read(self, request: Req, call_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await request.app.state.gateway.reader.call(lambda c: call_detail(c, call_id))
        return result

    @post("/{call_id:int}/accept", opt={"roles": ANY}, status_code=200, summary="Accept an open call")
    async def accept(self, request: Req, call_id: int) -> dict[str, Any]:
        call = await request.app.state.gateway.calls.accept(call_id, request.state.user.username)
        return call.as_dict()  # type: ignore[no-any-return]

    @post("/{call_id:int}/complete", opt={"roles": ANY}, status_code=200, summary="Complete an open or accepted call")
    async def complete(self, request: Req, call_id: int) -> dict[str, Any]:
        call = await request.app.state.gateway.calls.complete(call_id, request.state.user.username)
        return call.as_dict()  # type: ignore[no-any-return]

    @post(
        "/{call_id:int}/cancel",
        opt={"roles": ANY},
        status_code=200,
        summary="Cancel a call; an emergency only by an admin",
    )
    async def cancel(self, request: Req, call_id: int, data: CancelIn | None = None) -> dict[str, Any]:
        user = request.state.user
        reason = data.reason if data is not None else None
        call = await request.app.state.gateway.calls.cancel(call_id, user.username, user.role == "admin", reason)
        return call.as_dict()  # type: ignore[no-any-return]


@get("/api/v1/duty", opt={"roles": ANY}, tags=["calls"], summary="Which zones each watch is on duty for")
async def get_duty(request: Req) -> dict[str, list[str]]:
    result: dict[str, list[str]] = await request.app.state.gateway.reader.call(places.get_duty)
    return result


@put("/api/v1/duty", opt={"roles": ANY}, tags=["calls"], summary="Replace the duty assignment (watch -> zones)")
async def put_duty(request: Req, data: dict[str, list[str]]) -> dict[str, list[str]]:
    actor = request.state.user.username
    result: dict[str, list[str]] = await request.app.state.gateway.writer.run(lambda c: places.set_duty(c, data, actor))
    return result


class RoomController(Controller):
    path = "/api/v1/rooms"
    tags = ["calls"]

    @get("/", opt={"roles": ANY}, summary="Rooms with a device or settings: name, zone, do-not-disturb")
    async def list_(self, request: Req, site: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await request.app.state.gateway.reader.call(lambda c: places.list_rooms(c, site))
        return result

    @put("/{room:str}", opt={"roles": ANY}, summary="Name a room or put it in a zone")
    async def update(self, request: Req, room: str, data: RoomChange, site: str | None = None) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username
        changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}

        def change(c: Any) -> dict[str, Any]:
            return places.update_room(c, places.resolve_site(c, room, site, gw.cfg.gateway.site), room, changes, actor)

        result: dict[str, Any] = await gw.writer.run(change)
        return result

    @get("/{room:str}/dnd", opt={"roles": ANY}, summary="Whether a room is set to do-not-disturb")
    async def dnd(self, request: Req, room: str, site: str | None = None) -> dict[str, Any]:
        gw = request.app.state.gateway

        def read(c: Any) -> dict[str, Any]:
            where = places.resolve_site(c, room, site, gw.cfg.gateway.site)
            return _dnd(places.get_room(c, where, room))

        result: dict[str, Any] = await gw.reader.call(read)
        return result

    @put("/{room:str}/dnd", opt={"roles": ANY}, summary="Set or clear do-not-disturb: only emergencies notify")
    async def set_dnd(self, request: Req, room: str, data: DndIn, site: str | None = None) -> dict[str, Any]:
        gw = request.app.state.gateway
        actor = request.state.user.username

        def change(c: Any) -> dict[str, Any]:
            where = places.resolve_site(c, room, site, gw.cfg.gateway.site)
            return _dnd(places.set_dnd(c, where, room, data.dnd, actor))

        result: dict[str, Any] = await gw.writer.run(change)
        gw.hub.publish("room", result)
        return result


def _dnd(room: dict[str, Any]) -> dict[str, Any]:
    return {
        "site": room["site"],
        "room": room["room"],
        "dnd": room["dnd"],
        "changed_at": room["dnd_changed_at"],
        "changed_by": room["dnd_changed_by"],
    }
