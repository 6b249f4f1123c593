"""The bulk writer's child process: commits groups of rows it reads from stdin, answers on stdout.

Why a process: inserting tens of thousands of rows a second from a thread of the gateway's own process
makes the writer and the event loop fight over the GIL (sqlite3 releases and retakes it around every row),
which measured as PUBACK p99 in seconds at 10,000 msg/s. Here the inserts run on the other core.

Between groups it waits while the writer thread's flag (gateway/store/bulk.py's `Hold`) is up. Answers go out
from a thread of their own (`_Answers`), after the WAL sync when `synchronous=FULL`.

Frames both ways are a 4-byte big-endian length and a msgpack body:
request `[group_id, [[sql, [row, ...]], ...]]`, answer `[group_id, error or None, measurements, rejects]`, sent after
the COMMIT. A table named `telemetry.TELEMETRY` holds undecoded telemetry: the child decodes it before it takes the
write lock (`telemetry.decode_group`). The answer counts the measurement rows that came of it, and lists the items
that stored none as `[reason, client_id, topic, size]`.
"""

from __future__ import annotations

import mmap
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

import msgpack

from gateway.store.frames import LEN, read
from gateway.store.schema import connect
from gateway.store.walsync import WalSync, connection_synchronous
from gateway.telemetry import decode_group

_HOLD_POLL_S = 0.0002
_HOLD_MAX_S = 5.0  # never expected (the writer clears it in a finally); past it, SQLite's own locks decide


def _wait_turn(hold: mmap.mmap | None) -> None:
    if hold is None or not hold[0]:
        return
    deadline = time.monotonic() + _HOLD_MAX_S
    while hold[0] and time.monotonic() < deadline:
        time.sleep(_HOLD_POLL_S)


class _Answers:
    """Writes answers on stdout from a thread of its own. With `synchronous=FULL` it syncs the WAL first, once for
    every answer that arrived since its last sync: commits then no longer sync under the write lock
    (store.walsync), and the child goes on to its next group while the last one's sync runs."""

    def __init__(self, stdout: BinaryIO, wal_sync: WalSync | None) -> None:
        self._stdout = stdout
        self._wal_sync = wal_sync
        self._queue: list[tuple[int, str | None, int, list[tuple[str, str, str, int]]]] = []
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bosun-bulk-answers", daemon=True)
        self._thread.start()

    def put(self, group_id: int, error: str | None, stored: int, rejects: list[tuple[str, str, str, int]]) -> None:
        with self._changed:
            self._queue.append((group_id, error, stored, rejects))
            self._changed.notify()

    def close(self) -> None:
        """Answer everything queued, then stop."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()
        if self._wal_sync is not None:
            self._wal_sync.close()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            failed = None
            if self._wal_sync is not None:
                try:
                    self._wal_sync()
                except OSError as exc:
                    failed = f"the WAL could not be synced: {exc}"
            out = bytearray()
            for group_id, error, stored, rejects in batch:
                answer = msgpack.packb([group_id, error if error is not None else failed, stored, rejects])
                out += LEN.pack(len(answer)) + answer
            self._stdout.write(out)
            self._stdout.flush()


def serve(path: Path, synchronous: str, stdin: BinaryIO, stdout: BinaryIO, hold: mmap.mmap | None = None) -> None:
    sync = connection_synchronous(synchronous)
    conn = connect(path, synchronous=sync, autocheckpoint=False)
    answers = _Answers(stdout, WalSync(path) if sync != synchronous else None)
    try:
        while True:
            head = read(stdin, 4)
            if head is None:
                return  # the gateway closed the pipe: everything sent was answered
            body = read(stdin, LEN.unpack(head)[0])
            if body is None:
                return
            group_id, tables = msgpack.unpackb(body, use_list=False)
            tables, stored, rejects = decode_group(tables)  # before the turn: decoding holds no lock
            _wait_turn(hold)
            error = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sql, rows in tables:
                    conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                error = str(exc)
            answers.put(group_id, error, stored, rejects)
    finally:
        answers.close()
        conn.close()


if __name__ == "__main__":
    serve(
        Path(sys.argv[1]),
        sys.argv[2],
        sys.stdin.buffer,
        sys.stdout.buffer,
        mmap.mmap(int(sys.argv[3]), mmap.PAGESIZE) if len(sys.argv) > 3 else None,
    )
