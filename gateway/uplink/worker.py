"""The uplink worker: drains the outbox lanes to HQ in priority order, one confirmed batch at a time.

Each turn takes the first lane (priority, then state, then telemetry) that has records after its cursor and
may send now (not stopped by a refusal; state and telemetry only inside `uplink.window`), packs one batch on
the reader thread, paces it (`uplink.max_bytes_per_s`), sends it, and on HQ's answer advances the lane's
durable cursor through the writer. A link failure backs every lane off (exponential, full jitter, capped;
HTTP 429's Retry-After wins); a refusal (HTTP 4xx other than 408/429) stops that lane until restart, with the
error in /healthz and `GET /api/v1/uplink`. After a success the next batch goes at once: a link that comes
back drains at full speed, and a call made meanwhile overtakes the telemetry backlog at the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import StoreSection, UplinkSection
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.retention import used_bytes
from gateway.store.reader import Reader
from gateway.store.records import LANE_PRIORITY, LANE_TELEMETRY, LANES
from gateway.store.walsync import WalSync
from gateway.store.writer import Writer
from gateway.uplink import policy, source
from gateway.uplink.sink import RefusedError, Sink, SinkError, TransientError

__all__ = ["Uplink"]

log = logging.getLogger(__name__)
_IDLE_POLL_S = 0.5
_STATUS_S = 5.0
_RUNWAY_WINDOW_S = 120.0
PACKING = sys.maxsize  # in_flight while a batch is being read: its last sequence is not known yet


@dataclass
class LaneState:
    stopped: str | None = None  # a refusal's message: the lane sends nothing until restart
    in_flight: int = 0  # last sequence of the batch being sent, PACKING while one is read (retention waits)
    wire_per_record: float = 0.0


@dataclass
class _Sample:
    at: float
    used: int
    freed: int
    top_id: int


@dataclass
class Status:
    """The last computed view, served by /healthz without touching the database."""

    backlog: dict[str, dict[str, Any]] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    runway_s: float | None = None
    used_bytes: int = 0
    inflow_bytes_per_s: float = 0.0


class Uplink:
    def __init__(
        self,
        cfg: UplinkSection,
        store: StoreSection,
        db_path: Path,
        writer: Writer,
        metrics: Metrics,
        freed_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        self._cfg = cfg
        self._budget = store.max_db_mb * 1024 * 1024
        self._writer = writer
        self._metrics = metrics
        self._freed_bytes = freed_bytes
        self._reader = Reader(db_path, name="bosun-uplink-reader")
        self._wal_sync = WalSync(db_path)
        self._sink: Sink | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pacer = policy.Pacer(cfg.max_bytes_per_s)
        self._samples: collections.deque[_Sample] = collections.deque()
        self._sends: collections.deque[tuple[float, int]] = collections.deque()
        self.gateway_id = ""
        self.epoch = ""
        self.lanes = {lane: LaneState() for lane in LANES}
        self.connected = False
        self.failures = 0  # failed sends in a row
        self.retry_at: float | None = None  # wall time of the next attempt while backing off
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.status = Status()

    @property
    def enabled(self) -> bool:
        return bool(self._cfg.url)

    def in_flight(self, lane: str) -> int:
        """Last sequence of `lane` being sent right now (0: none); retention does not evict those."""
        return self.lanes[lane].in_flight

    async def start(self, gateway_id: str, sink: Sink | None = None) -> None:
        self.gateway_id = gateway_id
        await self._reader.start()
        self.epoch = await self._reader.call(source.epoch)
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._status_loop(), name="bosun-uplink-status"))
        if self.enabled:
            self._sink = sink or self._make_sink()
            self._tasks.append(asyncio.create_task(self._run(), name="bosun-uplink"))
            log.info("uplink to %s (gateway id %s)", self._cfg.url, gateway_id)

    def _make_sink(self) -> Sink:
        if self._cfg.url.startswith("mqtt"):
            from gateway.uplink.bridge import MqttSink

            return MqttSink(self._cfg, self.gateway_id)
        from gateway.uplink.http import HttpSink

        return HttpSink(self._cfg)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._sink is not None:
            await self._sink.close()
        await self._reader.stop()
        self._wal_sync.close()

    # --- sending ---------------------------------------------------------------------------------------

    def _eligible(self) -> list[str]:
        now = time.localtime()
        open_window = policy.in_window(self._cfg.window, now.tm_hour, now.tm_min)
        return [lane for lane in LANES if self.lanes[lane].stopped is None and (lane == LANE_PRIORITY or open_window)]

    async def _run(self) -> None:
        while True:
            try:
                await self._turn()
            except (sqlite3.Error, StoreError) as exc:
                # the database refused a read or the cursor's write: nothing was acknowledged, so the same batch
                # goes again after a pause; the loop must outlive it
                self.last_error = f"database: {exc}"
                self._metrics.uplink_errors.labels("store").inc()
                log.error("uplink: %s; retrying in %d s", self.last_error, _IDLE_POLL_S * 10)
                await asyncio.sleep(_IDLE_POLL_S * 10)

    async def _turn(self) -> None:
        """One batch from the first lane that has one, or a short idle wait."""
        packed = None
        for lane in self._eligible():
            # set before the read: retention must not evict rows that this batch may be reading right now
            self.lanes[lane].in_flight = PACKING
            try:
                packed = await self._reader.call(lambda c, lane=lane: self._pack(c, lane))  # type: ignore[misc]
            finally:
                self.lanes[lane].in_flight = packed.last if packed is not None else 0
            if packed is not None:
                break
        if packed is None:
            # polled: new rows come from the writer and the bulk child, which know nothing of the uplink
            await asyncio.sleep(_IDLE_POLL_S)
            return
        await self._send(packed)

    def _pack(self, conn: sqlite3.Connection, lane: str) -> source.Packed | None:
        """On the reader thread: the lane's next batch, on disk before it can leave (store.walsync: the writers
        sync a commit just after other connections can see it)."""
        packed = source.pack_next(conn, self.gateway_id, lane, self._cfg.batch_records, self.epoch)
        if packed is not None:
            try:
                self._wal_sync()
            except OSError as exc:
                raise StoreError(f"the WAL could not be synced: {exc}") from exc
        return packed

    async def _send(self, packed: source.Packed) -> None:
        assert self._sink is not None
        lane = self.lanes[packed.lane]
        wait = self._pacer.delay(len(packed.payload), time.monotonic())
        if wait:
            await asyncio.sleep(wait)
        lane.in_flight = packed.last
        try:
            acked = await self._sink.send(packed.lane, packed.key, packed.payload, packed.last)
        except RefusedError as exc:
            lane.in_flight = 0
            lane.stopped = str(exc)
            self.last_error = str(exc)
            self._metrics.uplink_errors.labels("refused").inc()
            log.error("uplink lane %s stopped: %s", packed.lane, exc)
            return
        except SinkError as exc:
            lane.in_flight = 0
            await self._back_off(exc)
            return
        try:
            if acked < packed.first - 1:
                log.warning(
                    "HQ has %s only up to %d, below this gateway's cursor %d", packed.lane, acked, packed.first - 1
                )
            await self._writer.run(lambda c: source.acknowledge(c, packed, acked))
        finally:
            lane.in_flight = 0
        now = time.time()
        self.connected, self.failures, self.retry_at, self.last_success = True, 0, None, now
        self._sends.append((time.monotonic(), packed.records))
        lane.wire_per_record = len(packed.payload) / packed.records
        m = self._metrics
        m.uplink_sent_records.labels(packed.lane).inc(packed.records)
        m.uplink_sent_bytes.labels(packed.lane).inc(len(packed.payload))
        m.uplink_wire_bytes_per_record.labels(packed.lane).set(lane.wire_per_record)
        m.uplink_last_success.set(now)
        m.uplink_connected.set(1)

    async def _back_off(self, exc: SinkError) -> None:
        self.connected = False
        self.failures += 1
        self.last_error = str(exc)
        hint = exc.retry_after if isinstance(exc, TransientError) else None
        delay = hint if hint is not None else policy.backoff(self.failures, self._cfg.backoff_max_s)
        self.retry_at = time.time() + delay
        self._metrics.uplink_errors.labels("retry_after" if hint is not None else "transient").inc()
        self._metrics.uplink_connected.set(0)
        log.warning("uplink: %s; retrying in %.1f s", exc, delay)
        await asyncio.sleep(delay)

    def send_rate(self) -> float:
        """Records per second confirmed over the last 10 s."""
        horizon = time.monotonic() - 10
        while self._sends and self._sends[0][0] < horizon:
            self._sends.popleft()
        return sum(n for _, n in self._sends) / 10

    # --- visibility ------------------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_S)
            try:
                await self.refresh()
            except Exception:  # a failed status read must not end the status loop; the next one retries
                log.exception("uplink status refresh failed")

    async def refresh(self) -> Status:
        """Backlog, losses and runway from the database; updates the gauges."""

        def read(conn: Any) -> tuple[dict[str, source.Backlog], dict[str, int], int, int, int, int]:
            lanes = source.backlog(conn)
            lost = {lane: n for lane, n in conn.execute("SELECT lane, lost FROM uplink_lanes")}
            top, bottom = conn.execute(
                "SELECT coalesce((SELECT max(id) FROM measurements), 0), "
                "coalesce((SELECT min(id) FROM measurements), 0)"
            ).fetchone()
            acked = source.cursors(conn).get(LANE_TELEMETRY, 0)
            return lanes, lost, used_bytes(conn), int(top), int(bottom), acked

        lanes, lost, used, top, bottom, acked = await self._reader.call(read)
        now = time.time()
        self._samples.append(_Sample(now, used, self._freed_bytes(), top))
        while len(self._samples) > 2 and now - self._samples[0].at > _RUNWAY_WINDOW_S:
            self._samples.popleft()
        first = self._samples[0]
        span = now - first.at
        inflow = rows_rate = 0.0
        if span > 0:
            inflow = max(0.0, (used - first.used + self._freed_bytes() - first.freed) / span)
            rows_rate = max(0.0, (top - first.top_id) / span)
        # measurements HQ already has are what retention deletes first: they lengthen the runway
        synced = max(0, min(acked, top) - bottom + 1) if top and bottom else 0
        reclaimable = int(synced * inflow / rows_rate) if rows_rate > 0 else 0
        status = Status(
            backlog={},
            lost=lost,
            runway_s=policy.runway_s(self._budget, used, reclaimable, inflow),
            used_bytes=used,
            inflow_bytes_per_s=inflow,
        )
        m = self._metrics
        for lane, b in lanes.items():
            wire = (
                int(b.records * self.lanes[lane].wire_per_record)
                if lane == LANE_TELEMETRY or not b.body_bytes
                else b.body_bytes
            )
            age = max(0.0, now - b.oldest) if b.oldest is not None else 0.0
            status.backlog[lane] = {"records": b.records, "bytes": wire, "oldest_age_s": round(age, 1)}
            m.uplink_backlog_records.labels(lane).set(b.records)
            m.uplink_backlog_bytes.labels(lane).set(wire)
            m.uplink_oldest_age.labels(lane).set(age)
            m.uplink_lost.labels(lane).set(lost.get(lane, 0))
        m.uplink_runway.set(status.runway_s if status.runway_s is not None else -1)
        self.status = status
        return status

    def health(self) -> dict[str, Any]:
        """The uplink's state for /healthz and `GET /api/v1/uplink` (from the last refresh)."""
        s = self.status
        return {
            "enabled": self.enabled,
            "url": self._cfg.url or None,
            "connected": self.connected,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "failures_in_a_row": self.failures,
            "retry_at": self.retry_at,
            "send_rate": round(self.send_rate(), 1),
            "window": self._cfg.window or None,
            "lanes": {
                lane: {
                    **s.backlog.get(lane, {"records": 0, "bytes": 0, "oldest_age_s": 0.0}),
                    "lost": s.lost.get(lane, 0),
                    "stopped": st.stopped,
                    "wire_bytes_per_record": round(st.wire_per_record, 2),
                }
                for lane, st in self.lanes.items()
            },
            "runway_s": None if s.runway_s is None else round(s.runway_s),
            "db_used_bytes": s.used_bytes,
            "db_budget_bytes": self._budget,
            "db_inflow_bytes_per_s": round(s.inflow_bytes_per_s, 1),
        }
