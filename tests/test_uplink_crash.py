"""kill -9 of HQ, of the gateway, or of both, at random points of a drain, over several rounds: HQ still
ends with every record exactly once, in order. `make soak-uplink` runs it longer
(BOSUN_SOAK_ROUNDS, BOSUN_SOAK_RECORDS)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import start_gateway
from test_hq import Hq
from test_uplink import fill, free_port

from gateway.store.schema import connect, migrate

ROUNDS = int(os.environ.get("BOSUN_SOAK_ROUNDS", "4"))
RECORDS = int(os.environ.get("BOSUN_SOAK_RECORDS", "120000"))


def _count(hq: Hq) -> int:
    try:
        conn = sqlite3.connect(f"file:{hq.data_dir / 'hq.db'}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(conn.execute("SELECT count(*) FROM measurements").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.timeout(900)
def test_kill_9_of_hq_and_gateway_mid_drain_still_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(os.environ.get("BOSUN_SOAK_SEED", str(time.time_ns() % 10**6)))
    rng = random.Random(seed)
    print(f"seed {seed}")  # re-run a failure with BOSUN_SOAK_SEED
    data = tmp_path / "var"
    data.mkdir()
    conn = connect(data / "bosun.db")
    migrate(conn)
    conn.execute("BEGIN")
    for start in range(1, RECORDS + 1, 50_000):
        fill(conn, start, min(50_000, RECORDS + 1 - start))
    conn.execute("COMMIT")
    expected = conn.execute("SELECT id, device_id FROM measurements ORDER BY id").fetchall()
    outbox = conn.execute("SELECT lane, count(*) FROM outbox GROUP BY lane").fetchall()
    conn.close()

    hq = Hq(tmp_path / "hq", free_port())
    token = hq.add_gateway("gw-soak")
    hq.start()
    for name, value in {
        "BOSUN_GATEWAY_ID": "gw-soak",
        "BOSUN_UPLINK_URL": hq.url,
        "BOSUN_UPLINK_TOKEN": token,
        "BOSUN_UPLINK_BACKOFF_MAX_S": "1",
        "BOSUN_UPLINK_BATCH_RECORDS": "500",  # many batches: many points to be killed at
    }.items():
        monkeypatch.setenv(name, value)
    gw, _, _ = start_gateway(data)
    mid_drain = 0
    try:
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0.1, 1.0))
            stored = _count(hq)
            mid_drain += 0 < stored < len(expected)
            victim = rng.choice(["hq", "gateway", "both"])
            if victim in ("hq", "both"):
                assert hq.proc is not None
                _kill(hq.proc)
            if victim in ("gateway", "both"):
                _kill(gw)
            time.sleep(rng.uniform(0, 0.5))
            if victim in ("hq", "both"):
                hq.start()
            if victim in ("gateway", "both"):
                gw, _, _ = start_gateway(data)
        deadline = time.monotonic() + 240
        while _count(hq) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.5)
        hq_conn = sqlite3.connect(hq.data_dir / "hq.db")
        try:
            got = hq_conn.execute("SELECT seq, device_id FROM measurements ORDER BY id").fetchall()
            records = hq_conn.execute(
                "SELECT lane, count(*), count(DISTINCT seq) FROM records GROUP BY lane"
            ).fetchall()
        finally:
            hq_conn.close()
        assert len(got) == len(expected), f"{len(got)} of {len(expected)} at HQ (seed {seed})"
        assert got == expected, f"not exactly once in order (seed {seed})"
        by_lane = {lane: (n, distinct) for lane, n, distinct in records}
        for lane, n in outbox:
            assert by_lane[lane][0] == by_lane[lane][1] >= n, (lane, by_lane, seed)
        print(f"{ROUNDS} rounds, {mid_drain} kills mid-drain, {len(expected)} measurements exactly once")
        assert mid_drain, f"no kill landed mid-drain: the test proved nothing (seed {seed})"
    finally:
        gw.terminate()
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            _kill(gw)
        hq.stop()
