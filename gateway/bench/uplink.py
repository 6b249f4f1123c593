"""`make bench-uplink` (`python -m gateway.bench.uplink`): drain a stored backlog to a local `bosun hq`.

A gateway's database is seeded with `--records` telemetry records as a fleet of sensors makes them (each
sensor publishes `{"temperature": t, "humidity": h}`, values on a random walk at one decimal, a message every
few milliseconds across the fleet) plus calls and device state; then `bosun hq` and `bosun run` start on free
loopback ports, and the clock runs from the gateway being ready to HQ holding every telemetry record.
Reported: records/s drained, bytes on the wire per telemetry record (batch payloads, from HQ's own count)
against the JSON the devices sent, CPU of both processes, and the issue's targets (at least 50,000 records/s;
at most 20 bytes per record). Figures also go to `--out` as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gateway.bench.procs import GatewayProc, Proc, free_port
from gateway.store.records import LANE_PRIORITY, LANE_STATE, outbox
from gateway.store.schema import connect, migrate

__all__ = ["main"]

TARGET_RATE = 50_000.0
TARGET_BYTES = 20.0
_GATEWAY_ID = "gw-bench"


def seed(db: Path, records: int, sensors: int, progress: Progress) -> tuple[int, int]:
    """Telemetry rows as ingest stores them, with calls and state between; returns (telemetry rows, JSON bytes)."""
    rng = random.Random(6)
    conn = connect(db)
    migrate(conn)
    level = {s: (20.0 + rng.uniform(-3, 3), 50.0 + rng.uniform(-10, 10)) for s in range(sensors)}
    json_bytes = rows_done = 0
    t = time.time() - records / 2 * 0.0005
    task = progress.add_task("seeding the gateway's backlog", total=records)
    conn.execute("BEGIN")
    chunk: list[tuple[str, str, float, float]] = []
    while rows_done < records:
        s = rng.randrange(sensors)
        temp, hum = level[s]
        temp, hum = round(temp + rng.uniform(-0.2, 0.2), 1), round(hum + rng.uniform(-0.5, 0.5), 1)
        level[s] = (temp, hum)
        t += rng.uniform(0, 0.001)  # ~2,000 messages/s across the fleet
        device = f"sensor-{s:04d}"
        # what the device sent; ingest stored one row per metric with the gateway's receive time
        json_bytes += len(json.dumps({"temperature": temp, "humidity": hum}))
        chunk += [(device, "temperature", t, temp), (device, "humidity", t, hum)]
        rows_done += 2
        if rows_done % 500 == 0:
            outbox(conn, LANE_PRIORITY, "call", {"id": rows_done, "state": "open", "room": "c1"}, "btn-1")
            outbox(conn, LANE_STATE, "device", {"device_id": device, "battery": 90}, device)
        if len(chunk) >= 50_000 or rows_done >= records:
            conn.executemany("INSERT INTO measurements(device_id, metric, ts, value) VALUES (?, ?, ?, ?)", chunk)
            progress.update(task, completed=rows_done)
            chunk = []
    conn.execute("COMMIT")
    conn.close()
    return rows_done, json_bytes


async def _hq_lanes(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    for g in (await client.get(f"{url}/api/v1/gateways")).json():
        if g["id"] == _GATEWAY_ID:
            return dict(g["lanes"])
    return {}


async def run(records: int, sensors: int, batch: int, workdir: Path, console: Console) -> dict[str, Any]:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
        TimeRemainingColumn(), console=console,
    )  # fmt: skip
    with progress:
        telemetry, json_bytes = await asyncio.to_thread(seed, workdir / "gw" / "bosun.db", records, sensors, progress)
    hq_port = free_port()
    hq_dir = workdir / "hq"
    added = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "hq", "--data-dir", str(hq_dir), "gateway", "add", _GATEWAY_ID],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    token = added.stdout.strip()
    reader = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "hq", "--data-dir", str(hq_dir), "token", "create", "--label", "bench"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    hq = Proc(
        "hq",
        [sys.executable, "-m", "gateway", "hq", "--data-dir", str(hq_dir), "--port", str(hq_port),
         "--log-level", "WARNING"],
        workdir / "hq.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{hq_port}"
    env = dict(os.environ)
    env.update(
        {
            "BOSUN_GATEWAY_ID": _GATEWAY_ID,
            "BOSUN_UPLINK_URL": url,
            "BOSUN_UPLINK_TOKEN": token,
            "BOSUN_UPLINK_BATCH_RECORDS": str(batch),
            "BOSUN_LOG_LEVEL": env.get("BOSUN_LOG_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    gw: GatewayProc | None = None
    try:
        read_auth = {"Authorization": f"Bearer {reader.stdout.strip()}"}
        async with httpx.AsyncClient(timeout=10, headers=read_auth) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"bosun hq did not start:\n{hq.log_tail()}") from None
                await asyncio.sleep(0.1)
            gw = GatewayProc(workdir / "gw", env, workdir / "gateway.log")
            await gw.wait_ready()
            started = time.perf_counter()
            cpu0 = (gw.cpu_seconds(), hq.cpu_seconds())
            with Progress(
                TextColumn("draining to HQ"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} records"),
                TimeRemainingColumn(), console=console,
            ) as bar:  # fmt: skip
                task = bar.add_task("drain", total=telemetry)
                lanes: dict[str, Any] = {}
                while True:
                    lanes = await _hq_lanes(client, url)
                    done = lanes.get("telemetry", {}).get("records", 0)
                    bar.update(task, completed=done)
                    if done >= telemetry:
                        break
                    if not gw.alive or not hq.alive:
                        raise RuntimeError(f"a process died:\n{gw.log_tail()}\n{hq.log_tail()}")
                    await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            cpu = (gw.cpu_seconds() - cpu0[0], hq.cpu_seconds() - cpu0[1])
    finally:
        if gw is not None:
            await gw.stop()
        await hq.stop()
    tel = lanes["telemetry"]
    total = sum(v["records"] for v in lanes.values())
    return {
        "records": total,
        "telemetry_records": tel["records"],
        "seconds": round(elapsed, 2),
        # the poll interval (0.1 s) bounds the error of the end time
        "records_per_s": round(total / elapsed),
        "telemetry_bytes_on_wire": tel["bytes"],
        "bytes_per_telemetry_record": round(tel["bytes"] / tel["records"], 2),
        "json_bytes_per_telemetry_record": round(json_bytes / telemetry, 2),
        "batches": sum(v["batches"] for v in lanes.values()),
        "batch_records": batch,
        "gateway_cpu_s": round(cpu[0], 2),
        "hq_cpu_s": round(cpu[1], 2),
        "duplicates": sum(v["duplicates"] for v in lanes.values()),
    }


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--records", type=click.IntRange(1000), default=1_000_000, show_default=True, help="Telemetry backlog.")
@click.option("--sensors", type=click.IntRange(1), default=200, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=10_000, show_default=True, help="uplink.batch_records")
@click.option("--out", type=click.Path(dir_okay=False), default="bench-uplink-results.json", show_default=True)
@click.option("--strict", is_flag=True, help="Exit 1 when a target fails.")
def main(records: int, sensors: int, batch: int, out: str, strict: bool) -> None:
    """Drain rate of a stored backlog to a local `bosun hq`, and bytes on the wire per telemetry record."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bosun-bench-uplink-") as tmp:
        (Path(tmp) / "gw").mkdir()
        figures = asyncio.run(run(records, sensors, batch, Path(tmp), console))
    table = Table(title=f"Uplink drain: {figures['records']:,} records to a local bosun hq")
    for column in ("figure", "measured", "target", "result"):
        table.add_column(column)
    rate_ok = figures["records_per_s"] >= TARGET_RATE
    bytes_ok = figures["bytes_per_telemetry_record"] <= TARGET_BYTES
    table.add_row("drain rate (records/s)", f"{figures['records_per_s']:,}", f">= {TARGET_RATE:,.0f}",
                  "PASS" if rate_ok else "FAIL")  # fmt: skip
    table.add_row(
        "bytes on the wire per telemetry record",
        f"{figures['bytes_per_telemetry_record']} (JSON sent: {figures['json_bytes_per_telemetry_record']})",
        f"<= {TARGET_BYTES:g}",
        "PASS" if bytes_ok else "FAIL",
    )
    table.add_row("time / batches", f"{figures['seconds']} s / {figures['batches']}", "", "")
    table.add_row("CPU gateway / hq (s)", f"{figures['gateway_cpu_s']} / {figures['hq_cpu_s']}", "", "")
    console.print(table)
    Path(out).write_text(json.dumps({"uplink": figures, "machine": _machine()}, indent=2) + "\n")
    console.print(f"figures written to {out}")
    if strict and not (rate_ok and bytes_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
