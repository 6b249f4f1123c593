"""Rooms (name, zone, do-not-disturb) and the watches' duty (watch -> zone labels), in the caller's transaction.

A room exists once a device is in it or it has a row; its id is the topic's room segment, qualified by site
when two sites share a room name. Duty labels match a room when they are "*", its zone, its id or its site.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from gateway.errors import NotFound, RegistryError
from gateway.store.records import LANE_STATE, audit, outbox
from gateway.topics import valid_segment

__all__ = ["get_duty", "get_room", "list_rooms", "resolve_site", "set_dnd", "set_duty", "update_room"]

_ROOM_COLUMNS = "site, room, name, zone, dnd, dnd_changed_at, dnd_changed_by"


def resolve_site(conn: sqlite3.Connection, room: str, site: str | None, default_site: str) -> str:
    """The site of `room`: the one given, the only site that has it, or the gateway's own for a new room."""
    if not valid_segment(room):
        raise RegistryError(f"room {room!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if site is not None:
        if not valid_segment(site):
            raise RegistryError(f"site {site!r} must be 1-64 characters of [A-Za-z0-9_-]")
        return site
    rows = conn.execute(
        "SELECT site FROM devices WHERE room = ? UNION SELECT site FROM rooms WHERE room = ? ORDER BY 1", (room, room)
    ).fetchall()
    if len(rows) > 1:
        sites = ", ".join(r[0] for r in rows)
        raise RegistryError(f"room {room} exists at sites {sites}: say which with ?site=")
    return rows[0][0] if rows else default_site


def _room(row: tuple[Any, ...]) -> dict[str, Any]:
    site, room, name, zone, dnd, changed_at, changed_by = row
    return {
        "site": site,
        "room": room,
        "name": name,
        "zone": zone,
        "dnd": bool(dnd),
        "dnd_changed_at": changed_at,
        "dnd_changed_by": changed_by,
    }


def list_rooms(conn: sqlite3.Connection, site: str | None = None) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {_ROOM_COLUMNS} FROM rooms UNION "
        "SELECT DISTINCT d.site, d.room, NULL, NULL, 0, NULL, NULL FROM devices d "
        "WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.site = d.site AND r.room = d.room) ORDER BY 1, 2"
    ).fetchall()
    return [_room(r) for r in rows if site is None or r[0] == site]


def get_room(conn: sqlite3.Connection, site: str, room: str) -> dict[str, Any]:
    row = conn.execute(f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE site = ? AND room = ?", (site, room)).fetchone()
    if row is not None:
        return _room(row)
    if conn.execute("SELECT 1 FROM devices WHERE site = ? AND room = ?", (site, room)).fetchone() is None:
        raise NotFound(f"room {room} at site {site} has no device and no settings")
    return _room((site, room, None, None, 0, None, None))


def _ensure(conn: sqlite3.Connection, site: str, room: str) -> None:
    conn.execute("INSERT OR IGNORE INTO rooms(site, room) VALUES (?, ?)", (site, room))


def update_room(conn: sqlite3.Connection, site: str, room: str, changes: dict[str, Any], actor: str) -> dict[str, Any]:
    """Name a room or put it in a zone (a label duty refers to); creates its settings row if needed."""
    name, zone = changes.get("name"), changes.get("zone")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 64):
        raise RegistryError("name must be a non-empty string of at most 64 characters, or null")
    if zone is not None and (not isinstance(zone, str) or not valid_segment(zone)):
        # a zone is a label duty refers to, so it has the same form as duty's labels
        raise RegistryError(f"zone {zone!r} must be 1-64 characters of [A-Za-z0-9_-], or null")
    _ensure(conn, site, room)
    for key in ("name", "zone"):
        if key in changes:
            conn.execute(f"UPDATE rooms SET {key} = ? WHERE site = ? AND room = ?", (changes[key], site, room))
    audit(conn, actor, "room.update", f"{site}/{room}", changes)
    result = get_room(conn, site, room)
    outbox(conn, LANE_STATE, "room", result)
    return result


def set_dnd(conn: sqlite3.Connection, site: str, room: str, dnd: bool, actor: str) -> dict[str, Any]:
    _ensure(conn, site, room)
    conn.execute(
        "UPDATE rooms SET dnd = ?, dnd_changed_at = ?, dnd_changed_by = ? WHERE site = ? AND room = ?",
        (int(dnd), time.time(), actor, site, room),
    )
    audit(conn, actor, "room.dnd", f"{site}/{room}", {"dnd": dnd})
    result = get_room(conn, site, room)
    outbox(conn, LANE_STATE, "room", result)
    return result


def get_duty(conn: sqlite3.Connection) -> dict[str, list[str]]:
    return {watch: json.loads(zones) for watch, zones in conn.execute("SELECT watch_id, zones FROM duty ORDER BY 1")}


def set_duty(conn: sqlite3.Connection, duty: dict[str, list[str]], actor: str) -> dict[str, list[str]]:
    """Replace the whole assignment; every key must be a registered watch, every label a topic segment or '*'."""
    for watch, labels in duty.items():
        row = conn.execute("SELECT type FROM devices WHERE device_id = ?", (watch,)).fetchone()
        if row is None or row[0] != "watch":
            raise RegistryError(f"{watch} is not a registered watch")
        for label in labels:
            if label != "*" and not valid_segment(label):
                raise RegistryError(f"zone {label!r} for {watch} must be '*' or 1-64 characters of [A-Za-z0-9_-]")
    conn.execute("DELETE FROM duty")
    conn.executemany(
        "INSERT INTO duty(watch_id, zones) VALUES (?, ?)",
        [(watch, json.dumps(sorted(set(labels)))) for watch, labels in duty.items()],
    )
    audit(conn, actor, "duty.set", None, {"duty": duty})
    return get_duty(conn)
