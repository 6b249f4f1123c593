"""The measurements' per-device index, in a file of its own beside the database, kept up by a process of its own.

Why not an index in the database: under steady telemetry every row lands on its own device's leaf of a
(device_id, ts) index, so every COMMIT on the acknowledgement path wrote about one index page per message
and each insert walked a deeper tree as the table grew. Modelled at 10,000 rows/s in groups of 80 (1 KB
pages): 7.6 us per row at the start, 14 us after 20 s, against a flat 1.9 us without the index. In the
benchmark at 10,000 msg/s FULL, PUBACK p99 was 17.7 and 58 ms without it against 48.5 and 74 ms with it
(alternating 30 s runs), and the bulk writer's group latency stopped rising through the run.

Here the index is built behind the writers: the new rows are copied in, in batches sorted by device (see
`_BATCH_MIN`), in a transaction on this file only, so no writer of the database ever waits for it. It is derived data:
deleted, it is rebuilt from the database; a database replaced under it (another `uplink_epoch`, or fewer
rows than it has indexed) makes it start again. Readers attach it as `mindex` (`attach`), and
`store.views` reads the rows it has not reached yet from the table itself (`indexed_to` onwards, a range
of the table's own key).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

from gateway.store.schema import connect, used_pages_bytes
from gateway.store.walsync import WalSync

__all__ = ["ALIAS", "Index", "attach", "background_priority", "index_path", "indexed_to", "is_attached"]

log = logging.getLogger(__name__)
ALIAS = "mindex"
_FORMAT = "3"  # of the file's tables and pages: a file of another format is deleted and built again
# Rows are indexed in batches of at least `_BATCH_MIN`, or whatever waits once the oldest has waited `_MAX_WAIT_S`.
# A batch touches each device's leaf once, whatever the number of its rows, so larger batches cost less per row.
# Modelled at 10,000 rows/s over 1,000 devices, 400,000 rows in: 17 us per row in batches of 5,000 (every 0.5 s),
# 6.5 us in batches of 20,000 and 3.8 us in batches of 50,000 (a WITHOUT ROWID table; a rowid table with an index
# cost 5.2 us at 50,000 and twice the file). Measured with this class over a database of 400,000 rows from 1,000
# devices (two metrics a message), adding 1,000,000 more: 3.8-4.1 us of CPU per row in batches of 20,000, 2.5-2.7
# at 50,000, 1.9-2.0 at 100,000. At 20,000 msg/s (40,000 rows/s) batches of 50,000 come every 1.25 s; device
# queries read about that many of the newest rows from the table itself.
_BATCH_MIN = 50_000
_MAX_WAIT_S = 5.0
# Rows per transaction while catching up (an existing database, a long stop, a burst past DEFER_MAX_ROWS). The batch
# is read into memory and sorted there: at 20,000 msg/s the index process peaked at 32 MB resident with 100,000-row
# batches and 27 MB with 50,000, for 2.5-2.7 us of CPU per row instead of 1.9-2.0 (measured above).
_BATCH_MAX = 50_000
# Where SCHED_IDLE is refused (not Linux): the index process's nice value instead. Two alternating pairs of 20 s runs at
# 20,000 msg/s FULL, the index a thread then: PUBACK p99 155 and 174 ms at nice 10, 729 and 820 ms without.
_NICE = 10
# The file's write volume is what the index costs the acknowledgements: each batch rewrites every device's last leaf
# (and splits it), twice (the WAL, then the checkpoint), and that burst of writes is what the bulk writer's fsync
# waits behind. So entries name a device by a number of the file's own, not by its name, and pages are 1 KB.
# Modelled with batches of 50,000 rows over 1,000 devices: 15.6 MB of WAL per batch with names and 4 KB pages (311
# bytes a row), 4.8 MB (97 bytes) with numbers and 1 KB pages; 47 bytes of file an entry against 23; CPU 3.2 against
# 2.6 us a row.
_PAGE_SIZE = 1024
_DEVICES = "CREATE TABLE IF NOT EXISTS devices (n INTEGER PRIMARY KEY, device_id TEXT NOT NULL UNIQUE)"
_ENTRIES = (
    "CREATE TABLE IF NOT EXISTS mi (dev INTEGER NOT NULL, ts REAL NOT NULL, id INTEGER NOT NULL, "
    "PRIMARY KEY (dev, ts, id)) WITHOUT ROWID"
)
_STATE = "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value)"


def index_path(db_path: Path) -> Path:
    """`bosun.db` -> `bosun-index.db`."""
    return db_path.with_name(f"{db_path.stem}-index{db_path.suffix}")


def attach(conn: sqlite3.Connection, db_path: Path) -> bool:
    """Attach the index to a reader's connection, if the gateway has created it (attaching would create it)."""
    path = index_path(db_path)
    if not path.exists():
        return False
    conn.execute(f"ATTACH DATABASE ? AS {ALIAS}", (str(path),))
    return True


def indexed_to(conn: sqlite3.Connection, schema: str = ALIAS) -> int:
    """The last measurement id the index has reached (rows after it are read from the table itself)."""
    row = conn.execute(f"SELECT value FROM {schema}.state WHERE key = 'indexed_to'").fetchone()
    return int(row[0]) if row is not None else 0


def _format(path: Path) -> str | None:
    """The format an index file was built in (None: not one of ours, or too old to say)."""
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        row = conn.execute("SELECT value FROM state WHERE key = 'format'").fetchone()
    except sqlite3.OperationalError:  # no state table: empty, or older than formats
        return None
    finally:
        conn.close()
    return str(row[0]) if row is not None else None


def is_attached(conn: sqlite3.Connection) -> bool:
    return any(row[1] == ALIAS for row in conn.execute("PRAGMA database_list"))


def background_priority() -> None:
    """The index is background work: on a busy gateway its process yields the CPU to the acknowledgements (and
    falls behind for a while, which only lengthens the range device queries read from the table).

    SCHED_IDLE rather than a nice value: Linux then counts a CPU running only the index as idle, so a woken event
    loop or bulk child takes it at once instead of queueing behind another busy task on the other CPU. Traced 30 s
    runs at 10,000 msg/s FULL, five alternating pairs (the index still a thread then): the bulk groups' round trip
    (sent to the child, answer handled) while a batch was being indexed had a p99 of 60, 33, 16, 36 and 26 ms under
    SCHED_IDLE against 108, 85, 55, 65 and 21 ms at nice 10 (outside batches 9-31 ms in both)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, _NICE)


class Index:
    """The index file and its work, synchronous: what the gateway's index process (gateway/store/mindexproc.py)
    runs on `Indexer`'s requests."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self.path = index_path(db_path)
        self._conn: sqlite3.Connection | None = None
        self._wal_sync = WalSync(db_path)
        self.indexed_to = 0
        self.used_bytes = 0  # pages in use in the index file: part of the disk budget (gateway/retention.py)

    def open(self) -> None:
        """Create or check the file (before any reader attaches it)."""
        self._open_or_rebuild()

    def _open_or_rebuild(self) -> None:
        try:
            if self.path.exists() and _format(self.path) != _FORMAT:
                log.info("the measurements index %s has an older format: building it again", self.path)
                self._delete()
            self._open()
        except sqlite3.DatabaseError as exc:  # a damaged file: it only holds what the database has
            log.error("the measurements index %s cannot be used (%s): rebuilding it", self.path, exc)
            self._delete()
            self._open()

    def _delete(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _open(self) -> None:
        # derived data: a power cut costs a re-index, not a record
        conn = connect(self.path, synchronous="NORMAL", page_size=_PAGE_SIZE)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._measure()

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("ATTACH DATABASE ? AS src", (str(self._db_path),))
        conn.execute(_STATE)
        mine = dict(conn.execute("SELECT key, value FROM state").fetchall())
        conn.execute(_DEVICES)
        conn.execute(_ENTRIES)
        epoch = conn.execute("SELECT value FROM src.meta WHERE key = 'uplink_epoch'").fetchone()
        top = conn.execute("SELECT coalesce(max(id), 0) FROM src.measurements").fetchone()[0]
        indexed_to = int(mine.get("indexed_to", 0))
        if (epoch and mine.get("epoch") not in (None, epoch[0])) or indexed_to > top:
            log.warning("the measurements index belongs to another database: rebuilding it")
            conn.execute("DELETE FROM mi")
            indexed_to = 0
        conn.execute("BEGIN")
        for key, value in (("indexed_to", indexed_to), ("epoch", epoch[0] if epoch else None), ("format", _FORMAT)):
            conn.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))
        conn.execute("COMMIT")
        conn.execute("CREATE TEMP TABLE batch (device_id TEXT, ts REAL, id INTEGER)")
        self.indexed_to = indexed_to

    def waiting(self) -> int:
        """Rows (ids) the index has not reached yet."""
        assert self._conn is not None
        top = self._conn.execute("SELECT coalesce(max(id), 0) FROM src.measurements").fetchone()[0]
        return max(0, int(top) - self.indexed_to)

    def step(self) -> bool:
        """Index every row added since the last step (at most `_BATCH_MAX`); True while more are waiting."""
        conn = self._conn
        assert conn is not None
        top = conn.execute("SELECT coalesce(max(id), 0) FROM src.measurements").fetchone()[0]
        start = self.indexed_to
        if top < start:  # the table's ids went back (never expected: retention keeps the newest row)
            log.warning("measurements index: the database has fewer rows than it indexed; rebuilding it")
            self._reset()
            return True
        if top == start:
            return False
        end = min(top, start + _BATCH_MAX)
        # One short statement reads the rows (a rowid range) into memory, then the index is written without a
        # snapshot of the database open: a reader of the database holds back the writer's WAL restart.
        conn.execute(
            "INSERT INTO temp.batch SELECT device_id, ts, id FROM src.measurements WHERE id > ? AND id <= ?",
            (start, end),
        )
        self._wal_sync()  # the rows read are on disk before the index counts them (store.walsync)
        conn.execute("BEGIN")
        try:
            conn.execute("INSERT OR IGNORE INTO devices(device_id) SELECT DISTINCT device_id FROM temp.batch")
            conn.execute(
                "INSERT OR IGNORE INTO mi SELECT d.n, b.ts, b.id FROM temp.batch AS b JOIN devices AS d "
                "ON d.device_id = b.device_id ORDER BY d.n, b.ts, b.id"
            )
            conn.execute("UPDATE state SET value = ? WHERE key = 'indexed_to'", (end,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("DELETE FROM temp.batch")
        self.indexed_to = end
        self._measure()
        return bool(end < top)

    def _reset(self) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN")
        conn.execute("DELETE FROM mi")
        conn.execute("UPDATE state SET value = 0 WHERE key = 'indexed_to'")
        conn.execute("COMMIT")
        self.indexed_to = 0

    def purge(self, spans: list[tuple[str, float, float]], first: int, last: int) -> int:
        """Drop the entries of measurements `first`..`last`, which retention deleted: `spans` gives each of their
        devices' (device_id, oldest ts, newest ts), so each device's entries are found by a range of the key.
        The number dropped."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            dropped = 0
            for device_id, oldest, newest in spans:
                dropped += conn.execute(
                    "DELETE FROM mi WHERE dev = (SELECT n FROM devices WHERE device_id = ?) "
                    "AND ts BETWEEN ? AND ? AND id BETWEEN ? AND ?",
                    (device_id, oldest, newest, first, last),
                ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._measure()
        return dropped

    def _measure(self) -> None:
        assert self._conn is not None
        self.used_bytes = used_pages_bytes(self._conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._wal_sync.close()
