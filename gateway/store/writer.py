"""The single writer: one thread owns the SQLite write connection and commits work in groups.

Work is a function of the connection (`Op`). Callers `await writer.run(op)` (resolved after the COMMIT
that contains it) or `await writer.enqueue(op)` (waits only for queue space, returns the future). The broker
uses `submit(op)`, which never waits, and stops reading its sockets while `congested` (backpressure).
A group closes after `flush_ms` or `batch_rows` ops, whichever comes first. If one op fails, the group is
replayed op by op inside savepoints so only the bad op fails and the others still commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import StoreSection
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.store.schema import connect, migrate

__all__ = ["Op", "Writer"]

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
log = logging.getLogger(__name__)


class Writer:
    def __init__(self, path: Path, cfg: StoreSection, metrics: Metrics) -> None:
        self._path = path
        self._cfg = cfg
        self._metrics = metrics
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._room = asyncio.Event()
        self._room.set()
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bosun-writer")
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.rows = 0
        self.last_batch = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await loop.run_in_executor(self._executor, self._open)
        self._task = asyncio.create_task(self._loop(), name="bosun-writer")

    def _open(self) -> sqlite3.Connection:
        conn = connect(self._path, synchronous=self._cfg.synchronous)
        migrate(conn)
        return conn

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def congested(self) -> bool:
        return len(self._pending) >= self._cfg.queue_max

    async def wait_room(self) -> None:
        """Return once the queue is below its bound again."""
        while len(self._pending) >= self._cfg.queue_max:
            self._room.clear()
            await self._room.wait()

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue `op` now, whatever the depth; callers that can wait check `congested` and `wait_room`."""
        if self._closing:
            raise StoreError("the writer is stopping")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = self._pending
        pending.append((op, future))
        if len(pending) == 1:
            self._wakeup.set()
        elif len(pending) >= self._cfg.batch_rows:
            self._full.set()
        return future

    async def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """Queue `op`; wait while the queue is full (backpressure). The future resolves after COMMIT."""
        await self.wait_room()
        return self.submit(op)

    async def run(self, op: Op) -> Any:
        """Run `op` in the next group and return its result once committed."""
        return await (await self.enqueue(op))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        flush_s = self._cfg.flush_ms / 1000.0
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                if self._closing:
                    return
                continue
            if len(self._pending) < self._cfg.batch_rows and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), flush_s)
            batch = self._pending[: self._cfg.batch_rows]
            del self._pending[: len(batch)]
            self._full.clear()
            if len(self._pending) >= self._cfg.batch_rows:
                self._full.set()
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._apply, [op for op, _ in batch])
            except BaseException as exc:  # the thread died: fail the batch loudly, keep serving
                log.exception("writer batch failed")
                results = [(False, StoreError(f"write failed: {exc!r}"))] * len(batch)
            elapsed = time.perf_counter() - started
            self.commits += 1
            self.rows += len(batch)
            self.last_batch = len(batch)
            self._metrics.writer_batch.observe(len(batch))
            self._metrics.writer_commit.observe(elapsed)
            self._metrics.writer_queue.set(len(self._pending))
            if len(self._pending) < self._cfg.queue_max:
                self._room.set()
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _apply(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Runs on the writer thread: the whole group in one transaction."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [(True, op(conn)) for op in ops]
            conn.execute("COMMIT")
            return results
        except Exception:
            conn.execute("ROLLBACK")
        # replay one by one so a single bad op does not fail its neighbours
        out: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                out.append((True, op(conn)))
                conn.execute("RELEASE op")
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                out.append((False, _translate(exc)))
        conn.execute("COMMIT")
        return out

    async def stop(self) -> None:
        """Commit everything queued, then close the connection."""
        self._closing = True
        self._wakeup.set()
        self._full.set()
        if self._task is not None:
            await self._task
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            conn = self._conn
            await loop.run_in_executor(self._executor, _close, conn)
            self._conn = None
        self._executor.shutdown(wait=True)


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return StoreError(str(exc))
    return exc
