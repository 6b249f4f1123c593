"""Call transitions, each inside the writer's transaction that stores its cause.

A press, a watch's answer, a crew member's click and an escalation tier all go through `Tx`: it changes the
call, writes the timeline, audit and outbox rows, records every cmd/notify (a `commands` row and a
`call_notifies` row) and collects what to do after the COMMIT: live-bus events and the notifies to publish.
Nothing is published before its rows are committed, so a crash never announces a call that is not stored.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.calls.model import CALL_COLUMNS, Call, Send, call_row, rank
from gateway.errors import Conflict, Forbidden, NotFound
from gateway.models import PRIORITIES
from gateway.store.records import LANE_PRIORITY, audit, outbox
from gateway.topics import command_topic

__all__ = ["SEND", "Policy", "Tx"]

log = logging.getLogger(__name__)

SEND = "call.send"  # outcome items of this kind are published, not put on the live bus
_TIER_ACTIONS = {1: "renotified", 2: "notified all", 3: "overdue"}


@dataclass(frozen=True)
class Policy:
    root: str
    tiers: dict[str, tuple[int, int, int]]  # priority -> seconds to re-notify, notify all, overdue
    press_priority: dict[str, str]  # press_type -> priority
    is_online: Callable[[str], bool]

    def due_tier(self, call: Call, now: float) -> int:
        """The escalation tier a call should have reached by now (0-3), from its stored created_at."""
        return sum(1 for seconds in self.tiers[call.priority] if now >= call.created_at + seconds)


class Tx:
    def __init__(self, conn: sqlite3.Connection, policy: Policy, now: float) -> None:
        self.conn = conn
        self.policy = policy
        self.now = now
        self.out: list[tuple[str, Any]] = []

    # ---- reading

    def call(self, call_id: int) -> Call:
        row = self.conn.execute(f"SELECT {CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)).fetchone()
        if row is None:
            raise NotFound(f"call {call_id} does not exist")
        return call_row(row)

    def _notified(self, call_id: int) -> list[str]:
        """Watches told about this call so far, in the order they were first told."""
        rows = self.conn.execute(
            "SELECT device_id FROM call_notifies WHERE call_id = ? AND role = 'watch' GROUP BY device_id "
            "ORDER BY min(created_at), device_id",
            (call_id,),
        ).fetchall()
        return [r[0] for r in rows]

    def _watches(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT device_id FROM devices WHERE type = 'watch' AND disabled = 0 ORDER BY device_id"
        ).fetchall()
        return [r[0] for r in rows]

    def _on_duty(self, call: Call) -> list[str]:
        """Watches for a call's room: on duty there and online; else every online watch; else every watch."""
        watches = self._watches()
        online = [w for w in watches if self.policy.is_online(w)]
        zone = self.conn.execute("SELECT zone FROM rooms WHERE site = ? AND room = ?", (call.site, call.room))
        row = zone.fetchone()
        labels = {"*", call.room, call.site} | ({row[0]} if row and row[0] else set())
        duty = self.conn.execute("SELECT watch_id, zones FROM duty").fetchall()
        assigned = {watch for watch, zones in duty if labels & set(json.loads(zones))}
        on_duty = [w for w in online if w in assigned]
        return on_duty or online or watches

    # ---- writing

    def _timeline(self, call_id: int, kind: str, actor: str | None, detail: dict[str, Any] | None = None) -> None:
        self.conn.execute(
            "INSERT INTO call_timeline(call_id, ts, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
            (call_id, self.now, kind, actor, json.dumps(detail or {}, sort_keys=True)),
        )

    def _changed(self, call_id: int, change: str, actor: str, detail: dict[str, Any] | None = None) -> Call:
        """After a transition: its timeline and audit rows, the call for HQ, and a live-bus event."""
        self._timeline(call_id, change, actor, detail)
        audit(self.conn, actor, f"call.{change}", f"call:{call_id}", detail or {})
        call = self.call(call_id)
        body = call.as_dict()
        outbox(self.conn, LANE_PRIORITY, "call", body, call.device_id)
        self.out.append(("call", {**body, "change": change}))
        return call

    def _notify(self, call: Call, device_id: str, role: str, state: str, pressed_at: float | None = None) -> None:
        row = self.conn.execute("SELECT site, room, type FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return  # deleted meanwhile: nobody to tell
        command_id = uuid.uuid4().hex
        args = {
            "call_id": call.id,
            "state": state,
            "site": call.site,
            "room": call.room,
            "priority": call.priority,
            "created_at": call.created_at,
            "device_id": call.device_id,
            "presses": call.presses,
        }
        self.conn.execute(
            "INSERT INTO commands(command_id, device_id, name, args, status, created_at, created_by) "
            "VALUES (?, ?, 'notify', ?, 'pending', ?, 'system')",
            (command_id, device_id, json.dumps(args), self.now),
        )
        self.conn.execute(
            "INSERT INTO call_notifies(command_id, call_id, device_id, role, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (command_id, call.id, device_id, role, state, self.now),
        )
        topic = command_topic(self.policy.root, row[0], row[1], row[2], device_id, "notify")
        payload = json.dumps({"command_id": command_id, **args}).encode()
        self.out.append((SEND, Send(command_id, topic, payload, pressed_at)))

    def _notify_watches(
        self, call: Call, watches: list[str], pressed_at: float | None = None, state: str | None = None
    ) -> None:
        """`state` for everyone (escalation), else "new" for a watch not told yet and "escalated" for one told."""
        told = set(self._notified(call.id))
        for watch in watches:
            self._notify(call, watch, "watch", state or ("escalated" if watch in told else "new"), pressed_at)
        self._timeline(
            call.id, "notified", "system", {"watches": watches} if watches else {"note": "no watch registered"}
        )

    def _tell_all_notified(self, call: Call, state: str, except_: str | None = None) -> None:
        for watch in self._notified(call.id):
            if watch != except_:
                self._notify(call, watch, "watch", state)
        self._notify(call, call.device_id, "button", state)

    def guarded(self, what: str, fn: Callable[[], None]) -> bool:
        """Run a transition in a savepoint: if it fails, the record that caused it (the press, the ack) is
        still committed; the failure is logged and counted, and the call is left as it was."""
        self.conn.execute("SAVEPOINT call_transition")
        mark = len(self.out)
        try:
            fn()
        except Exception:
            self.conn.execute("ROLLBACK TO call_transition")
            del self.out[mark:]
            log.exception("call transition failed: %s", what)
            return False
        finally:
            self.conn.execute("RELEASE call_transition")
        return True

    # ---- transitions

    def priority_for(self, device_id: str, asked: Any, press_type: str) -> str:
        """The highest of: the payload's priority, the press type's (config), the device's call_priority."""
        candidates = ["normal", self.policy.press_priority.get(press_type, "normal")]
        if asked in PRIORITIES:
            candidates.append(asked)
        row = self.conn.execute("SELECT call_priority FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row and row[0] in PRIORITIES:
            candidates.append(row[0])
        return max(candidates, key=rank)

    def press(self, device_id: str, site: str, room: str, priority: str, press_type: str, event_id: int) -> None:
        """A stored press: attach it to the room's active call (upgrading it), or open a new call."""
        actor = f"device:{device_id}"
        row = self.conn.execute(
            f"SELECT {CALL_COLUMNS} FROM calls WHERE site = ? AND room = ? AND state IN ('open', 'accepted') "
            "ORDER BY id DESC LIMIT 1",
            (site, room),
        ).fetchone()
        if row is not None:
            call = call_row(row)
            self.conn.execute(
                "UPDATE calls SET presses = presses + 1, last_press_at = ? WHERE id = ?", (self.now, call.id)
            )
            self._timeline(call.id, "press", actor, {"event_id": event_id, "priority": priority})
            if rank(priority) <= rank(call.priority):
                call = self.call(call.id)
                self.out.append(("call", {**call.as_dict(), "change": "press"}))
                return
            self.conn.execute("UPDATE calls SET priority = ? WHERE id = ?", (priority, call.id))
            call = self._changed(call.id, "upgraded", actor, {"from": call.priority, "to": priority})
            if call.state == "open" and (priority == "emergency" or not call.dnd):
                self._notify_watches(call, self._watches() if priority == "emergency" else self._on_duty(call))
            return
        place = self.conn.execute("SELECT dnd, zone FROM rooms WHERE site = ? AND room = ?", (site, room)).fetchone()
        dnd, zone = (bool(place[0]), place[1]) if place else (False, None)
        cur = self.conn.execute(
            "INSERT INTO calls(device_id, site, room, zone, priority, press_type, state, created_at, last_press_at, "
            "dnd) VALUES (?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
            (device_id, site, room, zone, priority, press_type, self.now, self.now, int(dnd)),
        )
        call_id = cur.lastrowid
        assert call_id is not None
        call = self._changed(call_id, "created", actor, {"event_id": event_id, "priority": priority, "dnd": dnd})
        self._notify(call, device_id, "button", "received")
        if priority == "emergency":
            self._notify_watches(call, self._watches(), self.now)
        elif not dnd:
            self._notify_watches(call, self._on_duty(call), self.now)

    def accept(self, call_id: int, actor: str, watch: str | None = None) -> Call:
        call = self.call(call_id)
        if call.state != "open":
            raise Conflict(f"call {call_id} is {call.state}" + (f" by {call.accepted_by}" if call.accepted_by else ""))
        self.conn.execute(
            "UPDATE calls SET state = 'accepted', accepted_at = ?, accepted_by = ? WHERE id = ?",
            (self.now, actor, call_id),
        )
        call = self._changed(call_id, "accepted", actor)
        for other in self._notified(call_id):
            self._notify(call, other, "watch", "accepted" if other == watch else "taken")
        self._notify(call, call.device_id, "button", "accepted")
        return call

    def complete(self, call_id: int, actor: str) -> Call:
        call = self.call(call_id)
        if not call.active:
            raise Conflict(f"call {call_id} is already {call.state}")
        self.conn.execute(
            "UPDATE calls SET state = 'completed', completed_at = ?, completed_by = ? WHERE id = ?",
            (self.now, actor, call_id),
        )
        call = self._changed(call_id, "completed", actor)
        self._tell_all_notified(call, "completed")
        return call

    def cancel(self, call_id: int, actor: str, admin: bool, reason: str | None) -> Call:
        call = self.call(call_id)
        if call.priority == "emergency" and not admin:
            raise Forbidden(f"call {call_id} is an emergency: only an admin may cancel it")
        if not call.active:
            raise Conflict(f"call {call_id} is already {call.state}")
        self.conn.execute(
            "UPDATE calls SET state = 'cancelled', cancelled_at = ?, cancelled_by = ?, cancel_reason = ? WHERE id = ?",
            (self.now, actor, reason, call_id),
        )
        call = self._changed(call_id, "cancelled", actor, {"reason": reason} if reason else None)
        self._tell_all_notified(call, "cancelled")
        return call

    def escalate(self, call_id: int, tier: int) -> None:
        """Raise an open call to `tier` (skipped tiers included: notify-all happens even when jumping to 3)."""
        call = self.call(call_id)
        if call.state != "open" or call.escalation >= tier:
            return  # accepted, closed or already there meanwhile
        self.conn.execute("UPDATE calls SET escalation = ?, escalated_at = ? WHERE id = ?", (tier, self.now, call_id))
        before = call.escalation
        call = self._changed(call_id, "escalated", "system", {"tier": tier, "action": _TIER_ACTIONS[tier]})
        if tier >= 2 > before:
            self._notify_watches(call, self._watches(), state="escalated")
        elif tier == 1:
            self._notify_watches(call, self._notified(call_id) or self._on_duty(call), state="escalated")

    def answer(self, command_id: str, device_id: str, status: str) -> None:
        """A device's ack of a call notify: a delivery receipt, or a watch accepting, declining or finishing."""
        row = self.conn.execute(
            "SELECT call_id, role FROM call_notifies WHERE command_id = ? AND device_id = ?", (command_id, device_id)
        ).fetchone()
        if row is None:
            return  # an ordinary command's ack
        call_id, role = row
        if status == "received":
            self.conn.execute(
                "UPDATE call_notifies SET status = coalesce(status, 'received'), received_at = ? WHERE command_id = ?",
                (self.now, command_id),
            )
        else:
            self.conn.execute(
                "UPDATE call_notifies SET status = ?, answered_at = ? WHERE command_id = ?",
                (status, self.now, command_id),
            )
        if role != "watch":
            return
        actor = f"device:{device_id}"
        call = self.call(call_id)
        if status == "received":
            self._timeline(call_id, "received", actor, {"command_id": command_id})
        elif status == "accepted":
            if call.state == "open":
                self.accept(call_id, actor, watch=device_id)
            elif call.accepted_by != actor:
                self._notify(call, device_id, "watch", "taken" if call.state == "accepted" else call.state)
        elif status == "declined":
            self._changed(call_id, "declined", actor, {"command_id": command_id})
            if call.state == "open" and call.escalation < 2 and self._all_declined(call_id):
                self.escalate(call_id, 2)
        elif status == "done":
            # only the watch that has the call finishes it; an open call is taken and finished in one go
            if call.state == "open":
                self.accept(call_id, actor, watch=device_id)
                self.complete(call_id, actor)
            elif call.state == "accepted" and call.accepted_by == actor:
                self.complete(call_id, actor)
            elif call.accepted_by != actor:
                self._notify(call, device_id, "watch", "taken" if call.state == "accepted" else call.state)

    def _all_declined(self, call_id: int) -> bool:
        """Every watch told about the call has declined its latest notify."""
        rows = self.conn.execute(
            "SELECT n.device_id, n.status FROM call_notifies n WHERE n.call_id = ? AND n.role = 'watch' "
            "AND n.created_at = (SELECT max(created_at) FROM call_notifies m WHERE m.call_id = n.call_id "
            "AND m.device_id = n.device_id AND m.role = 'watch')",
            (call_id,),
        ).fetchall()
        return bool(rows) and all(status == "declined" for _, status in rows)
