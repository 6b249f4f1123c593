"""The gateway's side of the measurements index (gateway/store/mindex.py): starts the index process
(gateway/store/mindexproc.py), asks it to index whenever enough rows wait, and restarts it if it dies.

Apart from `mindex` so that the index process, which imports `mindex`, does not load asyncio (about 8 MB of its
resident memory, counted in the gateway's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from gateway.errors import StoreError
from gateway.store.frames import LEN
from gateway.store.mindex import _BATCH_MIN, _MAX_WAIT_S, index_path

if TYPE_CHECKING:  # not imported at run time by the tests that need no metrics
    from gateway.metrics import Metrics

__all__ = ["Indexer"]

log = logging.getLogger("gateway.store.mindex")
_POLL_S = 0.5
# While rows arrive faster than `_BUSY_ROWS_S` (10 times a large site's telemetry: 1,000 devices reporting every
# 10 s make about 200 rows/s), the index waits, up to `DEFER_MAX_ROWS` behind, and catches up once the burst is
# over (a site's devices flushing what they kept through an outage, a benchmark). SCHED_IDLE alone does not keep
# its batches out of the acknowledgements' way on a 2-core machine: measured here with a plain CPU loop under
# SCHED_IDLE beside a normal-priority task that wakes every 2 ms and two busy ones in another session, the task's
# wait for a CPU doubled (0.78-0.98 s per 10 s alone, 1.37-1.81 s beside the idle loop). At 10,000 msg/s FULL the
# gateway's event loop lag while a batch ran was 3-5 times what it was between batches (traced, four runs).
# The bound keeps device queries quick meanwhile: they read the rows the index has not reached from the table,
# 64 ms for 400,000 rows on this machine.
_BUSY_ROWS_S = 2_000
DEFER_MAX_ROWS = 500_000
_STOP_WAIT_S = 30.0  # a batch of `_BATCH_MAX` rows takes well under this


class Indexer:
    """Keeps the index file up with the database's measurements. The work runs in a process of its own
    (gateway/store/mindexproc.py, under SCHED_IDLE): as a thread of the gateway, a batch's CPU shared the GIL with
    the event loop, and a low-priority thread that holds or is handed the GIL stalls the loop until the kernel runs
    it again."""

    def __init__(
        self,
        db_path: Path,
        drop_legacy: Callable[[], Awaitable[object]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._db_path = db_path
        self._metrics = metrics
        # the index the database itself had (schema migration 10) answers device queries until this one has caught
        # up; then `drop_legacy` (a writer op: only the writer writes the database) drops it
        self._drop_legacy = drop_legacy
        self.path = index_path(db_path)
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one request at a time on the pipe
        self._task: asyncio.Task[None] | None = None
        self.indexed_to = 0
        self.behind = 0  # rows the index had not reached at its last look (device queries read them from the table)
        self.used_bytes = 0  # pages in use in the index file: part of the disk budget (gateway/retention.py)
        self.pid: int | None = None
        self._killed: asyncio.subprocess.Process | None = None  # a process a cancelled request killed

    async def start(self) -> None:
        """Start the index process, which creates or checks the file (before any reader attaches it), then index in
        the background."""
        await self._call("open")
        self._task = asyncio.create_task(self._run(), name="bosun-indexer")

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.store.mindexproc",
            str(self._db_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.pid = proc.pid
        return proc

    async def _call(self, op: str, *args: Any) -> Any:
        """One request to the index process (started again if it has exited: the file is opened again first)."""
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                proc = self._proc = await self._spawn()
                if op != "open":
                    await self._request(proc, "open", ())
            return await self._request(proc, op, args)

    async def _request(self, proc: asyncio.subprocess.Process, op: str, args: tuple[Any, ...]) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        body = msgpack.packb([op, list(args)])
        try:
            proc.stdin.write(LEN.pack(len(body)) + body)
            await proc.stdin.drain()
            head = await proc.stdout.readexactly(4)
            error, result, indexed_to, used_bytes, notes = msgpack.unpackb(
                await proc.stdout.readexactly(LEN.unpack(head)[0])
            )
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            code = await proc.wait()
            raise StoreError(f"the index process exited with {code}") from exc
        except asyncio.CancelledError:
            # its answer would be read as the next request's: this process is done, the next call starts another
            if proc.returncode is None:
                proc.kill()
            self._proc = None
            self._killed = proc  # reaped by stop(): its pipes are closed there, before the loop may end
            raise
        for level, message in notes:  # what the process logged, in the gateway's log
            log.log(level, "%s", message)
        self.indexed_to, self.used_bytes = indexed_to, used_bytes
        if error is not None:
            raise StoreError(error)
        return result

    async def catch_up(self) -> None:
        """Index every row there is now."""
        while await self._call("step"):
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        failing = ""
        last: tuple[float, int] | None = None  # (when, the table's newest id) at the previous look
        deferring = False
        while True:
            try:
                behind = await self._call("waiting")
                self._show_behind(behind)
                now, top = loop.time(), self.indexed_to + behind
                busy = last is not None and now > last[0] and (top - last[1]) / (now - last[0]) > _BUSY_ROWS_S
                last = (now, top)
                if behind and waiting_since is None:
                    waiting_since = now
                caught_up = not behind
                due = behind >= _BATCH_MIN or (behind and now - (waiting_since or 0.0) >= _MAX_WAIT_S)
                if due and busy and behind < DEFER_MAX_ROWS:
                    if not deferring:
                        log.info("measurements index: waiting while more than %d rows/s arrive", _BUSY_ROWS_S)
                        deferring = True
                elif due:
                    deferring = False
                    await self.catch_up()
                    self._show_behind(await self._call("waiting"))
                    waiting_since = None
                    caught_up = True  # every row there was when the last step began is in
                if self._drop_legacy is not None and caught_up:
                    await self._drop_legacy()
                    self._drop_legacy = None
                if failing:
                    log.info("measurements index: working again")
                    failing = ""
            except (sqlite3.Error, StoreError) as exc:  # the index process's error, or the legacy index's drop failed
                if str(exc) != failing:  # once per distinct error, not every poll
                    log.warning("measurements index: %s (device queries read the newest rows from the table)", exc)
                    failing = str(exc)
            await asyncio.sleep(_POLL_S)

    def _show_behind(self, rows: int) -> None:
        self.behind = rows
        if self._metrics is not None:
            self._metrics.index_behind.set(rows)

    async def purge(self, spans: list[tuple[str, float, float]], first: int, last: int) -> int:
        """Drop the entries of measurements `first`..`last`, which retention deleted (see `Index.purge`). Retention
        waits for this after each of its steps, so the disk budget counts what is really left."""
        dropped: int = await self._call("purge", spans, first, last)
        return dropped

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            proc, self._proc = self._proc, None
            killed, self._killed = self._killed, None
            if killed is not None:
                await _reap(killed)
            if proc is None:
                return
            assert proc.stdin is not None
            proc.stdin.close()  # the process closes the file and exits
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_WAIT_S)
                except TimeoutError:
                    log.warning("the index process did not exit within %g s: killing it", _STOP_WAIT_S)
                    proc.kill()
            await _reap(proc)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for an exited or exiting process and close its pipes. On Python 3.11 `wait()` returns at the exit,
    possibly before the pipes are closed; a transport left with open pipes is closed by the garbage collector,
    which fails once the loop has ended ("Event loop is closed")."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await proc.stdout.read()  # to the end of the pipe: its transport closes
    await proc.wait()
    await asyncio.sleep(0)  # the transport's own connection_lost callbacks run
