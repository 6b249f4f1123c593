"""The store's two writers on a real SQLite file: the writer thread (ops) and the bulk child process (rows)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.config import StoreSection
from gateway.metrics import Metrics
from gateway.store import bulkproc
from gateway.store import writer as writer_module
from gateway.store.bulk import _GROUP_ROWS, BulkWriter, Hold
from gateway.store.walsync import WalSync
from gateway.store.writer import Writer

_FRAME = struct.Struct("!I")
_INSERT = "INSERT INTO measurements(device_id, metric, ts, value) VALUES (?, ?, ?, ?)"


async def _writer(tmp_path: Path) -> tuple[Writer, Metrics]:
    metrics = Metrics()
    writer = Writer(tmp_path / "bosun.db", StoreSection(), metrics)
    await writer.start()
    return writer, metrics


def _count(path: Path, sql: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def test_bulk_rows_commit_in_bounded_groups_and_all_arrive(tmp_path: Path) -> None:
    writer, _ = await _writer(tmp_path)
    try:
        rows = 2 * _GROUP_ROWS + 500
        futures = {writer.append(_INSERT, (f"d{i % 7}", "temperature", float(i), 20.0)) for i in range(rows)}
        await asyncio.gather(*futures)
        assert len(futures) >= 3  # one turn's rows were cut into groups of at most _GROUP_ROWS
        assert writer.depth == 0
    finally:
        await writer.stop()
    assert _count(tmp_path / "bosun.db", "SELECT count(*) FROM measurements") == rows


async def test_an_op_waits_for_a_lock_another_connection_holds_and_then_commits(tmp_path: Path) -> None:
    """Another connection keeps the write lock for 0.5 s: the op asks again until it gets it, records how long
    it waited, and commits; a bulk row queued meanwhile commits too."""
    writer, metrics = await _writer(tmp_path)
    held = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(tmp_path / "bosun.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        threading.Event().wait(0.5)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        await asyncio.to_thread(held.wait)
        bulk = writer.append(_INSERT, ("d1", "humidity", 1.0, 40.0))
        result = await writer.run(lambda conn: conn.execute(_INSERT, ("d2", "humidity", 2.0, 41.0)).rowcount)
        await bulk
        assert result == 1
        waits = _samples(metrics, "bosun_writer_lock_wait_seconds")
        assert waits["count"] >= 1 and waits["sum"] >= 0.3
    finally:
        await asyncio.to_thread(holder.join)
        await writer.stop()
    assert _count(tmp_path / "bosun.db", "SELECT count(*) FROM measurements") == 2


async def test_ops_and_bulk_groups_interleave(tmp_path: Path) -> None:
    """Ops queued while bulk groups are in flight commit, and so does every bulk row, in five rounds."""
    writer, metrics = await _writer(tmp_path)
    try:
        for round_ in range(5):
            rows = [writer.append(_INSERT, (f"d{i}", "t", float(i), 1.0)) for i in range(1500)]
            done = await writer.run(lambda conn: conn.execute(_INSERT, ("op", "t", 0.0, 1.0)).rowcount)
            await asyncio.gather(*rows)
            assert done == 1, round_
        assert _samples(metrics, "bosun_writer_lock_wait_seconds")["count"] == 5
    finally:
        await writer.stop()
    assert _count(tmp_path / "bosun.db", "SELECT count(*) FROM measurements") == 5 * 1501


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    for family in metrics.registry.collect():
        if family.name == name:
            return {s.name.removeprefix(name + "_"): s.value for s in family.samples if not s.labels.get("le")}
    raise AssertionError(f"no metric {name}")


async def test_a_wal_that_keeps_growing_under_load_is_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady writes PASSIVE checkpoints never let the WAL start over (it grew by ~60 MB/s in make bench);
    past the limit the writer restarts it between groups, and every row is still there."""
    monkeypatch.setattr(writer_module, "_CHECKPOINT_S", 0.05)
    monkeypatch.setattr(writer_module, "_WAL_RESTART_BYTES", 64 << 10)
    writer, metrics = await _writer(tmp_path)
    try:
        for round_ in range(40):
            rows = [writer.append(_INSERT, (f"d{i}", "t", float(round_ * 1000 + i), 1.0)) for i in range(1000)]
            await writer.run(lambda conn: conn.execute(_INSERT, ("op", "t", 0.0, 1.0)).rowcount)
            await asyncio.gather(*rows)
            await asyncio.sleep(0.01)
        assert _samples(metrics, "bosun_wal_restarts")["total"] >= 1
    finally:
        await writer.stop()
    assert _count(tmp_path / "bosun.db", "SELECT count(*) FROM measurements") == 40 * 1001


@contextlib.asynccontextmanager
async def _bulk_writer(path: Path) -> AsyncIterator[tuple[BulkWriter, Hold]]:
    """A migrated database and a bulk writer (its child process) with the writer thread's flag, stopped after."""
    conn = writer_module.connect(path)
    writer_module.migrate(conn)
    conn.close()
    hold = Hold()
    bulk = BulkWriter(path, "FULL", Metrics(), lambda: None, hold)
    await bulk.start()
    try:
        yield bulk, hold
    finally:
        hold.clear()
        await bulk.stop()
        hold.close()


async def test_the_bulk_child_waits_while_the_writer_thread_holds_its_flag(tmp_path: Path) -> None:
    """The child reads the writer thread's flag from shared memory: no group commits while it is up, and the
    waiting group commits as soon as it drops."""
    path = tmp_path / "bosun.db"
    async with _bulk_writer(path) as (bulk, hold):
        await bulk.append(_INSERT, ("d0", "t", 0.0, 1.0))  # the child is up and has committed once
        hold.set()
        held = bulk.append(_INSERT, ("d1", "t", 1.0, 1.0))
        await asyncio.sleep(0.3)
        assert not held.done()
        assert _count(path, "SELECT count(*) FROM measurements") == 1
        hold.clear()
        await asyncio.wait_for(held, 5)
        assert _count(path, "SELECT count(*) FROM measurements") == 2


async def test_full_groups_go_to_the_child_without_waiting_for_its_answers(tmp_path: Path) -> None:
    """While the child is busy, a group that is still filling waits (so groups grow with the load), but full ones are
    handed over at once: the child never sits idle while full groups wait for the event loop to see an answer."""
    path = tmp_path / "bosun.db"
    async with _bulk_writer(path) as (bulk, hold):
        await bulk.append(_INSERT, ("d0", "t", 0.0, 1.0))
        hold.set()  # the child takes no turn: nothing it is sent is answered meanwhile
        futures = {bulk.append(_INSERT, (f"d{i % 7}", "t", float(i), 1.0)) for i in range(4 * _GROUP_ROWS + 10)}
        await asyncio.sleep(0.1)
        assert len(futures) == 5
        assert len(bulk._sent) == 4  # the four full groups; the fifth, still filling, waits for an answer
        more = {bulk.append(_INSERT, ("d1", "t", 1.0, 1.0))}
        await asyncio.sleep(0.1)
        assert len(bulk._sent) == 4 and more <= futures
        hold.clear()
        await asyncio.wait_for(asyncio.gather(*futures, *more), 10)
    assert _count(path, "SELECT count(*) FROM measurements") == 1 + 4 * _GROUP_ROWS + 10 + 1


async def test_the_rows_of_one_message_never_straddle_two_groups(tmp_path: Path) -> None:
    """The PUBACK waits for one group's future: a message's measurements all go in the group that future stands
    for, even one filling up, so none of them can fail in a group the PUBACK did not wait for."""
    path = tmp_path / "bosun.db"
    async with _bulk_writer(path) as (bulk, _):
        first = {bulk.append(_INSERT, ("d0", "t", float(i), 1.0)) for i in range(_GROUP_ROWS - 1)}
        message = bulk.append_many(_INSERT, [("d1", metric, 1.0, 1.0) for metric in ("a", "b", "c")])
        assert first == {message}
        after = bulk.append(_INSERT, ("d2", "t", 2.0, 1.0))
        assert after is not message  # the group, now past its bound, takes nothing more
        await asyncio.wait_for(asyncio.gather(message, after), 10)
    assert _count(path, "SELECT count(*) FROM measurements") == _GROUP_ROWS - 1 + 3 + 1


def _open_paths() -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            found.append(str(fd.readlink()))
        except OSError:
            continue  # closed meanwhile
    return found


async def test_the_checkpoint_thread_flushes_the_database_and_closes_its_descriptor_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite syncs the database only after a checkpoint that copied the whole WAL (never, under steady writes),
    so the checkpoint thread flushes it itself; the WAL restart's sync then has little left to write. The
    descriptor it flushes through is closed at stop, after SQLite's own (closing it drops the process's locks)."""
    monkeypatch.setattr(writer_module, "_CHECKPOINT_S", 0.05)
    flushed: list[str] = []
    real = writer_module.os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real(fd)

    monkeypatch.setattr(writer_module.os, "fdatasync", fdatasync)
    db = tmp_path / "bosun.db"
    writer, _ = await _writer(tmp_path)
    try:
        await asyncio.gather(*[writer.append(_INSERT, (f"d{i}", "t", float(i), 1.0)) for i in range(100)])
        for _ in range(100):
            if flushed:
                break
            await asyncio.sleep(0.05)
        assert str(db) in flushed and set(flushed) <= {str(db), f"{db}-wal"}  # the WAL: the writers' own syncs
    finally:
        await writer.stop()
    assert str(db) not in _open_paths()


def test_a_new_gateway_database_has_small_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    """Each telemetry message dirties a leaf of its device's index entries, a whole page of WAL at COMMIT: a new
    gateway database uses 1 KB pages (schema.PAGE_SIZE). A file created with 4 KB pages keeps them (changing it
    needs a VACUUM out of WAL mode), and HQ's database keeps SQLite's default."""
    from gateway.hq.db import connect_hq
    from gateway.store.schema import PAGE_SIZE

    def page_size(conn: sqlite3.Connection) -> int:
        try:
            return int(conn.execute("PRAGMA page_size").fetchone()[0])
        finally:
            conn.close()

    new = writer_module.connect(tmp_path / "new.db")
    writer_module.migrate(new)
    assert page_size(new) == PAGE_SIZE == 1024

    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE t(x)")
    old.close()
    assert page_size(writer_module.connect(tmp_path / "old.db")) == 4096

    assert page_size(connect_hq(tmp_path / "hq.db")) == 4096


def _lock_is_free(path: Path) -> bool:
    """Whether another connection could take the write lock right now (SQLite's own connection: closing it cannot
    drop the locks of the others in this process)."""
    probe = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()


def _record_syncs(monkeypatch: pytest.MonkeyPatch, db: Path, note: Callable[[], Any]) -> list[tuple[str, bool, Any]]:
    """os.fdatasync, recorded: the file, whether the write lock was free meanwhile, and `note()` at that moment."""
    synced: list[tuple[str, bool, Any]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        name = str(Path(f"/proc/self/fd/{fd}").readlink())
        synced.append((name, _lock_is_free(db) if name == f"{db}-wal" else False, note()))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return synced


async def test_with_synchronous_full_an_op_is_synced_after_the_lock_is_released_and_before_it_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store.walsync: the writer thread commits without syncing under the write lock (the bulk child waits for that
    lock), then syncs the WAL itself; the op's future resolves only after that sync."""
    monkeypatch.setattr(writer_module, "_CHECKPOINT_S", 3600.0)  # only the writer's own syncs
    db = tmp_path / "bosun.db"
    writer, _ = await _writer(tmp_path)
    assert writer._cfg.synchronous == "FULL"
    pending: list[asyncio.Future[Any]] = []
    try:
        synced = _record_syncs(monkeypatch, db, lambda: [f.done() for f in pending])
        future = await writer.enqueue(lambda conn: conn.execute(_INSERT, ("d1", "t", 1.0, 1.0)).rowcount)
        pending.append(future)
        assert await future == 1
        wal = [entry for entry in synced if entry[0] == f"{db}-wal"]
        assert wal, synced
        assert all(free for _, free, _ in wal)  # the lock was free while the WAL was synced
        assert wal[-1][2] == [False]  # and the op had not resolved yet
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # a plain connection still gets FULL
    finally:
        await writer.stop()


def test_the_bulk_child_answers_after_syncing_the_wal_outside_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child (run here in-process on in-memory pipes) commits a group without syncing under the lock, then its
    answer thread syncs the WAL and only then writes the answer."""
    db = tmp_path / "bosun.db"
    conn = writer_module.connect(db)
    writer_module.migrate(conn)
    conn.close()
    events: list[str] = []

    class Out(io.BytesIO):
        def write(self, data: Any) -> int:
            events.append("answer")
            return super().write(data)

    synced = _record_syncs(monkeypatch, db, lambda: events.append("sync"))
    body = msgpack.packb([7, [[_INSERT, [("d1", "t", 1.0, 1.0), ("d2", "t", 2.0, 2.0)]]]])
    out = Out()
    bulkproc.serve(db, "FULL", io.BytesIO(_FRAME.pack(len(body)) + body), out)
    assert [(name, free) for name, free, _ in synced] == [(f"{db}-wal", True)]
    assert events == ["sync", "answer"]
    answer = out.getvalue()
    assert msgpack.unpackb(answer[4:]) == [7, None, 0, []]
    assert _count(db, "SELECT count(*) FROM measurements") == 2


def test_the_bulk_child_with_synchronous_normal_leaves_syncing_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "bosun.db"
    conn = writer_module.connect(db)
    writer_module.migrate(conn)
    conn.close()
    synced = _record_syncs(monkeypatch, db, lambda: None)
    body = msgpack.packb([1, [[_INSERT, [("d1", "t", 1.0, 1.0)]]]])
    out = io.BytesIO()
    bulkproc.serve(db, "NORMAL", io.BytesIO(_FRAME.pack(len(body)) + body), out)
    assert synced == [] and msgpack.unpackb(out.getvalue()[4:]) == [1, None, 0, []]


def test_the_wal_sync_follows_the_file_when_sqlite_makes_a_new_one(tmp_path: Path) -> None:
    """SQLite deletes the WAL when its last connection closes and creates it again at the next write: the sync
    does nothing while there is none and then syncs the new file, not the deleted one."""
    db = tmp_path / "bosun.db"
    wal_sync = WalSync(db)
    try:
        wal_sync()  # no database yet: nothing to sync
        conn = writer_module.connect(db)
        conn.execute("CREATE TABLE t (x)")
        wal_sync()
        first = os.stat(f"{db}-wal").st_ino
        conn.close()
        assert not Path(f"{db}-wal").exists()
        wal_sync()
        Path(f"{db}-wal").write_bytes(b"")  # take the old inode number out of reuse
        os.unlink(f"{db}-wal")
        conn = writer_module.connect(db)
        conn.execute("INSERT INTO t VALUES (1)")
        second = os.stat(f"{db}-wal").st_ino
        wal_sync()
        assert wal_sync._fd is not None and os.fstat(wal_sync._fd).st_ino == second != first
        conn.close()
    finally:
        wal_sync.close()


def test_sqlite_holds_no_lock_on_the_wal_file(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock this process holds on it. store.walsync opens and
    closes the WAL through descriptors of its own, which is safe only while SQLite locks the database and the -shm
    file and never the WAL (checked against /proc/locks while a write transaction is open)."""
    db = tmp_path / "bosun.db"
    conn = writer_module.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (1)")
    try:
        mine = set()
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields[1] in ("POSIX", "OFDLCK") and fields[4] == str(os.getpid()):
                mine.add(int(fields[5].split(":")[2]))
        assert os.stat(f"{db}-shm").st_ino in mine  # the check sees SQLite's locks
        assert os.stat(f"{db}-wal").st_ino not in mine
    finally:
        conn.execute("COMMIT")
        conn.close()
