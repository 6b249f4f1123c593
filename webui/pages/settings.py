"""Settings an installer or admin changes in the UI: rooms (name, zone, do-not-disturb) and the watches' duty;
beside them, read-only, the escalation timers and the retention budget from the config file.

Rooms and duty go through gateway.calls.places (the same functions as /api/v1/rooms and /api/v1/duty), which
write the audit rows. The timers are read once at start into a frozen config that the call service and the
retention task hold, so the page shows where they come from and how to change them instead of pretending to
edit them.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any
from urllib.parse import urlencode

from litestar import get, post
from litestar.response import Redirect, Template

from gateway import config
from gateway.calls import places
from gateway.errors import RegistryError
from gateway.topics import valid_segment
from webui.auth import STAFF
from webui.pages.base import PAGE, Req, go, render

__all__ = ["duty_save", "room_add", "room_change", "settings_page"]

CONFIG_KEYS = (
    "calls.escalation_normal",
    "calls.escalation_urgent",
    "calls.escalation_emergency",
    "calls.check_ms",
    "store.max_db_mb",
    "store.traffic_rows",
    "store.traffic_payload_bytes",
    "store.retention_check_s",
)
_DONE = {
    "room": "Room {room} saved.",
    "added": "Room {room} added.",
    "dnd-on": "{room} is now do-not-disturb: only emergencies notify.",
    "dnd-off": "{room} takes calls again.",
    "duty": "Duty saved.",
    "same": "Nothing changed.",
}


def _configured(cfg: config.Config) -> list[dict[str, Any]]:
    """The timer and budget settings: key, environment variable, running value, default, help."""
    rows = []
    for env, key, default, help_ in config.describe():
        if key in CONFIG_KEYS:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            rows.append({"key": key, "env": env, "value": value, "default": default, "help": help_})
    return sorted(rows, key=lambda row: CONFIG_KEYS.index(row["key"]))


def _read(conn: sqlite3.Connection) -> dict[str, Any]:
    rooms = places.list_rooms(conn)
    watches = [
        {"device_id": d, "name": n, "site": s, "room": r, "disabled": bool(off)}
        for d, n, s, r, off in conn.execute(
            "SELECT device_id, name, site, room, disabled FROM devices WHERE type = 'watch' ORDER BY device_id"
        )
    ]
    size = conn.execute("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()").fetchone()[0]
    return {
        "rooms": rooms,
        "sites": sorted({r["site"] for r in rooms}),
        "zones": sorted({r["zone"] for r in rooms if r["zone"]}),
        "watches": watches,
        "duty": places.get_duty(conn),
        "db_bytes": size,
    }


async def _page(request: Req, status: int = 200, error: str | None = None) -> Template:
    gw = request.app.state.gateway
    data = await gw.reader.call(_read)
    q = request.query_params
    done = _DONE.get(q.get("done") or "")
    message = done.format(room=q.get("room", "")) if done and status == 200 else None
    return render(
        request,
        "settings.html",
        status_code=status,
        error=error,
        message=message,
        configured=_configured(gw.cfg),
        default_site=gw.cfg.gateway.site,
        budget_mb=gw.cfg.store.max_db_mb,
        **data,
    )


def _done(what: str, room: str = "") -> Redirect:
    anchor = "duty" if what in ("duty", "same") and not room else "rooms"
    return go(f"/settings?{urlencode({'done': what, 'room': room})}#{anchor}")


def _label(form: Any, key: str) -> str | None:
    """A form field as a room setting: blank clears it (null)."""
    value = str(form.get(key) or "").strip()
    return value or None


def _check_zone(zone: str | None) -> None:
    # duty labels are topic segments (places.set_duty), so a zone must be one to be assignable at all
    if zone is not None and not valid_segment(zone):
        raise RegistryError(f"zone {zone!r} must be 1-64 characters of [A-Za-z0-9_-] (duty refers to it by name)")


@get("/settings", opt=PAGE(*STAFF))
async def settings_page(request: Req) -> Template:
    return await _page(request)


@post("/settings/rooms", opt=PAGE(*STAFF))
async def room_add(request: Req) -> Template | Redirect:
    """A room that has no device yet (or a new site: a room under a new site name)."""
    gw = request.app.state.gateway
    form = await request.form()
    site = str(form.get("site") or "").strip() or gw.cfg.gateway.site
    room = str(form.get("room") or "").strip()
    changes = {"name": _label(form, "name"), "zone": _label(form, "zone")}
    actor = request.state.user.username

    def add(conn: sqlite3.Connection) -> None:
        where = places.resolve_site(conn, room, site, site)  # checks both names
        places.update_room(conn, where, room, changes, actor)

    try:
        _check_zone(changes["zone"])
        await gw.writer.run(add)
    except RegistryError as exc:
        return await _page(request, 400, str(exc))
    return _done("added", f"{site}/{room}")


@post("/settings/rooms/{site:str}/{room:str}", opt=PAGE(*STAFF))
async def room_change(request: Req, site: str, room: str) -> Template | Redirect:
    """Name and zone (form fields name, zone), or do-not-disturb (form field dnd: 1 or 0)."""
    gw = request.app.state.gateway
    form = await request.form()
    actor = request.state.user.username
    try:
        if "dnd" in form:
            on = form.get("dnd") == "1"
            room_row = await gw.writer.run(lambda c: places.set_dnd(c, site, room, on, actor))
            # the same live-bus event as PUT /api/v1/rooms/{room}/dnd: calls pages show the change at once
            gw.hub.publish(
                "room",
                {
                    "site": room_row["site"],
                    "room": room_row["room"],
                    "dnd": room_row["dnd"],
                    "changed_at": room_row["dnd_changed_at"],
                    "changed_by": room_row["dnd_changed_by"],
                },
            )
            return _done("dnd-on" if on else "dnd-off", f"{site}/{room}")
        wanted = {"name": _label(form, "name"), "zone": _label(form, "zone")}
        _check_zone(wanted["zone"])

        def change(conn: sqlite3.Connection) -> bool:
            places.resolve_site(conn, room, site, site)  # checks both names
            current = next((r for r in places.list_rooms(conn, site) if r["room"] == room), None)
            changes = {k: v for k, v in wanted.items() if current is None or current[k] != v}
            if not changes:
                return False
            places.update_room(conn, site, room, changes, actor)  # audited only when something changes
            return True

        changed = await gw.writer.run(change)
    except RegistryError as exc:
        return await _page(request, 400, str(exc))
    return _done("room" if changed else "same", f"{site}/{room}")


@post("/settings/duty", opt=PAGE(*STAFF))
async def duty_save(request: Req) -> Template | Redirect:
    """The whole assignment from one form: a field `duty-<watch>` per watch, labels separated by commas or spaces."""
    gw = request.app.state.gateway
    form = await request.form()
    duty: dict[str, list[str]] = {}
    for key, value in form.items():
        if key.startswith("duty-"):
            labels = [label for label in re.split(r"[\s,]+", str(value)) if label]
            if labels:  # a watch with no labels is on duty nowhere: it gets calls only when none is on duty
                duty[key.removeprefix("duty-")] = labels
    actor = request.state.user.username

    def save(conn: sqlite3.Connection) -> bool:
        if places.get_duty(conn) == {w: sorted(set(labels)) for w, labels in duty.items()}:
            return False
        places.set_duty(conn, duty, actor)
        return True

    try:
        changed = await gw.writer.run(save)
    except RegistryError as exc:
        return await _page(request, 400, str(exc))
    return _done("duty" if changed else "same")
