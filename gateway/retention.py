"""Retention: keep the database inside its disk budget and the uplink's lanes inside theirs.

Traffic is capped by rows. Past the byte budget (`store.max_db_mb`), in this order: measurements HQ already
has (oldest first), the oldest traffic, and only then measurements HQ does not have yet, oldest first; those
are counted and the loss is reported to HQ (`records.loss`, in the transaction that deletes them). Device
state waiting for HQ is kept within `uplink.state_budget_mb`, and with `uplink.max_age_h` stale state and
telemetry are not sent at all (counted the same way). Events, calls, audit and the priority lane are never
deleted here. Rows of a batch being sent right now are left alone (`in_flight`): HQ may be storing them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import StoreSection, UplinkSection
from gateway.metrics import Metrics
from gateway.store import mindex
from gateway.store.indexer import Indexer
from gateway.store.records import LANE_STATE, LANE_TELEMETRY, loss
from gateway.store.schema import used_pages_bytes
from gateway.store.writer import Writer

__all__ = ["Retention", "used_bytes"]

log = logging.getLogger(__name__)
_CHUNK = 5000
_Spans = tuple[list[tuple[str, float, float]], int, int]  # per device (id, oldest ts, newest ts); first id, last id


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in use (free pages are reused, so they do not count against the budget), the measurements' index
    file included when the connection has it attached (a reader's: gateway/store/mindex.py)."""
    used = used_pages_bytes(conn)
    if mindex.is_attached(conn):
        used += used_pages_bytes(conn, mindex.ALIAS)
    return used


@dataclass
class Trimmed:
    traffic: int = 0
    measurements: int = 0  # every measurement deleted to stay within the budget
    unsent: int = 0  # of those, the ones HQ did not have (reported as lost)
    state: int = 0  # state-lane records dropped (budget or age), reported as lost
    stale: int = 0  # telemetry records skipped for age, reported as lost


class Retention:
    def __init__(
        self,
        cfg: StoreSection,
        writer: Writer,
        metrics: Metrics,
        uplink: UplinkSection | None = None,
        in_flight: Callable[[str], int] = lambda lane: 0,
        index: Indexer | None = None,
    ) -> None:
        self._index = index
        self._cfg = cfg
        self._uplink = uplink or UplinkSection()
        self._writer = writer
        self._metrics = metrics
        self._in_flight = in_flight
        self._task: asyncio.Task[None] | None = None
        self.freed_bytes = 0  # total bytes freed by passes, for the uplink's runway estimate

    def attach(self, in_flight: Callable[[str], int]) -> None:
        """The uplink tells which rows it is sending (they are created after retention, so wired late)."""
        self._in_flight = in_flight

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="bosun-retention")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.retention_check_s)
            try:
                await self.run_once()
            except Exception:
                log.exception("retention pass failed")

    async def run_once(self) -> Trimmed:
        trimmed = Trimmed()
        before = await self._writer.run(self._used)
        trimmed.traffic += await self._writer.run(self._cap_traffic)
        trimmed.state += await self._writer.run(self._state_lane)
        if self._uplink.max_age_h:
            trimmed.stale += await self._writer.run(self._stale_telemetry)
        budget = self._cfg.max_db_mb * 1024 * 1024
        while True:
            step = await self._writer.run(lambda c: self._trim_step(c, budget))
            if step is None:
                break
            table, deleted, unsent, spans = step
            if table == "traffic":
                trimmed.traffic += deleted
            else:
                trimmed.measurements += deleted
                trimmed.unsent += unsent
                if self._index is not None and spans is not None:
                    await self._index.purge(*spans)  # before the next step measures the budget
        self.freed_bytes += max(0, before - await self._writer.run(self._used))
        if trimmed.measurements:
            self._metrics.drops.labels("retention_measurements").inc(trimmed.measurements)
        if trimmed.unsent or trimmed.state or trimmed.stale:
            log.warning(
                "retention: %d measurements, %d state records and %d stale measurements will never reach HQ "
                "(disk budget %d MB, state budget %d MB, max age %d h); HQ is told",
                trimmed.unsent,
                trimmed.state,
                trimmed.stale,
                self._cfg.max_db_mb,
                self._uplink.state_budget_mb,
                self._uplink.max_age_h,
            )
        elif trimmed.measurements:
            log.info("retention: deleted %d measurements HQ already has", trimmed.measurements)
        return trimmed

    def _cap_traffic(self, conn: sqlite3.Connection) -> int:
        top = conn.execute("SELECT max(id) FROM traffic").fetchone()[0]
        if top is None:
            return 0
        return conn.execute("DELETE FROM traffic WHERE id <= ?", (top - self._cfg.traffic_rows,)).rowcount

    def _used(self, conn: sqlite3.Connection) -> int:
        """The writer's connection has no index attached: the indexer measures its own file."""
        return used_bytes(conn) + (self._index.used_bytes if self._index is not None else 0)

    def _trim_step(self, conn: sqlite3.Connection, budget: int) -> tuple[str, int, int, _Spans | None] | None:
        """One chunk: (table, rows deleted, of which not yet at HQ, what the index must drop), or None when within
        the budget."""
        if self._used(conn) <= budget:
            return None
        acked = _acked(conn, LANE_TELEMETRY)
        first, last = conn.execute(
            # never the newest row: its id keeps the sequence going (an emptied table would hand out ids again,
            # which the uplink's cursor and the measurements index have passed)
            "SELECT min(id), max(id) FROM (SELECT id FROM measurements WHERE id <= ? "
            "AND id < (SELECT max(id) FROM measurements) ORDER BY id LIMIT ?)",
            (acked, _CHUNK),
        ).fetchone()
        if first is not None:
            deleted, spans = self._delete_measurements(conn, first, last)
            return "measurements", deleted, 0, spans
        deleted = conn.execute(
            "DELETE FROM traffic WHERE id IN (SELECT id FROM traffic ORDER BY id LIMIT ?)", (_CHUNK,)
        ).rowcount
        if deleted:
            return "traffic", deleted, 0, None
        # telemetry HQ does not have: oldest first, but never the rows the next batch may be reading (a batch is
        # at most batch_records after the cursor; a pack that began before this transaction would send rows
        # reported lost), nor the batch in flight, nor the newest row (its id keeps the sequence going: an
        # emptied table would hand out ids the cursor has passed)
        protect = self._uplink.batch_records if self._uplink.url else 0
        start = max(acked + protect, self._in_flight(LANE_TELEMETRY))
        rows = conn.execute(
            "SELECT id FROM measurements WHERE id > ? AND id < (SELECT max(id) FROM measurements) ORDER BY id LIMIT ?",
            (start, _CHUNK),
        ).fetchall()
        if not rows:
            return None
        first, last = rows[0][0], rows[-1][0]
        deleted, spans = self._delete_measurements(conn, first, last)
        loss(conn, LANE_TELEMETRY, first, last, deleted, "disk_budget")
        return "measurements", deleted, deleted, spans

    def _delete_measurements(self, conn: sqlite3.Connection, first: int, last: int) -> tuple[int, _Spans | None]:
        """Delete measurements `first`..`last`; the rows deleted and, with an index, each device's time span in
        them, read before they go: the index's key is (device, ts, id), so that is how it finds their entries."""
        spans: _Spans | None = None
        if self._index is not None:
            rows = conn.execute(
                "SELECT device_id, min(ts), max(ts) FROM measurements WHERE id BETWEEN ? AND ? GROUP BY device_id",
                (first, last),
            ).fetchall()
            spans = [tuple(span) for span in rows], first, last
        deleted = conn.execute("DELETE FROM measurements WHERE id BETWEEN ? AND ?", (first, last)).rowcount
        return deleted, spans

    def _state_lane(self, conn: sqlite3.Connection) -> int:
        """Unsent device state beyond its byte budget or age limit goes, oldest first (not while in flight)."""
        if self._in_flight(LANE_STATE):
            return 0
        acked = _acked(conn, LANE_STATE)
        budget = self._uplink.state_budget_mb * 1024 * 1024
        cutoff = time.time() - self._uplink.max_age_h * 3600 if self._uplink.max_age_h else None
        total = conn.execute(
            "SELECT coalesce(sum(length(body)), 0) FROM outbox WHERE lane = ? AND seq > ?", (LANE_STATE, acked)
        ).fetchone()[0]
        if total <= budget and cutoff is None:
            return 0
        doomed: list[int] = []
        for seq, size, created_at in conn.execute(
            "SELECT seq, length(body), created_at FROM outbox WHERE lane = ? AND seq > ? ORDER BY seq",
            (LANE_STATE, acked),
        ):
            if total <= budget and (cutoff is None or created_at >= cutoff):
                break
            doomed.append(seq)
            total -= size
        if not doomed:
            return 0
        conn.execute("DELETE FROM outbox WHERE lane = ? AND seq BETWEEN ? AND ?", (LANE_STATE, doomed[0], doomed[-1]))
        # the cursor moves past them, so the next batch's `first` shows HQ the gap this loss record explains
        conn.execute("UPDATE uplink_lanes SET acked = ? WHERE lane = ?", (doomed[-1], LANE_STATE))
        loss(conn, LANE_STATE, doomed[0], doomed[-1], len(doomed), "state_budget_or_age")
        return len(doomed)

    def _stale_telemetry(self, conn: sqlite3.Connection) -> int:
        """Telemetry older than uplink.max_age_h is not sent: the cursor skips it (the rows stay for the UI)."""
        if self._in_flight(LANE_TELEMETRY):
            return 0
        acked = _acked(conn, LANE_TELEMETRY)
        cutoff = time.time() - self._uplink.max_age_h * 3600
        skipped, first, last = 0, 0, acked
        while True:
            rows = conn.execute(
                "SELECT id, ts FROM measurements WHERE id > ? ORDER BY id LIMIT ?", (last, _CHUNK)
            ).fetchall()
            stale = 0
            for row_id, ts in rows:
                if ts >= cutoff:
                    break
                first = first or row_id
                last = row_id
                stale += 1
            skipped += stale
            if stale < len(rows) or not rows:
                break
        if skipped:
            conn.execute("UPDATE uplink_lanes SET acked = ? WHERE lane = ?", (last, LANE_TELEMETRY))
            loss(conn, LANE_TELEMETRY, first, last, skipped, "max_age")
        return skipped

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _acked(conn: sqlite3.Connection, lane: str) -> int:
    row = conn.execute("SELECT acked FROM uplink_lanes WHERE lane = ?", (lane,)).fetchone()
    return int(row[0]) if row else 0
