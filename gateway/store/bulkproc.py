"""The bulk writer's child process: commits groups of rows it reads from stdin, answers on stdout.

Why a process: inserting tens of thousands of rows a second from a thread of the gateway's own process
makes the writer and the event loop fight over the GIL (sqlite3 releases and retakes it around every row),
which measured as PUBACK p99 in seconds at 10,000 msg/s. Here the inserts run on the other core.

Between groups it waits while the writer thread's flag (gateway/store/bulk.py's `Hold`) is up.

Frames both ways are a 4-byte big-endian length and a msgpack body:
request `[group_id, [[sql, [row, ...]], ...]]`, answer `[group_id, error or None]`, sent after the COMMIT.
"""

from __future__ import annotations

import mmap
import sqlite3
import struct
import sys
import time
from pathlib import Path
from typing import BinaryIO

import msgpack

from gateway.store.schema import connect

_LEN = struct.Struct("!I")
_HOLD_POLL_S = 0.0002
_HOLD_MAX_S = 5.0  # never expected (the writer clears it in a finally); past it, SQLite's own locks decide


def _read(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data and len(data) == n else None


def _wait_turn(hold: mmap.mmap | None) -> None:
    if hold is None or not hold[0]:
        return
    deadline = time.monotonic() + _HOLD_MAX_S
    while hold[0] and time.monotonic() < deadline:
        time.sleep(_HOLD_POLL_S)


def serve(path: Path, synchronous: str, stdin: BinaryIO, stdout: BinaryIO, hold: mmap.mmap | None = None) -> None:
    conn = connect(path, synchronous=synchronous, autocheckpoint=False)
    try:
        while True:
            head = _read(stdin, 4)
            if head is None:
                return  # the gateway closed the pipe: everything sent was answered
            body = _read(stdin, _LEN.unpack(head)[0])
            if body is None:
                return
            group_id, tables = msgpack.unpackb(body, use_list=False)
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
            answer = msgpack.packb([group_id, error])
            stdout.write(_LEN.pack(len(answer)) + answer)
            stdout.flush()
    finally:
        conn.close()


if __name__ == "__main__":
    serve(
        Path(sys.argv[1]),
        sys.argv[2],
        sys.stdin.buffer,
        sys.stdout.buffer,
        mmap.mmap(int(sys.argv[3]), mmap.PAGESIZE) if len(sys.argv) > 3 else None,
    )
