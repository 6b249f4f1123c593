"""The measurements index's process: keeps `mindex.Index` up on the gateway's requests, under SCHED_IDLE.

Why a process: the index's batches are seconds of CPU a minute. As a thread of the gateway they shared the GIL
with the event loop, and at a low priority that is worse than it sounds: a thread that asked for the GIL makes the
loop hand it over and wait until that thread has run, which the kernel puts off for as long as anything else
wants the CPU.

Frames both ways are a 4-byte big-endian length and a msgpack body: request `[op, [args...]]` with op one of
`open`, `waiting`, `step`, `purge`; answer `[error or None, result, indexed_to, used_bytes, [[level, message]...]]`,
the last being what the index logged meanwhile (the gateway logs it as its own). The gateway closing the pipe
stops the process.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from gateway.store.frames import LEN, read
from gateway.store.mindex import Index, background_priority


class _Notes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def serve(db_path: Path, stdin: BinaryIO, stdout: BinaryIO) -> None:
    notes = _Notes()
    logger = logging.getLogger("gateway.store.mindex")
    logger.addHandler(notes)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    index = Index(db_path)
    ops: dict[str, Any] = {"open": index.open, "waiting": index.waiting, "step": index.step, "purge": index.purge}
    try:
        while True:
            head = read(stdin, 4)
            body = read(stdin, LEN.unpack(head)[0]) if head is not None else None
            if body is None:
                return  # the gateway closed the pipe
            op, args = msgpack.unpackb(body)
            error, result = None, None
            try:
                result = ops[op](*args)
            except (sqlite3.Error, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            answer = msgpack.packb([error, result, index.indexed_to, index.used_bytes, notes.records])
            notes.records = []
            stdout.write(LEN.pack(len(answer)) + answer)
            stdout.flush()
    finally:
        index.close()


if __name__ == "__main__":
    background_priority()
    serve(Path(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
