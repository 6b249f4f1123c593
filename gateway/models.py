"""Frozen value types shared by the store, the broker and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PRIORITIES", "ROLES", "Device", "DeviceRow", "Principal", "Role", "User"]

Role = Literal["admin", "installer", "crew"]
ROLES: tuple[Role, ...] = ("admin", "installer", "crew")
PRIORITIES = ("normal", "urgent", "emergency")  # crew calls, lowest first


@dataclass(frozen=True, slots=True)
class Device:
    """What the broker needs to know about a device account (cached in memory)."""

    device_id: str
    site: str
    room: str
    type: str
    disabled: bool


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an MQTT session is, and so what its ACL allows.

    kind 'device': publish under its own namespace, subscribe to its own cmd/#.
    kind 'integration' or 'anonymous': the read/write patterns given (deny wins).
    """

    kind: Literal["device", "integration", "anonymous"]
    name: str
    device: Device | None = None
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class User:
    username: str
    role: Role
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device as the API shows it."""

    device_id: str
    site: str
    room: str
    type: str
    name: str | None
    disabled: bool
    online: bool
    online_changed_at: float | None
    last_seen: float | None
    battery: float | None
    signal: float | None
    firmware: str | None
    status: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    call_priority: str | None = None  # the priority this device's presses get at least (crew calls)
