"""Crew calls: the service the ingest routes, the API and the escalation timer share.

Transitions run in the writer (gateway.calls.flow); after their COMMIT, `dispatch` publishes the notifies
they recorded and puts their events on the live bus. Escalation is a sweep every `calls.check_ms` over the
open calls, comparing now with each call's stored created_at, so it resumes where it was after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.calls.flow import SEND, Policy, Tx
from gateway.calls.model import CALL_COLUMNS, Call, Send, call_row
from gateway.commands import MARK_SENT_SQL
from gateway.config import CallsSection, press_priorities
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.store.reader import Reader
from gateway.store.writer import Writer
from gateway.topics import command_topic

__all__ = ["Calls"]

log = logging.getLogger(__name__)
_RESEND_S = 3600.0  # after a restart, notifies recorded but never published in the last hour go out


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int) -> None: ...


class Calls:
    def __init__(
        self,
        cfg: CallsSection,
        root: str,
        writer: Writer,
        reader: Reader,
        hub: Hub,
        metrics: Metrics,
        is_online: Callable[[str], bool],
    ) -> None:
        tiers = {p: tuple(getattr(cfg, f"escalation_{p}")) for p in ("normal", "urgent", "emergency")}
        self.policy = Policy(root, tiers, press_priorities(cfg), is_online)
        self._check_s = cfg.check_ms / 1000
        self._writer = writer
        self._reader = reader
        self._hub = hub
        self._metrics = metrics
        self._publisher: Publisher | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def attach(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def start(self) -> None:
        unsent = await self._reader.fetchall(
            "SELECT n.command_id, c.args, c.device_id FROM call_notifies n JOIN commands c USING (command_id) "
            "WHERE n.sent_at IS NULL AND n.created_at > ? ORDER BY n.created_at",
            (time.time() - _RESEND_S,),
        )
        if unsent:
            log.info("publishing %d call notifies recorded before the last stop", len(unsent))
            self._send_later([await self._rebuild(row) for row in unsent])
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="calls-escalation")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    # ---- inside the ingest transaction (writer thread)

    def tx(self, conn: sqlite3.Connection, now: float) -> Tx:
        return Tx(conn, self.policy, now)

    # ---- after a COMMIT (event loop)

    def dispatch(self, outcome: list[tuple[str, Any]]) -> None:
        """Live-bus events and notifies of a committed transition."""
        sends = []
        for kind, data in outcome:
            if kind == SEND:
                sends.append(data)
            else:
                self._hub.publish(kind, data)
                if kind == "call" and data.get("change") == "created":
                    self._metrics.calls.labels(data["priority"]).inc()
        if sends:
            self._send_later(sends)

    def _send_later(self, sends: list[Send]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(sends))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, sends: list[Send]) -> None:
        assert self._publisher is not None
        for send in sends:
            await self._publisher.publish(send.topic, send.payload, 2)
            if send.pressed_at is not None:
                self._metrics.call_notify_latency.observe(time.time() - send.pressed_at)
        sent_at = time.time()
        ids = [(sent_at, s.command_id) for s in sends]

        def mark_sent(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE call_notifies SET sent_at = ? WHERE command_id = ?", ids)
            conn.executemany(MARK_SENT_SQL, ids)

        try:
            await self._writer.run(mark_sent)
        except Exception as exc:  # the notify went out; only its sent_at is missing
            log.error("could not record %d call notifies as sent: %s", len(ids), exc)

    async def _rebuild(self, row: tuple[Any, ...]) -> Send:
        command_id, args, device_id = row
        device = await self._reader.fetchone("SELECT site, room, type FROM devices WHERE device_id = ?", (device_id,))
        site, room, type_ = device or ("", "", "")
        payload = json.dumps({"command_id": command_id, **json.loads(args)}).encode()
        return Send(command_id, command_topic(self.policy.root, site, room, type_, device_id, "notify"), payload, None)

    # ---- the API's transitions

    async def run(self, fn: Callable[[Tx], Any]) -> Any:
        """Run a transition in the writer; dispatch its outcome after the COMMIT."""

        def op(conn: sqlite3.Connection) -> tuple[Any, list[tuple[str, Any]]]:
            tx = Tx(conn, self.policy, time.time())
            return fn(tx), tx.out

        result, outcome = await self._writer.run(op)
        self.dispatch(outcome)
        return result

    async def accept(self, call_id: int, actor: str) -> Call:
        call: Call = await self.run(lambda tx: tx.accept(call_id, actor))
        return call

    async def complete(self, call_id: int, actor: str) -> Call:
        call: Call = await self.run(lambda tx: tx.complete(call_id, actor))
        return call

    async def cancel(self, call_id: int, actor: str, admin: bool, reason: str | None) -> Call:
        call: Call = await self.run(lambda tx: tx.cancel(call_id, actor, admin, reason))
        return call

    # ---- escalation

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            try:
                await self.sweep(time.time())
            except Exception:  # a bad sweep must not end escalation for good
                log.exception("call escalation sweep failed")

    async def sweep(self, now: float) -> None:
        rows = await self._reader.fetchall(
            f"SELECT {CALL_COLUMNS} FROM calls WHERE state = 'open' AND escalation < 3 "
            "AND (dnd = 0 OR priority = 'emergency')"
        )
        due = []
        for row in rows:
            call = call_row(row)
            tier = self.policy.due_tier(call, now)
            if tier > call.escalation:
                due.append((call.id, tier))
        if due:

            def escalate(tx: Tx) -> None:
                for call_id, tier in due:
                    tx.escalate(call_id, tier)

            await self.run(escalate)
            self._metrics.call_escalations.inc(len(due))
