"""A read-only connection for the API and the caches, on its own thread so queries never block the loop.

Not aiosqlite: registry functions take a plain sqlite3 connection (so the CLI and the writer share them),
and aiosqlite offers no public way to run such a function on its thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.store import mindex
from gateway.store.schema import connect

__all__ = ["Reader"]

T = TypeVar("T")


class Reader:
    def __init__(self, path: Path, name: str = "bosun-reader") -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._indexed = False

    async def start(self) -> None:
        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> sqlite3.Connection:
        conn = connect(self._path, readonly=True)
        self._indexed = mindex.attach(conn, self._path)  # the measurements' per-device index (store.views reads it)
        return conn

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in one read snapshot on the reader thread."""
        conn = self._conn
        assert conn is not None, "reader not started"
        return await asyncio.get_running_loop().run_in_executor(self._executor, _in_snapshot, conn, fn, self._indexed)

    async def fetchall(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.call(lambda c: [tuple(r) for r in c.execute(sql, params).fetchall()])

    async def fetchone(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> tuple[Any, ...] | None:
        def one(c: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = c.execute(sql, params).fetchone()
            return tuple(row) if row is not None else None

        return await self.call(one)

    async def stop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


def _in_snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], indexed: bool = False) -> T:
    conn.execute("BEGIN")
    if indexed:
        # the index's snapshot first: one older than the database's only leaves more rows to the table's own
        # range (store.views), where a newer one could miss rows the database's snapshot still has
        conn.execute(f"SELECT 1 FROM {mindex.ALIAS}.state LIMIT 1").fetchall()
    try:
        return fn(conn)
    finally:
        conn.execute("COMMIT")
