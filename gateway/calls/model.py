"""A crew call as stored and as the API, the live bus and HQ see it."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from gateway.models import PRIORITIES

__all__ = ["CALL_COLUMNS", "ESCALATION_STATES", "Call", "Send", "call_row", "rank"]

CALL_COLUMNS = (
    "id, device_id, site, room, priority, press_type, state, created_at, presses, last_press_at, dnd, escalation, "
    "escalated_at, accepted_at, accepted_by, completed_at, completed_by, cancelled_at, cancelled_by, cancel_reason, "
    "zone"
)
ESCALATION_STATES = ("none", "renotified", "all", "overdue")  # by tier reached: 0, 1, 2, 3
ACTIVE = ("open", "accepted")


def rank(priority: str) -> int:
    return PRIORITIES.index(priority)


@dataclass(frozen=True)
class Call:
    id: int
    device_id: str
    site: str
    room: str
    priority: str
    press_type: str
    state: str
    created_at: float
    presses: int
    last_press_at: float
    dnd: bool
    escalation: int
    escalated_at: float | None
    accepted_at: float | None
    accepted_by: str | None
    completed_at: float | None
    completed_by: str | None
    cancelled_at: float | None
    cancelled_by: str | None
    cancel_reason: str | None
    zone: str | None  # the room's zone when the call was made

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "escalation_state": ESCALATION_STATES[self.escalation]}


def call_row(row: sqlite3.Row | tuple[Any, ...]) -> Call:
    values = list(row)
    values[10] = bool(values[10])
    return Call(*values)


@dataclass(frozen=True, slots=True)
class Send:
    """A cmd/notify to publish once the transaction that recorded it has committed."""

    command_id: str
    topic: str
    payload: bytes
    pressed_at: float | None  # when the press that caused it arrived (press-to-notify latency)
