"""What the benchmark reads from the gateway: the /metrics histogram, the live-bus SSE stream, stored rows.

Also the client's own event-loop lag: if the load generator's loop lags, its latency figures include that
lag, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.bench import stats

__all__ = ["COMMIT_HISTOGRAM", "LagMonitor", "LiveListener", "RowCounter", "histogram_delta", "scrape_histogram"]

COMMIT_HISTOGRAM = "bosun_ingest_commit_seconds"
Buckets = dict[float, float]


async def scrape_histogram(client: httpx.AsyncClient, name: str) -> Buckets | None:
    """Cumulative bucket counts {upper bound: count} of histogram `name` on /metrics, None if absent."""
    try:
        response = await client.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    buckets: Buckets = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and "le" in sample.labels:
                bound = math.inf if sample.labels["le"] in ("+Inf", "Inf") else float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets or None


def histogram_delta(before: Buckets | None, after: Buckets | None) -> dict[str, Any] | None:
    """p50/p99 in milliseconds of what the histogram saw between two scrapes (None if it does not exist)."""
    if after is None:
        return None
    start = before or {}
    delta = {bound: count - start.get(bound, 0.0) for bound, count in after.items()}
    count = delta.get(math.inf, 0.0)
    p50 = stats.bucket_quantile(delta, 0.5)
    p99 = stats.bucket_quantile(delta, 0.99)
    finite = [bound for bound in delta if bound != math.inf]
    top = max(finite, default=0.0)
    return {
        "count": int(count),
        "p50": None if p50 is None else round(p50 * 1000, 3),
        "p99": None if p99 is None else round(p99 * 1000, 3),
        # the p99 lies beyond the highest bucket: the histogram only says "at least this"
        "p99_beyond_buckets": bool(finite) and count > 0 and delta.get(top, 0.0) < 0.99 * count,
    }


class RowCounter:
    """Highest row id of a table, read-only from the gateway's SQLite file (committed rows only, WAL)."""

    def __init__(self, db_path: Path, table: str) -> None:
        self._sql = f"SELECT coalesce(max(id), 0) FROM {table}"
        self._conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        self._lock = asyncio.Lock()

    async def max_id(self) -> int:
        async with self._lock:  # one query at a time on the connection
            return await asyncio.to_thread(lambda: int(self._conn.execute(self._sql).fetchone()[0]))

    def close(self) -> None:
        self._conn.close()


class LiveListener:
    """Reads /api/v1/live and times each `event.press` of the probe device against its send time."""

    def __init__(self, client: httpx.AsyncClient, device_id: str) -> None:
        self._client = client
        self._device_id = device_id
        self.sent: dict[int, float] = {}
        self.arrivals: list[tuple[float, float]] = []  # (sent at, latency) of every press seen
        self.received = 0
        self.error: str | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    async def start(self, within: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-sse")
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._ready)
        except TimeoutError:
            self._task.cancel()
            raise

    def expect(self, sequence_id: int, sent_at: float) -> None:
        self.sent[sequence_id] = sent_at

    async def _run(self) -> None:
        try:
            timeout = httpx.Timeout(10, read=None)
            async with self._client.stream("GET", "/api/v1/live", timeout=timeout) as response:
                response.raise_for_status()
                event: str | None = None
                async for line in response.aiter_lines():
                    if line.startswith(":") and not self._ready.done():
                        self._ready.set_result(None)
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "event.press":
                        self._on_press(line[5:].strip(), time.monotonic())
                    elif not line:
                        event = None
        except (httpx.HTTPError, ValueError) as exc:
            self.error = repr(exc)
            if not self._ready.done():
                self._ready.set_exception(RuntimeError(f"/api/v1/live: {exc!r}"))

    def _on_press(self, data: str, now: float) -> None:
        body = json.loads(data)
        if body.get("device_id") != self._device_id:
            return
        sent_at = self.sent.pop(body.get("sequence_id"), None)
        if sent_at is None:
            return
        self.received += 1
        self.arrivals.append((sent_at, now - sent_at))

    def latencies(self, window: tuple[float, float]) -> list[float]:
        """Latencies of the presses sent within `window` (decided at the end: the window's start is only
        known after an await, and a press may arrive meanwhile)."""
        return [latency for sent_at, latency in self.arrivals if window[0] <= sent_at < window[1]]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class LagMonitor:
    """How late this process's event loop wakes up (its own load can distort client-side latencies)."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def watch() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(self.every)
                self.samples.append(max(0.0, time.monotonic() - before - self.every))

        self._task = asyncio.create_task(watch(), name="bench-lag")

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return stats.summary(self.samples)
