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
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import StoreSection
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.store.bulk import BulkWriter, Hold, TelemetryHook
from gateway.store.schema import connect, migrate
from gateway.store.walsync import WalSync, connection_synchronous

__all__ = ["Op", "Writer"]

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
log = logging.getLogger(__name__)
# Checkpoints every 0.5 s: often enough that the WAL stays short (pages not yet copied into the database are looked
# up in the WAL, so a lagging checkpoint makes every commit slower) and that a WAL restart (below) has little left to
# copy; rarely enough that a page the load keeps changing (then one per device in the measurements index, which has
# since moved to store.mindex's file) is not copied at every commit. Measured at 10,000 msg/s FULL with WAL restarts,
# four alternating pairs of 20 s runs:
# PUBACK p99 105, 142, 83, 83 ms every 0.5 s against 162, 234, 118, 105 ms every 2 s (0.25 s had been worse than 2 s
# before the WAL restarted). A PASSIVE checkpoint never blocks a writer and holds no GIL.
_CHECKPOINT_S = 0.5
# Ops (presses, acks, status) go before the next bulk group: the child waits before its next group (`Hold`) while the
# writer thread asks for the write lock every half millisecond, so an op waits for at most the group being committed.
# Waiting for the child to go idle first (and SQLite's busy handler, which sleeps 1, 2, 5 ... 100 ms between tries
# and rarely hits the gap between two of the child's groups) made each op cost several group commits, which at
# 10,000 msg/s convoyed into half-second PUBACKs.
_LOCK_POLL_S = 0.0005
# The WAL is restarted from its start once it holds this much. A restart holds the writers while it copies and syncs
# what the last checkpoint left (see _checkpoints: 4-13 ms in a model, 11-57 ms before the checkpoint thread flushed
# the database itself); the file keeps its size, and is cut back only past
# schema.connect's journal_size_limit: truncating a file of hundreds of MB to 64 MB at every restart, then growing
# it again, cost 300-400 ms of PUBACK tail each time on this ext4 (20 s FULL runs: p99 374 ms with it, 74 ms
# without). At a site's usual load the WAL restarts by itself between bursts and this never triggers.
_WAL_RESTART_BYTES = 64 << 20
_RESTART_WAIT_S = 0.5
_LOCK_WAIT_S = 30.0  # schema.connect's busy timeout


class Writer:
    def __init__(self, path: Path, cfg: StoreSection, metrics: Metrics) -> None:
        self._path = path
        self._cfg = cfg
        self._metrics = metrics
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        # bulk rows: INSERT statement -> rows, all resolved by one future at the COMMIT of their group
        self._bulk: dict[str, list[tuple[Any, ...]]] = {}
        self._bulk_rows = 0
        self._bulk_future: asyncio.Future[Any] | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bosun-writer")
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._restart_wanted = False
        self._proc: BulkWriter | None = None
        self._hold: Hold | None = None
        self._stop_checkpoints = threading.Event()
        self._flusher: _Flusher | None = None
        self._wal_sync: WalSync | None = None
        self._checkpointer = threading.Thread(target=self._checkpoints, name="bosun-checkpoint", daemon=True)
        if cfg.writer_process:
            self._hold = Hold()  # up while the thread wants or holds the write lock: the child waits (store/bulk.py)
            self._proc = BulkWriter(path, cfg.synchronous, metrics, self._check_room, self._hold)
        self.commits = 0
        self.rows = 0
        self.last_batch = 0

    async def start(self) -> None:
        loop = self._loop_ref = asyncio.get_running_loop()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await loop.run_in_executor(self._executor, self._open)
        self._task = asyncio.create_task(self._loop(), name="bosun-writer")
        self._checkpointer.start()
        if self._proc is not None:
            await self._proc.start()  # after _open: the schema is migrated before the child opens the file

    def _open(self) -> sqlite3.Connection:
        sync = connection_synchronous(self._cfg.synchronous)
        conn = connect(self._path, synchronous=sync, autocheckpoint=False)
        if sync != self._cfg.synchronous:
            self._wal_sync = WalSync(self._path)  # FULL: each commit is synced after the lock is released
        migrate(conn)
        self._sync_wal()
        return conn

    def _sync_wal(self) -> None:
        if self._wal_sync is not None:
            self._wal_sync()

    def _checkpoints(self) -> None:
        """A thread of its own copies the WAL into the database (PASSIVE: it never blocks a writer, and the
        sqlite3 call holds no GIL), so no commit pays for a checkpoint. When the WAL holds more than
        `_WAL_RESTART_BYTES`, the writer is asked to restart it (`_restart`).

        It also flushes the database file after each checkpoint. SQLite syncs the database only after a checkpoint
        that copied the whole WAL, which never happens under steady load, so the pages of every earlier checkpoint
        stayed dirty in the page cache and the WAL restart's sync wrote them all while the writers were held.
        Measured on a model of the bulk child (group commits at 10,000 msg/s, synchronous=FULL): a restart took
        11-57 ms, growing with the database (the pages are scattered over it), nearly all of it that fdatasync
        (strace: 16-35 ms). Flushed here, out of the writers' way, the restart's sync has only the last moments'
        pages left: 4-13 ms."""
        conn = connect(self._path, synchronous=self._cfg.synchronous)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        flush = self._flusher = _Flusher(self._path) if self._cfg.synchronous.upper() != "OFF" else None

        def checkpoint() -> int:
            _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if flush is not None:
                flush()
            return int(frames)

        try:
            while not self._stop_checkpoints.wait(_CHECKPOINT_S):
                try:
                    if checkpoint() * page_size > _WAL_RESTART_BYTES and not self._closing:
                        checkpoint()  # once more: what was written during that flush is on disk too before the wait
                        loop = self._loop_ref
                        if loop is not None:
                            loop.call_soon_threadsafe(self._want_restart)
                except (sqlite3.Error, OSError) as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    @property
    def depth(self) -> int:
        # `congested` asks for this after every read from every client: the child's rows read as attributes, not
        # through BulkWriter.depth (property calls were 3 % of the event loop's time in an in-process harness)
        proc = self._proc
        queued = len(self._pending) + self._bulk_rows
        if proc is not None:
            queued += proc.waiting_rows + proc.sent_rows
        return queued

    @property
    def congested(self) -> bool:
        return self.depth >= self._cfg.queue_max

    def _check_room(self) -> None:
        if not self.congested:
            self._room.set()

    async def wait_room(self) -> None:
        """Return once the queue is below its bound again."""
        while self.congested:
            self._room.clear()
            await self._room.wait()

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue `op` now, whatever the depth; callers that can wait check `congested` and `wait_room`."""
        if self._closing:
            raise StoreError("the writer is stopping")
        assert self._loop_ref is not None
        future: asyncio.Future[Any] = self._loop_ref.create_future()
        self._pending.append((op, future))
        self._wakeup.set()
        return future

    def append(self, sql: str, row: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one row for a bulk INSERT (executemany) in the next group; cheaper than an op per row.

        With `store.writer_process` the group is committed by the child process, independently of ops.
        """
        return self.append_many(sql, (row,))

    def append_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> asyncio.Future[Any]:
        """`append` for several rows that commit together (one message's measurements)."""
        if self._closing:
            raise StoreError("the writer is stopping")
        if self._proc is not None:
            return self._proc.append_many(sql, rows)
        table = self._bulk.get(sql)
        if table is None:
            table = self._bulk[sql] = []
        table.extend(rows)
        self._bulk_rows += len(rows)
        future = self._bulk_future
        if future is None:
            assert self._loop_ref is not None
            future = self._bulk_future = self._loop_ref.create_future()
            self._wakeup.set()
        return future

    @property
    def decodes_telemetry(self) -> bool:
        """Whether `append_telemetry` may be used: the bulk child decodes telemetry (gateway/telemetry.py)."""
        return self._proc is not None

    def append_telemetry(self, item: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one undecoded telemetry message for the bulk child (see `decodes_telemetry`)."""
        if self._closing:
            raise StoreError("the writer is stopping")
        assert self._proc is not None
        return self._proc.append_telemetry(item)

    def on_telemetry(self, hook: TelemetryHook) -> None:
        """Call `hook` with what the bulk child found in each committed group's telemetry."""
        if self._proc is not None:
            self._proc.on_telemetry = hook

    async def enqueue(self, op: Op) -> asyncio.Future[Any]:
        """Queue `op`; wait while the queue is full (backpressure). The future resolves after COMMIT."""
        await self.wait_room()
        return self.submit(op)

    async def run(self, op: Op) -> Any:
        """Run `op` in the next group and return its result once committed."""
        return await (await self.enqueue(op))

    async def _loop(self) -> None:
        """Group commit: take everything waiting (up to batch_rows ops), commit it, repeat.

        No fixed delay: while one group commits the next one fills, so groups grow with the load and a
        lone message is committed at once. `flush_ms` > 0 adds a linger for setups that prefer fewer commits.
        """
        loop = asyncio.get_running_loop()
        linger = self._cfg.flush_ms / 1000.0
        while True:
            await self._wakeup.wait()
            if self._restart_wanted:
                await self._restart_wal()
            if not self._pending and not self._bulk_rows:
                self._wakeup.clear()
                if self._closing:
                    return
                continue
            if linger and not self._closing and len(self._pending) + self._bulk_rows < self._cfg.batch_rows:
                await asyncio.sleep(linger)
            batch = self._pending[: self._cfg.batch_rows]
            del self._pending[: len(batch)]
            bulk, bulk_future, bulk_rows = self._bulk, self._bulk_future, self._bulk_rows
            self._bulk, self._bulk_future, self._bulk_rows = {}, None, 0
            started = time.perf_counter()
            ops = [op for op, _ in batch]
            try:
                results, bulk_error = await loop.run_in_executor(self._executor, self._apply, ops, bulk)
            except BaseException as exc:  # the thread died: fail the group loudly, keep serving
                log.exception("writer batch failed")
                results = [(False, StoreError(f"write failed: {exc!r}"))] * len(batch)
                bulk_error = StoreError(f"write failed: {exc!r}")
            elapsed = time.perf_counter() - started
            self.commits += 1
            self.rows += len(batch) + bulk_rows
            self.last_batch = len(batch) + bulk_rows
            self._metrics.writer_batch.observe(self.last_batch)
            self._metrics.writer_commit.observe(elapsed)
            self._metrics.writer_queue.set(self.depth)
            self._check_room()
            if bulk_future is not None and not bulk_future.done():
                if bulk_error is None:
                    bulk_future.set_result(None)
                else:
                    log.error("%d bulk rows were not stored: %s", bulk_rows, bulk_error)
                    self._metrics.drops.labels("store_error").inc(bulk_rows)
                    bulk_future.set_exception(bulk_error)
                    bulk_future.exception()  # logged here; waiters still see it
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _want_restart(self) -> None:
        self._restart_wanted = True
        self._wakeup.set()

    async def _restart_wal(self) -> None:
        """Between groups, with the bulk child held: a RESTART checkpoint, so the next commit writes the WAL from
        its start again. Under steady load the WAL is never idle, and PASSIVE checkpoints alone never let it
        restart: it grew by ~60 MB/s at 10,000 msg/s (1.1 GB in 25 s), and every page lookup in it got slower,
        the PUBACK tail with it."""
        self._restart_wanted = False
        try:
            done = await asyncio.get_running_loop().run_in_executor(self._executor, self._restart)
        except sqlite3.Error as exc:
            log.warning("WAL restart failed: %s", exc)
            done = False
        if done:
            self._metrics.wal_restarts.inc()

    def _restart(self) -> bool:
        """Runs on the writer thread: tries RESTART every `_LOCK_POLL_S` for up to `_RESTART_WAIT_S` (groups in
        flight finish, readers move to the newest snapshot); False if it never got through (tried again later)."""
        conn = self._conn
        assert conn is not None
        with self._child_held():
            restarted = _poll(
                conn, lambda: not conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0], _RESTART_WAIT_S
            )
        return restarted is not None

    @contextlib.contextmanager
    def _child_held(self) -> Iterator[None]:
        """The bulk child waits before its next group while this runs (on the writer thread)."""
        hold = self._hold
        if hold is None:
            yield
            return
        hold.set()
        try:
            yield
        finally:
            hold.clear()

    def _apply(
        self, ops: list[Op], bulk: dict[str, list[tuple[Any, ...]]]
    ) -> tuple[list[tuple[bool, Any]], Exception | None]:
        """Runs on the writer thread: the whole group in one transaction."""
        with self._child_held():
            results, bulk_error = self._commit(ops, bulk)
        try:
            self._sync_wal()  # after the child may write again: the sync no longer holds the lock (store.walsync)
        except OSError as exc:
            log.error("the WAL could not be synced after a commit: %s", exc)
            error = StoreError(f"the WAL could not be synced: {exc}")
            return [(False, error)] * len(ops), (error if bulk else None)
        return results, bulk_error

    def _commit(
        self, ops: list[Op], bulk: dict[str, list[tuple[Any, ...]]]
    ) -> tuple[list[tuple[bool, Any]], Exception | None]:
        conn = self._conn
        assert conn is not None
        if self._proc is None:
            conn.execute("BEGIN IMMEDIATE")
        else:
            self._metrics.writer_lock_wait.observe(_begin(conn))
        try:
            for sql, rows in bulk.items():
                conn.executemany(sql, rows)
            results = [(True, op(conn)) for op in ops]
            conn.execute("COMMIT")
            return results, None
        except Exception:
            conn.execute("ROLLBACK")
        # replay piece by piece so a single bad op does not fail its neighbours
        out: list[tuple[bool, Any]] = []
        bulk_error: Exception | None = None
        conn.execute("BEGIN IMMEDIATE")
        if bulk:
            conn.execute("SAVEPOINT bulk")
            try:
                for sql, rows in bulk.items():
                    conn.executemany(sql, rows)
                conn.execute("RELEASE bulk")
            except Exception as exc:
                conn.execute("ROLLBACK TO bulk")
                conn.execute("RELEASE bulk")
                bulk_error = _translate(exc)
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
        return out, bulk_error

    async def stop(self) -> None:
        """Commit everything queued, then close the connection."""
        if self._proc is not None:
            await self._proc.stop()
        self._stop_checkpoints.set()
        if self._checkpointer.is_alive():
            await asyncio.to_thread(self._checkpointer.join)
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            conn = self._conn
            await loop.run_in_executor(self._executor, _close, conn)
            self._conn = None
        if self._flusher is not None:
            self._flusher.close()
        if self._wal_sync is not None:
            self._wal_sync.close()
        if self._hold is not None:
            self._hold.close()
        self._executor.shutdown(wait=True)


class _Flusher:
    """fdatasync of the database file through a descriptor of our own (Python's sqlite3 does not expose SQLite's).

    Closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's included, so this one
    is opened once and closed only after the writer's connection, the last of the gateway's (the reader pool stops
    first)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)  # fdatasync needs no write access on Linux

    def __call__(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _begin(conn: sqlite3.Connection) -> float:
    """BEGIN IMMEDIATE, asking for the write lock every `_LOCK_POLL_S`; returns the seconds waited."""
    waited = _poll(conn, lambda: conn.execute("BEGIN IMMEDIATE") is not None, _LOCK_WAIT_S)
    if waited is None:
        raise sqlite3.OperationalError("database is locked")
    return waited


def _poll(conn: sqlite3.Connection, attempt: Callable[[], bool], limit: float) -> float | None:
    """Runs `attempt` every `_LOCK_POLL_S` (the GIL released while it sleeps) until it returns True, a busy
    database counting as False; the seconds waited, or None past `limit`. SQLite's own busy handler is off
    meanwhile: it sleeps 1, 2, 5 ... 100 ms between tries and misses the short gaps between the child's groups."""
    started = time.monotonic()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                if attempt():
                    return time.monotonic() - started
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    raise
            if time.monotonic() - started > limit:
                return None
            time.sleep(_LOCK_POLL_S)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(_LOCK_WAIT_S * 1000)}")


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return StoreError(str(exc))
    return exc
