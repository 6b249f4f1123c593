"""The two scenarios: durable ingest (N devices publishing telemetry) and relay (one publisher, one wildcard
subscriber, many idle subscribers). Both are bounded in time: a slow broker gives low figures, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.bench import mqtt, stats
from gateway.bench.calls import CallProbe
from gateway.bench.loadgen import Client, Connection, Counters, Fleet, Pacer, connect_many, open_connection
from gateway.bench.probes import (
    COMMIT_HISTOGRAM,
    LagMonitor,
    LiveListener,
    RowCounter,
    histogram_delta,
    scrape_histogram,
)
from gateway.bench.procs import GatewayProc, Proc
from gateway.bench.seed import Device, Seeded

__all__ = ["DurablePlan", "DurableSession", "RelayPlan", "idle_clients", "relay"]

Report = Callable[[float, str], None]  # (fraction done, what is happening)
HOST = "127.0.0.1"
METRICS_PER_MESSAGE = 2  # each telemetry payload below carries two metrics: two measurement rows
SUSTAINED_SHARE = 0.95  # stored at least this share of the offered rate ...
SUSTAINED_P99_MS = 500.0  # ... with PUBACK p99 below this: no backlog building up


def _telemetry_payloads(variants: int = 64) -> list[bytes]:
    """44-byte JSON telemetry (DESIGN: a JSON object of metrics), padded to one length so each device's
    PUBLISH header is computed once."""
    rng = random.Random(7)
    return [
        json.dumps({"temperature": round(rng.uniform(18, 27.99), 2), "humidity": round(rng.uniform(30, 69.9), 1)})
        .encode()
        .ljust(44)
        for _ in range(variants)
    ]


@dataclass(frozen=True)
class DurablePlan:
    rate: float
    warmup: float
    window: float
    qos: int
    inflight: int
    probe_rate: float = 20.0
    drain: float = 5.0


class DurableSession:
    """The devices of one gateway instance, connected once and reused for each rate."""

    def __init__(self, gateway: GatewayProc, seeded: Seeded, root: str, http: httpx.AsyncClient, qos: int) -> None:
        self.gateway = gateway
        self.seeded = seeded
        self.root = root
        self.http = http
        self.qos = qos
        self.counters = Counters()
        self.samples: list[float] = []
        self.window = (float("inf"), float("inf"))
        self.fleet = Fleet()
        self.probe: Connection | None = None
        self.live = LiveListener(http, seeded.probe.device_id)
        self.calls = CallProbe(seeded.watch, seeded.caller, root)
        self.rows = RowCounter(seeded.data_dir / "bosun.db", "measurements")
        self.sequence = int(time.time()) * 1000
        self.rss_connected = 0
        self.press_times: list[float] = []

    def _on_ack(self, sent_at: float, acked_at: float) -> None:
        self.counters.acked += 1
        if self.window[0] <= sent_at < self.window[1]:
            self.samples.append(acked_at - sent_at)

    async def open(self, report: Report) -> dict[str, Any]:
        clients = [
            Client(d.device_id, d.device_id, d.password, ((d.topic(self.root, "cmd/#"), 1),))
            for d in self.seeded.devices
        ]
        self.fleet = await connect_many(
            HOST,
            self.gateway.mqtt_port,
            clients,
            on_ack=self._on_ack,
            progress=lambda done, ok, total: report(done / total, f"{ok}/{total} devices connected"),
        )
        self.fleet.start_pings()
        probe = self.seeded.probe
        try:  # without the probe or the stream there are no live-bus figures; everything else is still measured
            self.probe = await open_connection(
                HOST,
                self.gateway.mqtt_port,
                probe.device_id,
                probe.device_id,
                probe.password,
                ((probe.topic(self.root, "cmd/#"), 1),),
            )
            await self.live.start()
        except (OSError, RuntimeError, TimeoutError, PermissionError) as exc:
            self.live.error = f"{type(exc).__name__}: {exc}"
        await self.calls.open(HOST, self.gateway.mqtt_port)
        await asyncio.sleep(0.5)  # let the connect storm's presence writes settle
        self.rss_connected = self.gateway.rss_bytes()
        return {
            "devices": len(clients),
            "connected": len(self.fleet.conns),
            "failed": self.fleet.failed,
            "errors": self.fleet.errors,
            "connect_s": round(self.fleet.connect_s, 3),
            "rss_mb_connected": round(self.rss_connected / 1e6, 1),
        }

    async def run(self, plan: DurablePlan, report: Report) -> dict[str, Any]:
        conns = self.fleet.conns
        if not conns:
            return {"rate": plan.rate, "error": "no device connected"}
        payloads = _telemetry_payloads()
        size = len(payloads[0])
        headers = [mqtt.publish_header(d.topic(self.root, "telemetry"), plan.qos, size) for d in self._connected()]
        pacer = Pacer(conns, headers, payloads, plan.qos, plan.inflight, self.counters)
        started = time.monotonic()
        warm_end = started + plan.warmup
        end = warm_end + plan.window
        timeline: list[dict[str, float]] = []
        rss_peak = self.gateway.rss_bytes()
        sender = asyncio.create_task(pacer.run(plan.rate, end), name="bench-pacer")
        prober = asyncio.create_task(self._probe(plan.probe_rate, warm_end, end), name="bench-probe")
        caller = asyncio.create_task(self.calls.run(warm_end, end), name="bench-calls")
        monitor = LagMonitor()
        lag: dict[str, Any] = {}
        try:
            await _sleep_until(warm_end, started, end, report, "warm-up", self.counters)
            before = await self._snapshot()
            self.window = (before["t"], end)
            self.samples.clear()
            monitor.start()
            last = before
            mark = 0
            while time.monotonic() < end - 0.05:
                await _sleep_until(min(last["t"] + 1.0, end), started, end, report, "measuring", self.counters)
                now = await self._snapshot(histogram=False)
                span = now["t"] - last["t"]
                second = self.samples[mark:]
                mark = len(self.samples)
                timeline.append(
                    {
                        "t": round(now["t"] - before["t"], 2),
                        "acked_per_s": round((now["counters"].acked - last["counters"].acked) / span, 1),
                        "stored_per_s": round((now["rows"] - last["rows"]) / METRICS_PER_MESSAGE / span, 1),
                        # the PUBACKs of this second: where in the run the tail is
                        "puback_p99_ms": round(stats.percentile(sorted(second), 99) * 1000, 1) if second else 0.0,
                    }
                )
                rss_peak = max(rss_peak, self.gateway.rss_bytes())
                last = now
            await sender
            after = await self._snapshot()
            lag = await monitor.stop()
        finally:
            await monitor.stop()
            sender.cancel()
            prober.cancel()
            caller.cancel()
            await asyncio.gather(sender, prober, caller, return_exceptions=True)
        index_behind = await self._index_behind()  # before the drain: the state the window ended in
        unacked = await self._drain(plan.drain, report)
        figures = self._figures(plan, before, after, timeline, rss_peak, unacked, lag)
        figures["index_behind_rows"] = index_behind
        return figures

    async def _index_behind(self) -> int | None:
        """Rows the measurements index had not reached at the end of the window (/healthz): it waits through
        bursts (gateway/store/indexer.py), so a short window may not include its work."""
        try:
            response = await self.http.get("/healthz")
            behind = response.json()["index"]["behind_rows"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return int(behind)

    def _connected(self) -> list[Device]:
        """The seeded devices whose connection succeeded, in the fleet's order."""
        by_id = {d.device_id: d for d in self.seeded.devices}
        return [by_id[c.client_id] for c in self.fleet.conns]

    async def _snapshot(self, histogram: bool = True) -> dict[str, Any]:
        """The figures at one instant: counters and CPU first (no await), then the stored rows (a millisecond),
        then the histogram (an HTTP request that can take a while on a busy gateway: it must not stretch the
        window)."""
        snap: dict[str, Any] = {
            "t": time.monotonic(),
            "counters": self.counters.copy(),
            "cpu": self.gateway.cpu_seconds(),
            "client_cpu": time.process_time(),
        }
        snap["rows"] = await self.rows.max_id()
        snap["commit"] = await scrape_histogram(self.http, COMMIT_HISTOGRAM) if histogram else None
        return snap

    async def _probe(self, rate: float, start: float, end: float) -> None:
        """Guest presses from the probe button, each with a unique sequence id, timed to the SSE stream."""
        if self.probe is None or self.live.error is not None:
            return
        topic = self.seeded.probe.topic(self.root, "press")
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        next_at = time.monotonic()
        while next_at < end:
            self.sequence += 1
            payload = {
                "timestamp": time.time(),
                "press_type": "single",
                "duration": 120,
                "sequence_id": self.sequence,
                "priority": "normal",
            }
            now = time.monotonic()
            self.live.expect(self.sequence, now)
            self.press_times.append(now)
            self.probe.send_publish(topic, json.dumps(payload).encode(), 1, now)
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _drain(self, within: float, report: Report) -> int:
        """Wait for outstanding PUBACKs and presses (bounded); returns how many PUBACKs never came."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            waiting = sum(len(c.inflight) for c in self.fleet.conns if c.alive)
            if not waiting and not any(t < self.window[1] for t in self.live.sent.values()):
                break
            report(1.0, f"draining: {waiting} PUBACKs outstanding")
            await asyncio.sleep(0.1)
        unacked = sum(1 for c in self.fleet.conns for t in c.inflight.values() if self.window[0] <= t < self.window[1])
        for conn in self.fleet.conns:
            conn.inflight.clear()  # the next rate starts from an empty window
        return unacked

    def _figures(
        self,
        plan: DurablePlan,
        before: dict[str, Any],
        after: dict[str, Any],
        timeline: list[dict[str, float]],
        rss_peak: int,
        unacked: int,
        lag: dict[str, Any],
    ) -> dict[str, Any]:
        span = after["t"] - before["t"]
        c: Counters = after["counters"].minus(before["counters"])
        stored = (after["rows"] - before["rows"]) / METRICS_PER_MESSAGE
        puback = stats.summary(self.samples) if plan.qos else None
        live = stats.summary(self.live.latencies(self.window))
        live_sent = sum(1 for t in self.press_times if self.window[0] <= t < self.window[1])
        figures: dict[str, Any] = {
            "rate": plan.rate,
            "qos": plan.qos,
            "inflight": plan.inflight,
            "devices": len(self.fleet.conns),
            "devices_alive_at_end": self.fleet.alive,
            "window_s": round(span, 3),
            "offered": c.offered,
            "sent": c.sent,
            "acked": c.acked,
            "blocked": c.blocked,
            "unacked": unacked,
            "offered_per_s": round(c.offered / span, 1),
            "sent_per_s": round(c.sent / span, 1),
            "acked_per_s": round(c.acked / span, 1),
            "stored": int(stored),
            "stored_per_s": round(stored / span, 1),
            "puback_ms": puback,
            "commit_ms": histogram_delta(before["commit"], after["commit"]),
            "live_ms": {**live, "sent": live_sent, "lost": live_sent - live["count"], "error": self.live.error},
            "notify_ms": self.calls.figures(self.window),
            "cpu_percent": round(100 * (after["cpu"] - before["cpu"]) / span, 1),
            "client_cpu_percent": round(100 * (after["client_cpu"] - before["client_cpu"]) / span, 1),
            "client_loop_lag_ms": lag,
            "rss_mb_peak": round(rss_peak / 1e6, 1),
            "timeline": timeline,
        }
        p99 = puback["p99"] if puback else None
        figures["sustained"] = bool(
            figures["stored_per_s"] >= SUSTAINED_SHARE * plan.rate and (p99 is None or p99 < SUSTAINED_P99_MS)
        )
        return figures

    async def close(self) -> None:
        await self.live.stop()
        self.calls.close()
        if self.probe is not None:
            self.probe.close()
        await self.fleet.close()
        self.rows.close()


async def _sleep_until(when: float, started: float, end: float, report: Report, phase: str, c: Counters) -> None:
    while True:
        now = time.monotonic()
        if now >= when:
            return
        report((now - started) / (end - started), f"{phase}: {c.sent:,} sent, {c.acked:,} acked, {c.blocked:,} blocked")
        await asyncio.sleep(min(0.25, when - now))


def idle_clients(count: int, prefix: str) -> list[Client]:
    """Anonymous idle subscribers, each on its own filter (like a device on its `cmd/#`)."""
    return [Client(f"{prefix}-idle-{i:05d}", None, None, ((f"{prefix}/idle/{i}/cmd/#", 1),)) for i in range(count)]


@dataclass(frozen=True)
class RelayPlan:
    qos: int
    messages: int
    inflight: int  # QoS 1 PUBLISHes the publisher keeps unacknowledged
    deadline: float  # seconds for the whole run
    stall: float = 5.0  # seconds without a delivery (after the last send) that end the run
    payload_bytes: int = 64


async def relay(port: int, broker: Proc, plan: RelayPlan, prefix: str, tag: str, report: Report) -> dict[str, Any]:
    """One publisher sends `messages` as fast as it may, one subscriber on `{prefix}/relay/{tag}/#` counts them."""
    state = {"received": 0, "first": 0.0, "last": 0.0, "acked": 0}

    def on_message(topic: str, payload: bytes, now: float) -> None:
        state["received"] += 1
        state["last"] = now

    def on_ack(sent_at: float, acked_at: float) -> None:
        state["acked"] += 1

    subscriber = await open_connection(
        HOST, port, f"{prefix}-sub-{tag}", filters=((f"{prefix}/relay/{tag}/#", plan.qos),), on_message=on_message
    )
    publisher = await open_connection(HOST, port, f"{prefix}-pub-{tag}", on_ack=on_ack)
    sent = [0]
    header = mqtt.publish_header(f"{prefix}/relay/{tag}/data", plan.qos, plan.payload_bytes)
    payload = b"x" * plan.payload_bytes
    cpu_before = broker.cpu_seconds()
    started = time.monotonic()
    state["first"] = started
    sender = asyncio.create_task(_publish_all(publisher, header, payload, plan, sent), name="bench-relay-pub")
    try:
        last_progress, seen = started, 0
        while True:
            now = time.monotonic()
            if state["received"] != seen:
                last_progress, seen = now, int(state["received"])
            if seen >= plan.messages or now - started > plan.deadline:
                break
            if sender.done() and now - last_progress > plan.stall:
                break
            if not subscriber.alive:
                break
            report(seen / plan.messages, f"{sent[0]:,} sent, {seen:,} received")
            await asyncio.sleep(0.02)
        cpu_after = broker.cpu_seconds()
        # QoS 1: the publisher's last PUBACKs may trail the last delivery (the gateway acks after COMMIT)
        if plan.qos:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(5.0, started + plan.deadline - time.monotonic()))):
                    await publisher.window_below(0)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        subscriber.close()
        publisher.close()
    received = int(state["received"])
    elapsed = (state["last"] - started) if received else time.monotonic() - started
    cpu = cpu_after - cpu_before
    return {
        "qos": plan.qos,
        "messages": plan.messages,
        "sent": sent[0],
        "received": received,
        "acked": int(state["acked"]) if plan.qos else None,
        "complete": received >= plan.messages,
        "seconds": round(elapsed, 3),
        "rate": round(received / elapsed, 1) if received and elapsed > 0 else 0.0,
        "broker_cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / received * 1e6, 1) if received else None,
        "broker_cpu_percent": round(100 * cpu / elapsed, 1) if elapsed > 0 else None,
    }


async def _publish_all(conn: Connection, header: bytes, payload: bytes, plan: RelayPlan, sent: list[int]) -> None:
    batch = 100
    qos1 = plan.qos == 1
    while sent[0] < plan.messages and conn.alive:
        await conn.writable()
        if qos1:
            await conn.window_below(max(0, plan.inflight - batch))
        now = time.monotonic()
        count = min(batch, plan.messages - sent[0])
        if qos1:
            parts = []
            for _ in range(count):
                pid = conn.next_pid()
                conn.inflight[pid] = now
                parts.append(b"".join((header, pid.to_bytes(2, "big"), payload)))
            conn.write(b"".join(parts))
        else:
            conn.write((header + payload) * count)
        sent[0] += count
        await asyncio.sleep(0)  # let the subscriber's reads in (same loop)
