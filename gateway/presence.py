"""Presence: online/offline from `availability` (and the Last Will) and from missed heartbeats.

`last_seen` is kept in memory and flushed in batches, so a heartbeat costs no device-row write. Transitions
are decided inside the writer's transaction (the database is the truth) and each one is an event row plus an
outbox row; the loop-side sets are updated after commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from typing import Any

from gateway.config import PresenceSection
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.store.records import LANE_STATE, outbox
from gateway.store.writer import Writer

__all__ = ["Presence"]

_LAST_SEEN_SQL = "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?) WHERE device_id = ?"

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, cfg: PresenceSection, writer: Writer, hub: Hub, metrics: Metrics) -> None:
        self._cfg = cfg
        self._writer = writer
        self._hub = hub
        self._metrics = metrics
        self._last_seen: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._online: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        rows = await self._writer.run(
            lambda c: c.execute("SELECT device_id, online, last_seen FROM devices").fetchall()
        )
        now = time.time()
        for device_id, online, last_seen in rows:
            # after a restart, a device's clock starts now: it gets a full timeout to say hello again
            self._last_seen[device_id] = max(last_seen or 0.0, now) if online else (last_seen or 0.0)
            if online:
                self._online.add(device_id)
        self._metrics.devices_online.set(len(self._online))
        self._task = asyncio.create_task(self._sweep_loop(), name="bosun-presence")

    def is_online(self, device_id: str) -> bool:
        return device_id in self._online

    def seen(self, device_id: str, ts: float, transition: bool = True) -> None:
        """Any message from a device: it is alive (`availability` decides its own transition)."""
        self._last_seen[device_id] = ts
        self._dirty.add(device_id)
        if transition and device_id not in self._online:
            self._online.add(device_id)  # optimistic, so a burst queues one transition
            self._transition(device_id, True, ts, "message")

    def _transition(self, device_id: str, online: bool, now: float, reason: str) -> None:
        async def submit() -> None:
            try:
                future = await self._writer.enqueue(lambda c: self.set_in_tx(c, device_id, online, now, reason))
                for kind, data in await future:
                    self.apply(kind, data)
                    self._hub.publish(kind, data)
            except Exception:
                log.exception("presence change for %s failed", device_id)

        task = asyncio.get_running_loop().create_task(submit())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def set_in_tx(
        self, conn: sqlite3.Connection, device_id: str, online: bool, now: float, reason: str
    ) -> list[tuple[str, dict[str, Any]]]:
        """Runs on the writer thread: record a transition if it is one."""
        row = conn.execute("SELECT online, site, room, type FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None or bool(row[0]) == online:
            return []
        conn.execute(
            "UPDATE devices SET online = ?, online_changed_at = ?, last_seen = max(coalesce(last_seen, 0), ?) "
            "WHERE device_id = ?",
            (int(online), now, now if online else 0, device_id),
        )
        payload = {"online": online, "reason": reason}
        cur = conn.execute(
            "INSERT INTO events(device_id, type, ts, received_at, payload) VALUES (?, 'presence', ?, ?, ?)",
            (device_id, now, now, json.dumps(payload)),
        )
        event = {
            "id": cur.lastrowid,
            "device_id": device_id,
            "type": "presence",
            "ts": now,
            "received_at": now,
            "site": row[1],
            "room": row[2],
            **payload,
        }
        outbox(conn, LANE_STATE, "event", event, device_id)
        return [("device.presence", event)]

    def apply(self, kind: str, data: dict[str, Any]) -> None:
        """Loop side, after commit: keep the in-memory view equal to the database."""
        if kind != "device.presence":
            return
        if data["online"]:
            self._online.add(data["device_id"])
        else:
            self._online.discard(data["device_id"])
        self._metrics.devices_online.set(len(self._online))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.check_s)
            try:
                await self.sweep(time.time())
            except Exception:
                log.exception("presence sweep failed")

    async def sweep(self, now: float) -> None:
        """Flush last_seen and mark silent devices offline (missed heartbeats)."""
        await self._flush_last_seen()
        limit = now - self._cfg.timeout_s
        for device_id in [d for d in self._online if self._last_seen.get(d, 0.0) < limit]:
            self._online.discard(device_id)
            future = await self._writer.enqueue(
                lambda c, d=device_id: self.set_in_tx(c, d, False, now, "timeout")  # type: ignore[misc]
            )
            future.add_done_callback(self._published)
        self._metrics.devices_online.set(len(self._online))

    def _published(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        for kind, data in future.result():
            self.apply(kind, data)
            self._hub.publish(kind, data)

    def forget(self, device_id: str) -> None:
        self._online.discard(device_id)
        self._last_seen.pop(device_id, None)
        self._dirty.discard(device_id)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        await (await self._flush_last_seen())

    async def _flush_last_seen(self) -> asyncio.Future[Any]:
        """Queue the last_seen values gathered since the previous flush as bulk rows (one executemany in the
        writer's next bulk group, in the writer process when there is one): a thousand devices' UPDATE as an op
        would hold the writer thread, and the GIL, for a round trip per row. Monotonic, so a transition's
        newer last_seen is never overwritten by an older flush."""
        rows = [(self._last_seen[d], d) for d in self._dirty if d in self._last_seen]
        self._dirty.clear()
        future: asyncio.Future[Any] | None = None
        for row in rows:
            future = self._writer.append(_LAST_SEEN_SQL, row)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        return future
