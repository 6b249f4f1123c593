"""The registry: devices, MQTT credentials, integrations, users and API tokens.

Every function takes a sqlite3 connection already inside a transaction, so the same code runs in the
gateway's writer thread (API) and in the CLI's own connection (works whether or not the gateway runs).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import passwords
from gateway.errors import Conflict, NotFound, RegistryError
from gateway.models import PRIORITIES, ROLES, Device, DeviceRow, Principal, User
from gateway.store.records import LANE_STATE, audit, outbox
from gateway.topics import valid_filter, valid_segment

__all__ = [
    "NewDevice",
    "add_device",
    "add_integration",
    "add_user",
    "create_token",
    "delete_device",
    "device_row",
    "get_device",
    "import_devices",
    "list_devices",
    "load_accounts",
    "lookup_token",
    "update_device",
]

DEVICE_TYPES = ("button", "watch", "repeater", "sensor")


@dataclass(frozen=True)
class NewDevice:
    device_id: str
    site: str
    room: str
    type: str
    password: str | None = None
    name: str | None = None


def _check_device(d: NewDevice) -> None:
    for label, value in (("device_id", d.device_id), ("site", d.site), ("room", d.room), ("type", d.type)):
        if not valid_segment(value or ""):
            raise RegistryError(f"{label} {value!r} must be 1-64 characters of [A-Za-z0-9_-] (it is a topic level)")
    if d.type not in DEVICE_TYPES:
        raise RegistryError(f"type {d.type!r} must be one of {', '.join(DEVICE_TYPES)}")
    if d.password is not None and passwords.entropy_bits(d.password) < passwords.MIN_DEVICE_BITS:
        raise RegistryError(
            f"the password for {d.device_id} is too weak for a device secret (at least "
            f"{passwords.MIN_DEVICE_BITS} bits: 22 or more random characters of [A-Za-z0-9_-]); "
            "leave it out to have one generated"
        )


def device_row(row: sqlite3.Row | tuple[Any, ...]) -> DeviceRow:
    (
        device_id,
        site,
        room,
        type_,
        name,
        disabled,
        online,
        changed,
        last_seen,
        battery,
        signal,
        firmware,
        status_json,
        created_at,
        updated_at,
        call_priority,
    ) = tuple(row)
    return DeviceRow(
        device_id=device_id,
        site=site,
        room=room,
        type=type_,
        name=name,
        disabled=bool(disabled),
        online=bool(online),
        online_changed_at=changed,
        last_seen=last_seen,
        battery=battery,
        signal=signal,
        firmware=firmware,
        status=json.loads(status_json) if status_json else {},
        created_at=created_at,
        updated_at=updated_at,
        call_priority=call_priority,
    )


DEVICE_COLUMNS = (
    "device_id, site, room, type, name, disabled, online, online_changed_at, last_seen, battery, signal, "
    "firmware, status_json, created_at, updated_at, call_priority"
)


def _device_body(d: DeviceRow) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "site": d.site,
        "room": d.room,
        "type": d.type,
        "name": d.name,
        "disabled": d.disabled,
    }


def add_device(conn: sqlite3.Connection, new: NewDevice, actor: str) -> tuple[DeviceRow, str]:
    """Create a device and its MQTT credential; returns the row and the password (shown once)."""
    _check_device(new)
    password = new.password or passwords.generate_secret()
    now = time.time()
    if conn.execute("SELECT 1 FROM devices WHERE device_id = ?", (new.device_id,)).fetchone():
        raise Conflict(f"device {new.device_id} already exists")
    if conn.execute("SELECT 1 FROM credentials WHERE username = ?", (new.device_id,)).fetchone():
        raise Conflict(f"the MQTT username {new.device_id} is already taken by an integration")
    conn.execute(
        "INSERT INTO devices(device_id, site, room, type, name, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
        (new.device_id, new.site, new.room, new.type, new.name, now, now),
    )
    conn.execute(
        "INSERT INTO credentials(username, kind, secret_hash, created_at) VALUES (?, 'device', ?, ?)",
        (new.device_id, passwords.hash_secret(password), now),
    )
    row = get_device(conn, new.device_id)
    audit(conn, actor, "device.add", new.device_id, {"site": new.site, "room": new.room, "type": new.type})
    outbox(conn, LANE_STATE, "device", _device_body(row), new.device_id)
    return row, password


def import_devices(conn: sqlite3.Connection, path: Path, actor: str) -> list[tuple[str, str | None]]:
    """An installer's room list: CSV with columns device_id, site, room, type, password (may be empty).

    All rows or none: the first bad row raises RegistryError naming its line. Returns (device_id,
    generated password or None) so generated secrets can be handed to the installer once.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        needed = {"device_id", "site", "room", "type"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise RegistryError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        rows = [(reader.line_num, row) for row in reader]  # line_num counts blank lines, enumerate would not
    now = time.time()
    seen: set[str] = set()
    device_rows, cred_rows, out = [], [], []
    for line, raw in rows:
        new = NewDevice(
            device_id=(raw.get("device_id") or "").strip(),
            site=(raw.get("site") or "").strip(),
            room=(raw.get("room") or "").strip(),
            type=(raw.get("type") or "").strip(),
            password=(raw.get("password") or "").strip() or None,
        )
        try:
            _check_device(new)
        except RegistryError as exc:
            raise RegistryError(f"{path}:{line}: {exc}") from None
        if new.device_id in seen:
            raise RegistryError(f"{path}:{line}: device {new.device_id} appears twice")
        seen.add(new.device_id)
        password = new.password or passwords.generate_secret()
        device_rows.append((new.device_id, new.site, new.room, new.type, now, now))
        cred_rows.append((new.device_id, passwords.hash_secret(password), now))
        out.append((new.device_id, None if new.password else password))
    existing = _existing(conn, seen)
    if existing:
        raise RegistryError(f"{path}: already registered: {', '.join(sorted(existing)[:10])}")
    conn.executemany(
        "INSERT INTO devices(device_id, site, room, type, created_at, updated_at) VALUES (?,?,?,?,?,?)",
        device_rows,
    )
    conn.executemany(
        "INSERT INTO credentials(username, kind, secret_hash, created_at) VALUES (?, 'device', ?, ?)",
        cred_rows,
    )
    for device_id, site, room, type_, _, _ in device_rows:
        outbox(
            conn,
            LANE_STATE,
            "device",
            {
                "device_id": device_id,
                "site": site,
                "room": room,
                "type": type_,
                "name": None,
                "disabled": False,
            },
            device_id,
        )
    audit(conn, actor, "device.import", str(path.name), {"count": len(device_rows)})
    return out


def _existing(conn: sqlite3.Connection, ids: Iterable[str]) -> set[str]:
    found: set[str] = set()
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found |= {r[0] for r in conn.execute(f"SELECT username FROM credentials WHERE username IN ({marks})", chunk)}
    return found


def get_device(conn: sqlite3.Connection, device_id: str) -> DeviceRow:
    row = conn.execute(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    if row is None:
        raise NotFound(f"device {device_id} does not exist")
    return device_row(row)


def list_devices(
    conn: sqlite3.Connection,
    site: str | None = None,
    room: str | None = None,
    type_: str | None = None,
    online: bool | None = None,
) -> list[DeviceRow]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("site", site), ("room", room), ("type", type_)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if online is not None:
        where.append("online = ?")
        params.append(int(online))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(f"SELECT {DEVICE_COLUMNS} FROM devices{clause} ORDER BY device_id", params).fetchall()
    return [device_row(r) for r in rows]


def update_device(conn: sqlite3.Connection, device_id: str, changes: dict[str, Any], actor: str) -> DeviceRow:
    """Rename, move (site/room/type) or disable a device."""
    current = get_device(conn, device_id)
    allowed = {"site", "room", "type", "name", "disabled", "call_priority"}
    unknown = set(changes) - allowed
    if unknown:
        raise RegistryError(f"cannot change {', '.join(sorted(unknown))} (changeable: {', '.join(sorted(allowed))})")
    merged = NewDevice(
        device_id,
        changes.get("site", current.site),
        changes.get("room", current.room),
        changes.get("type", current.type),
    )
    _check_device(merged)
    if "name" in changes and changes["name"] is not None and not isinstance(changes["name"], str):
        raise RegistryError("name must be a string")
    if changes.get("call_priority") not in (None, *PRIORITIES):
        raise RegistryError(f"call_priority must be one of {', '.join(PRIORITIES)} or null")
    sets = ", ".join(f"{k} = ?" for k in changes)
    values = [int(v) if k == "disabled" else v for k, v in changes.items()]
    conn.execute(f"UPDATE devices SET {sets}, updated_at = ? WHERE device_id = ?", (*values, time.time(), device_id))
    row = get_device(conn, device_id)
    audit(conn, actor, "device.update", device_id, changes)
    outbox(conn, LANE_STATE, "device", _device_body(row), device_id)
    return row


def delete_device(conn: sqlite3.Connection, device_id: str, actor: str) -> None:
    get_device(conn, device_id)
    conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
    conn.execute("DELETE FROM credentials WHERE username = ? AND kind = 'device'", (device_id,))
    audit(conn, actor, "device.delete", device_id, {})
    outbox(conn, LANE_STATE, "device_deleted", {"device_id": device_id}, device_id)


def add_integration(
    conn: sqlite3.Connection, name: str, password: str, read: list[str], write: list[str], actor: str
) -> None:
    """An MQTT account for Node-RED, Home Assistant or Grafana, limited to the given topic patterns."""
    if not valid_segment(name):
        raise RegistryError(f"integration name {name!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if len(password) < 12:
        raise RegistryError("integration passwords need at least 12 characters")
    if not read and not write:
        raise RegistryError("give at least one --read or --write pattern")
    for pattern in (*read, *write):
        if not valid_filter(pattern):
            raise RegistryError(f"{pattern!r} is not a valid MQTT topic filter")
    if conn.execute("SELECT 1 FROM credentials WHERE username = ?", (name,)).fetchone():
        raise Conflict(f"the MQTT username {name} is already taken")
    conn.execute(
        "INSERT INTO credentials(username, kind, secret_hash, read_patterns, write_patterns, created_at) "
        "VALUES (?, 'integration', ?, ?, ?, ?)",
        (name, passwords.hash_password(password), json.dumps(read), json.dumps(write), time.time()),
    )
    audit(conn, actor, "integration.add", name, {"read": read, "write": write})


def add_user(conn: sqlite3.Connection, username: str, role: str, password: str, actor: str) -> User:
    if not valid_segment(username):
        raise RegistryError(f"user name {username!r} must be 1-64 characters of [A-Za-z0-9_-]")
    if role not in ROLES:
        raise RegistryError(f"role {role!r} must be one of {', '.join(ROLES)}")
    if len(password) < 10:
        raise RegistryError("passwords need at least 10 characters")
    if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
        raise Conflict(f"user {username} already exists")
    conn.execute(
        "INSERT INTO users(username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
        (username, role, passwords.hash_password(password), time.time()),
    )
    audit(conn, actor, "user.add", username, {"role": role})
    return User(username, role)


def count_users(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def create_token(conn: sqlite3.Connection, username: str, label: str | None, actor: str) -> str:
    """A new API token for `username`, returned once; only its hash is stored."""
    if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
        raise NotFound(f"user {username} does not exist")
    token = passwords.generate_token()
    conn.execute(
        "INSERT INTO api_tokens(token_hash, username, label, created_at) VALUES (?, ?, ?, ?)",
        (passwords.token_hash(token), username, label, time.time()),
    )
    audit(conn, actor, "token.create", username, {"label": label})
    return token


def lookup_token(conn: sqlite3.Connection, token: str) -> User | None:
    row = conn.execute(
        "SELECT u.username, u.role, u.disabled FROM api_tokens t JOIN users u ON u.username = t.username "
        "WHERE t.token_hash = ? AND t.revoked = 0",
        (passwords.token_hash(token),),
    ).fetchone()
    if row is None or row[2]:
        return None
    return User(row[0], row[1])


@dataclass(frozen=True)
class Account:
    """A cached MQTT account: its secret hash and who it is."""

    secret_hash: str
    principal: Principal


def load_accounts(conn: sqlite3.Connection) -> tuple[int, dict[str, Account]]:
    """Every MQTT account with its principal, plus the registry version it reflects."""
    version = int(conn.execute("SELECT value FROM meta WHERE key = 'registry_version'").fetchone()[0])
    devices = {
        r[0]: Device(r[0], r[1], r[2], r[3], bool(r[4]))
        for r in conn.execute("SELECT device_id, site, room, type, disabled FROM devices")
    }
    accounts: dict[str, Account] = {}
    for username, kind, secret_hash, read, write in conn.execute(
        "SELECT username, kind, secret_hash, read_patterns, write_patterns FROM credentials"
    ):
        if kind == "device":
            device = devices.get(username)
            if device is None:
                continue
            principal = Principal("device", username, device=device)
        else:
            principal = Principal("integration", username, read=tuple(json.loads(read)), write=tuple(json.loads(write)))
        accounts[username] = Account(secret_hash, principal)
    return version, accounts


def registry_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'registry_version'").fetchone()[0])
