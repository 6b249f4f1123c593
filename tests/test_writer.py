"""The store's two writers on a real SQLite file: the writer thread (ops) and the bulk child process (rows)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import StoreSection
from gateway.metrics import Metrics
from gateway.store import writer as writer_module
from gateway.store.bulk import _GROUP_ROWS, BulkWriter, Hold
from gateway.store.writer import Writer

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
        assert flushed and set(flushed) == {str(db)}
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
