"""Bulk rows (traffic log, measurements) committed by a child process (gateway/store/bulkproc.py).

The child and the writer thread take turns: two SQLite writers that collide wait in the busy handler's coarse
sleeps (up to 100 ms), which would land on the PUBACKs waiting for either. The writer thread raises a flag in
memory shared with the child (`Hold`) while it wants or holds the write lock; the child finishes the group it is
committing and waits for the flag to drop before the next. The writer thread sets and clears the flag itself, so
a turn spans only its wait for the lock, its ops and its COMMIT. When the event loop held the child back instead
(from before it handed the op to the thread until it saw the answer), each turn also included the loop's own
delays. Traced at 10,000 msg/s with 35-40 ops a second, the child was held 270-590 ms of every second that way
and 150-380 ms with the flag.

`append(sql, row)` adds a row to the open group and returns that group's future, which resolves after the
child's COMMIT. One group is committing while the next fills, so groups grow with the load, up to
`_GROUP_ROWS`: a full group goes to the child at once (see `_FULL_IN_FLIGHT`) and the next row opens another.
The cap bounds how long one COMMIT takes, and so how long a writer-thread op (a press, an ack) waits for its
turn: unbounded groups fed on themselves under load (a slow commit let the next group grow, which made its
commit slower) and held ops for half a second. If the child dies, the groups it held fail (their messages get
no PUBACK, so devices resend them) and a new child starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.store.frames import LEN
from gateway.telemetry import TELEMETRY

__all__ = ["BulkWriter", "Hold"]

log = logging.getLogger(__name__)
_IN_FLIGHT = 2  # groups sent to the child and not yet answered: one committing, one queued behind it
# Full groups go to the child at once, up to this many in flight. With only `_IN_FLIGHT`, a full group waited in the
# gateway for an answer to come back through the event loop: traced at 20,000 msg/s while the loop lagged 13-18 ms
# on average, 14-20 full groups waited there for seconds while the child sat idle half of each second.
_FULL_IN_FLIGHT = 8
_GROUP_ROWS = 1000  # rows in one group: ~10-30 ms of COMMIT on the development machine


class Hold:
    """One byte of memory shared with the child (a memfd it inherits): non-zero while the writer thread wants or
    holds the write lock. Set and cleared from any thread; the child only reads it (gateway/store/bulkproc.py)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("bosun-bulk-hold", 0)
        os.ftruncate(self.fd, mmap.PAGESIZE)
        self._map = mmap.mmap(self.fd, mmap.PAGESIZE)

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class _Group:
    __slots__ = ("future", "rows", "tables")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.tables: dict[str, list[tuple[Any, ...]]] = {}
        self.rows = 0
        self.future = future


# Called on the loop with the measurement rows a committed group's telemetry made, and `(reason, client_id, topic,
# size)` for each telemetry item that stored none (gateway/telemetry.py's decode_group).
TelemetryHook = Callable[[int, list[tuple[str, str, str, int]]], None]


class BulkWriter:
    def __init__(self, path: Path, synchronous: str, metrics: Metrics, on_done: Callable[[], None], hold: Hold) -> None:
        self._on_done = on_done
        self._hold = hold
        self._path = path
        self._synchronous = synchronous
        self._metrics = metrics
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[_Group] = deque()  # not yet sent; only the last one takes new rows
        self.waiting_rows = 0  # rows in `_waiting`; read by Writer.congested
        self._sent: dict[int, tuple[asyncio.Future[None], int]] = {}
        self.on_telemetry: TelemetryHook | None = None
        self.sent_rows = 0  # rows in `_sent`
        self._next_id = 0
        self._scheduled = False
        self._closing = False
        self.groups = 0
        self.rows = 0

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.store.bulkproc",
            str(self._path),
            self._synchronous,
            str(self._hold.fd),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            pass_fds=(self._hold.fd,),
        )
        self._reader = asyncio.create_task(self._answers(self._proc), name="bosun-bulk-answers")

    @property
    def depth(self) -> int:
        return self.waiting_rows + self.sent_rows

    def append(self, sql: str, row: tuple[Any, ...]) -> asyncio.Future[None]:
        return self.append_many(sql, (row,))

    def append_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> asyncio.Future[None]:
        """Add `rows` to the open group, all of them: the rows of one message commit or fail together (a group may
        exceed `_GROUP_ROWS` by a message's rows)."""
        if self._closing:
            raise StoreError("the writer is stopping")
        waiting = self._waiting
        group = waiting[-1] if waiting else None
        if group is None or group.rows >= _GROUP_ROWS:
            loop = asyncio.get_running_loop()
            group = _Group(loop.create_future())
            waiting.append(group)
            if not self._scheduled and self._may_send():
                self._scheduled = True
                loop.call_soon(self._send)
        table = group.tables.get(sql)
        if table is None:
            table = group.tables[sql] = []
        table.extend(rows)
        group.rows += len(rows)
        self.waiting_rows += len(rows)
        return group.future

    def append_telemetry(self, item: tuple[Any, ...]) -> asyncio.Future[None]:
        """Add one undecoded telemetry message (gateway/telemetry.py's TELEMETRY item), decoded by the child."""
        return self.append_many(TELEMETRY, (item,))

    def _send(self) -> None:
        """Hand waiting groups to the child (at the end of this loop turn, so the open one holds all of this
        turn's rows), as many as may be in flight."""
        self._scheduled = False
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        waiting = self._waiting
        while self._may_send():
            group = waiting.popleft()
            self.waiting_rows -= group.rows
            self._next_id += 1
            body = msgpack.packb([self._next_id, list(group.tables.items())])
            self._sent[self._next_id] = (group.future, group.rows)
            self.sent_rows += group.rows
            proc.stdin.write(LEN.pack(len(body)) + body)

    def _may_send(self) -> bool:
        """The oldest waiting group may go to the child: while groups fill, `_IN_FLIGHT` (so they grow with the
        load instead of each costing a COMMIT); a full one, up to `_FULL_IN_FLIGHT`."""
        waiting = self._waiting
        if not waiting:
            return False
        sent = len(self._sent)
        return sent < _IN_FLIGHT or (sent < _FULL_IN_FLIGHT and waiting[0].rows >= _GROUP_ROWS)

    async def _answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(4)
                group_id, error, measured, rejects = msgpack.unpackb(await proc.stdout.readexactly(LEN.unpack(head)[0]))
                future, rows = self._sent.pop(group_id)
                self.sent_rows -= rows
                self.groups += 1
                self.rows += rows
                self._metrics.writer_batch.observe(rows)
                if error is None:
                    future.set_result(None)
                    if (measured or rejects) and self.on_telemetry is not None:
                        try:
                            self.on_telemetry(measured, rejects)
                        except Exception:  # the answers must go on being read
                            log.exception("the telemetry hook failed")
                else:
                    self._fail(future, rows, StoreError(error))
                if self._waiting and not self._scheduled:
                    self._send()
                self._on_done()
        except asyncio.IncompleteReadError:
            pass
        if self._closing:
            return
        log.error("the bulk writer process exited (code %s); restarting it", await proc.wait())
        for future, rows in self._sent.values():
            self._fail(future, rows, StoreError("the bulk writer process died"))
        self._sent.clear()
        self.sent_rows = 0
        await self.start()
        if self._waiting:
            self._send()

    def _fail(self, future: asyncio.Future[None], rows: int, error: StoreError) -> None:
        log.error("%d bulk rows were not stored: %s", rows, error)
        self._metrics.drops.labels("store_error").inc(rows)
        future.set_exception(error)
        future.exception()  # logged here; waiters still see it

    async def stop(self) -> None:
        """Send what is open, wait for every answer, then let the child exit."""
        while self._waiting or self._sent:
            if self._may_send():
                self._send()
            waiting = [f for f, _ in self._sent.values()]
            if waiting:
                await asyncio.wait(waiting)
            else:
                await asyncio.sleep(0)
        self._closing = True
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
