"""Security profiles (seed 004's MQTTSecurityProfile) and the ACL simulator.

A profile names what a kind of device may do beyond its namespace ACL: which actions it may publish
(`press`, `status`, ...; empty means any), the highest QoS, whether it may retain, how many connections,
and whether it must log in with a certificate. `decide` is the one decision the broker applies and the
simulator reports, so the two cannot disagree: the namespace rule comes from gateway.acl, the limits from
the device's profile, and the answer names the rule that decided.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from gateway import acl
from gateway.errors import NotFound, RegistryError
from gateway.models import Principal
from gateway.store.records import audit
from gateway.store.registry import DEVICE_TYPES
from gateway.topics import device_prefix, valid_segment

__all__ = [
    "Decision",
    "Profile",
    "action_refusal",
    "assign",
    "decide",
    "delete_profile",
    "device_profiles",
    "get_profile",
    "limits_refusal",
    "list_profiles",
    "profile_rule",
    "put_profile",
]

PUBLISH, SUBSCRIBE = "publish", "subscribe"


@dataclass(frozen=True)
class Profile:
    name: str
    device_type: str | None = None
    actions: tuple[str, ...] = ()  # empty: every action under the device's namespace
    max_qos: int = 2
    retain: bool = True
    max_connections: int = 1
    client_cert_required: bool = False
    description: str | None = None

    def body(self) -> dict[str, Any]:
        out = asdict(self)
        out["actions"] = list(self.actions)
        return out


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str


def _prefix(principal: Principal, root: str) -> str:
    d = principal.device
    assert d is not None
    return device_prefix(root, d.site, d.room, d.type, d.device_id)


def action_refusal(profile: Profile | None, topic: str, prefix: str) -> str | None:
    """Why `profile` refuses publishing to `topic` (inside the device's namespace `prefix`), or None."""
    if profile is None or not profile.actions:
        return None
    action = topic[len(prefix) :].split("/", 1)[0]
    if action not in profile.actions:
        return f"profile {profile.name} allows publishing only {', '.join(profile.actions)} (not {action})"
    return None


def limits_refusal(profile: Profile | None, qos: int, retain: bool) -> str | None:
    """Why `profile` refuses a PUBLISH with this QoS and retain flag, or None."""
    if profile is None:
        return None
    if qos > profile.max_qos:
        return f"profile {profile.name} allows QoS {profile.max_qos} at most (not {qos})"
    if retain and not profile.retain:
        return f"profile {profile.name} does not allow retained messages"
    return None


def profile_rule(profile: Profile | None, topic: str, prefix: str, qos: int, retain: bool) -> str | None:
    """Why `profile` refuses this PUBLISH from inside the device's namespace, or None if it allows it."""
    return action_refusal(profile, topic, prefix) or limits_refusal(profile, qos, retain)


def decide(
    principal: Principal | None,
    profile: Profile | None,
    action: str,
    topic: str,
    root: str,
    qos: int = 0,
    retain: bool = False,
) -> Decision:
    """May `principal` publish to / subscribe to `topic`, and by which rule."""
    if principal is None:
        return Decision(False, "no such MQTT account (or anonymous clients are off: mqtt.allow_anonymous)")
    if action not in (PUBLISH, SUBSCRIBE):
        raise RegistryError(f"action must be {PUBLISH} or {SUBSCRIBE}, got {action!r}")
    if principal.kind == "device":
        prefix = _prefix(principal, root)
        if action == PUBLISH:
            if not acl.may_publish(principal, topic, root):
                return Decision(False, f"devices publish only under {prefix} (never into their own cmd/)")
            refused = profile_rule(profile, topic, prefix, qos, retain)
            if refused:
                return Decision(False, refused)
            via = f" within profile {profile.name}" if profile else ""
            return Decision(True, f"own namespace {prefix}{via}")
        if not acl.may_subscribe(principal, topic, root):
            return Decision(False, f"devices subscribe only to {prefix}cmd/#")
        if profile is not None and qos > profile.max_qos:
            return Decision(True, f"own commands {prefix}cmd/#, granted QoS {profile.max_qos} (profile {profile.name})")
        return Decision(True, f"own commands {prefix}cmd/#")
    patterns = principal.write if action == PUBLISH else principal.read
    allowed = (
        acl.may_publish(principal, topic, root) if action == PUBLISH else acl.may_subscribe(principal, topic, root)
    )
    who = f"{principal.kind} {principal.name}" if principal.kind != "anonymous" else "anonymous clients"
    if allowed:
        return Decision(True, f"{who}: {'write' if action == PUBLISH else 'read'} patterns {list(patterns)}")
    if principal.deny:
        return Decision(False, f"{who}: not in {list(patterns)}, or denied by {list(principal.deny)}")
    return Decision(False, f"{who}: no {'write' if action == PUBLISH else 'read'} pattern covers it ({list(patterns)})")


# -- storage ---------------------------------------------------------------------------------------------

_COLUMNS = "name, device_type, actions, max_qos, retain, max_connections, client_cert_required, description"


def _decode(row: tuple[Any, ...]) -> Profile:
    name, device_type, actions, max_qos, retain, max_connections, cert_required, description = row
    return Profile(
        name,
        device_type,
        tuple(json.loads(actions)),
        max_qos,
        bool(retain),
        max_connections,
        bool(cert_required),
        description,
    )


def list_profiles(conn: sqlite3.Connection) -> list[Profile]:
    return [_decode(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM security_profiles ORDER BY name")]


def get_profile(conn: sqlite3.Connection, name: str) -> Profile:
    row = conn.execute(f"SELECT {_COLUMNS} FROM security_profiles WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"security profile {name} does not exist")
    return _decode(row)


def put_profile(conn: sqlite3.Connection, profile: Profile, actor: str) -> Profile:
    """Create or replace a profile (devices using it get the new limits at once)."""
    if not valid_segment(profile.name):
        raise RegistryError(f"profile name {profile.name!r} must be 1-64 characters of [A-Za-z0-9_-]")
    for action in profile.actions:
        if not valid_segment(action):
            raise RegistryError(f"action {action!r} must be one topic level of [A-Za-z0-9_-]")
    if profile.max_qos not in (0, 1, 2):
        raise RegistryError(f"max_qos must be 0, 1 or 2, got {profile.max_qos}")
    if profile.max_connections < 1:
        raise RegistryError(f"max_connections must be 1 or more, got {profile.max_connections}")
    if profile.device_type is not None and profile.device_type not in DEVICE_TYPES:
        raise RegistryError(f"device_type must be one of {', '.join(DEVICE_TYPES)}, got {profile.device_type!r}")
    conn.execute(
        f"INSERT OR REPLACE INTO security_profiles({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
        (
            profile.name,
            profile.device_type,
            json.dumps(list(profile.actions)),
            profile.max_qos,
            int(profile.retain),
            profile.max_connections,
            int(profile.client_cert_required),
            profile.description,
        ),
    )
    audit(conn, actor, "profile.put", profile.name, profile.body())
    return get_profile(conn, profile.name)


def delete_profile(conn: sqlite3.Connection, name: str, actor: str) -> None:
    get_profile(conn, name)
    users = conn.execute("SELECT count(*) FROM devices WHERE profile = ?", (name,)).fetchone()[0]
    if users:
        raise RegistryError(f"security profile {name} is assigned to {users} device(s): assign them another first")
    conn.execute("DELETE FROM security_profiles WHERE name = ?", (name,))
    audit(conn, actor, "profile.delete", name, {})


def assign(conn: sqlite3.Connection, device_id: str, name: str | None, actor: str) -> None:
    if name is not None:
        get_profile(conn, name)
    if conn.execute("UPDATE devices SET profile = ? WHERE device_id = ?", (name, device_id)).rowcount == 0:
        raise NotFound(f"device {device_id} does not exist")
    audit(conn, actor, "device.profile", device_id, {"profile": name})


def device_profiles(conn: sqlite3.Connection) -> dict[str, Profile]:
    """device id -> its profile, for every device that has one (the broker's cache)."""
    profiles = {p.name: p for p in list_profiles(conn)}
    rows = conn.execute("SELECT device_id, profile FROM devices WHERE profile IS NOT NULL").fetchall()
    return {device_id: profiles[name] for device_id, name in rows if name in profiles}
