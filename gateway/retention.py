"""Retention: keep the database inside its disk budget. Traffic is capped by rows; past the byte budget the
oldest measurements go first, then the oldest traffic. Events, calls and audit rows are never deleted here."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass

from gateway.config import StoreSection
from gateway.metrics import Metrics
from gateway.store.writer import Writer

__all__ = ["Retention", "used_bytes"]

log = logging.getLogger(__name__)
_CHUNK = 5000


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in use (free pages are reused, so they do not count against the budget)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


@dataclass
class Trimmed:
    traffic: int = 0
    measurements: int = 0


class Retention:
    def __init__(self, cfg: StoreSection, writer: Writer, metrics: Metrics) -> None:
        self._cfg = cfg
        self._writer = writer
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

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
        trimmed.traffic += await self._writer.run(self._cap_traffic)
        budget = self._cfg.max_db_mb * 1024 * 1024
        for table in ("measurements", "traffic"):
            while True:
                deleted = await self._writer.run(lambda c, t=table: _trim_oldest(c, t, budget))  # type: ignore[misc]
                if not deleted:
                    break
                setattr(trimmed, table, getattr(trimmed, table) + deleted)
        if trimmed.measurements:
            self._metrics.drops.labels("retention_measurements").inc(trimmed.measurements)
            log.warning(
                "retention: deleted %d oldest measurements to stay within %d MB",
                trimmed.measurements,
                self._cfg.max_db_mb,
            )
        return trimmed

    def _cap_traffic(self, conn: sqlite3.Connection) -> int:
        top = conn.execute("SELECT max(id) FROM traffic").fetchone()[0]
        if top is None:
            return 0
        return conn.execute("DELETE FROM traffic WHERE id <= ?", (top - self._cfg.traffic_rows,)).rowcount

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _trim_oldest(conn: sqlite3.Connection, table: str, budget: int) -> int:
    if used_bytes(conn) <= budget:
        return 0
    return conn.execute(
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)", (_CHUNK,)
    ).rowcount
