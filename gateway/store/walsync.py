"""Syncing the WAL after the write lock is released, instead of inside COMMIT while holding it.

With `synchronous=FULL`, SQLite syncs the WAL inside every COMMIT, while the connection still holds the database's
only write lock. The gateway has two writers: the writer thread (ops such as presses and acks) and the bulk child
(telemetry rows). So each one's fdatasync (1-2 ms p50, 8 ms p99 under load on this machine) was time the other
spent waiting for the lock. With `store.synchronous = FULL`, both writers therefore open their connections with
`synchronous=NORMAL`, which makes COMMIT write the WAL frames without syncing them. Each writer then calls
`WalSync` before it reports a commit as done. Traced at 10,000 msg/s: the bulk child held the lock 23-27 % of the
time instead of 64-70 %, and the writer thread's wait for the lock fell from 83-108 to 41-53 ms a second.

What is acknowledged keeps FULL's guarantee. A PUBACK or an op's result waits until the WAL holding its commit is
synced. Recovery takes WAL frames in order up to the first one whose checksum fails, so a synced commit comes
back with everything committed before it.

What changes is that other connections can read a commit for the ~1-2 ms before it is synced. After a power
cut, they may have read rows that are then gone. Anything that takes rows off the box or into another file
(the uplink to HQ, the measurements index) calls a `WalSync` of its own after reading and before using them:
whatever such a read saw is then on disk too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WalSync", "connection_synchronous"]


def connection_synchronous(configured: str) -> str:
    """The `synchronous` a writer's connection uses for the configured mode: NORMAL plus a `WalSync` for FULL."""
    return "NORMAL" if configured.upper() == "FULL" else configured


class WalSync:
    """fdatasync of a database's WAL file through a descriptor of our own (Python's sqlite3 gives no access to
    SQLite's).

    Follows the file if it is replaced. SQLite deletes the WAL when the last connection closes, after a checkpoint
    that synced everything into the database, and creates it again at the next open. With no WAL file there is
    nothing to sync. The descriptor is opened read-only: fdatasync needs no write access on Linux."""

    def __init__(self, db_path: Path) -> None:
        self.path = f"{db_path}-wal"
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def __call__(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        inode = (st.st_dev, st.st_ino)
        if inode != self._inode:
            self.close()
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            self._inode = (os.fstat(self._fd).st_dev, os.fstat(self._fd).st_ino)
        assert self._fd is not None
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the descriptor. No SQLite lock is on the WAL file itself: SQLite locks the database and the -shm
        file, so closing this cannot drop one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._inode = None
