"""HQ's store: one thread owns the write connection (batches from every gateway, one transaction each), another
serves reads, so the event loop never waits on SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.hq import db
from gateway.uplink.batch import BatchError, decode

__all__ = ["HqStore", "WrongGateway"]

T = TypeVar("T")


class WrongGateway(Exception):
    """A batch names another gateway than the token that sent it."""


class HqStore:
    def __init__(self, data_dir: Path, max_records: int) -> None:
        self.path = data_dir / "hq.db"
        self._max_records = max_records
        self._write = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bosun-hq-writer")
        self._read = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bosun-hq-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._tokens: dict[str, str] = {}
        self._readers: set[str] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = await loop.run_in_executor(self._write, db.connect_hq, self.path)
        self._rconn = await loop.run_in_executor(self._read, lambda: db.connect_hq(self.path, readonly=True))

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for conn, pool in ((self._wconn, self._write), (self._rconn, self._read)):
            if conn is not None:
                await loop.run_in_executor(pool, conn.close)
            pool.shutdown(wait=True)
        self._wconn = self._rconn = None

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        assert conn is not None
        return await asyncio.get_running_loop().run_in_executor(self._read, fn, conn)

    async def gateway_for_token(self, token: str) -> str | None:
        # tokens are cached: one lookup per gateway, not per batch (`bosun hq gateway add` works while HQ runs)
        found = self._tokens.get(token)
        if found is None:
            found = await self.read(lambda c: db.gateway_for_token(c, token))
            if found is not None:
                self._tokens[token] = found
        return found

    async def is_reader(self, token: str) -> bool:
        if token in self._readers:
            return True
        found = await self.read(lambda c: db.is_reader(c, token))
        if found:
            self._readers.add(token)
        return found

    async def ingest(self, gateway_id: str, key: str, payload: bytes) -> dict[str, Any]:
        """Decode and store one batch on the writer thread; BatchError, WrongGateway or EpochChanged when it is
        refused."""
        return await asyncio.get_running_loop().run_in_executor(self._write, self._ingest, gateway_id, key, payload)

    def _ingest(self, gateway_id: str, key: str, payload: bytes) -> dict[str, Any]:
        conn = self._wconn
        assert conn is not None
        try:
            batch = decode(payload, self._max_records)
            if batch.gateway_id != gateway_id:
                raise WrongGateway(f"the batch is from gateway {batch.gateway_id!r}, the token is {gateway_id!r}'s")
            if not key.startswith(f"{gateway_id}:{batch.lane}:"):
                raise BatchError(f"Idempotency-Key {key!r} does not name this gateway and lane")
        except (BatchError, WrongGateway) as exc:
            self._note(gateway_id, str(exc))
            raise
        conn.execute("BEGIN IMMEDIATE")
        try:
            answer = db.ingest(conn, key, batch, len(payload))
        except db.EpochChanged as exc:
            conn.execute("ROLLBACK")
            self._note(gateway_id, str(exc))
            raise
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return answer

    def _note(self, gateway_id: str, error: str) -> None:
        conn = self._wconn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        db.note_error(conn, gateway_id, error)
        conn.execute("COMMIT")
