"""Ingest: classify every accepted PUBLISH and turn it into one write for the writer.

Routes (DESIGN, device protocol): `status` and `heartbeat` update the device, `availability` drives presence,
`press` becomes an event deduplicated by (device, sequence_id), telemetry becomes measurement rows, `ack`
updates the command it names; every message also goes to the bounded traffic log. Nothing here raises into
the broker: bad topics, unknown devices and unparseable payloads are counted by reason and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import codec, telemetry, topics
from gateway.accounts import Accounts
from gateway.calls.flow import SEND
from gateway.config import Config
from gateway.errors import PayloadError, TopicError
from gateway.hub import Hub
from gateway.metrics import Metrics, observe_many
from gateway.presence import Presence
from gateway.store.records import LANE_PRIORITY, outbox
from gateway.store.writer import Writer
from gateway.telemetry import MEASUREMENT_SQL, NO_MEASUREMENTS, TRAFFIC_SQL

if TYPE_CHECKING:
    from gateway.calls.service import Calls

__all__ = ["Ingest", "Message"]

log = logging.getLogger(__name__)

_ACK_STATUSES = {"received", "accepted", "declined", "done", "error"}
_PRIORITIES = {"normal", "urgent", "emergency"}
_CALL_KINDS = {SEND, "call"}  # outcome items the calls service publishes after the COMMIT


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us per PUBLISH
class Message:
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float


class Ingest:
    calls: Calls | None = None  # set by the runtime once the broker exists: presses open calls, acks answer them

    def __init__(
        self, cfg: Config, writer: Writer, accounts: Accounts, presence: Presence, hub: Hub, metrics: Metrics
    ) -> None:
        self._root = cfg.mqtt.root
        self._max_payload = cfg.mqtt.max_payload
        self._keep = cfg.store.traffic_payload_bytes
        self._writer = writer
        self._accounts = accounts
        self._presence = presence
        self._hub = hub
        self._metrics = metrics
        self._latency = metrics.commit_latency
        self._prefix = f"{self._root}/"
        self._traffic_rate = cfg.store.traffic_rate
        self._traffic_burst = float(cfg.store.traffic_rate)
        self._tokens = float(cfg.store.traffic_rate)
        self._refilled = time.monotonic()
        self._refill_pending = False  # the bucket was refilled this loop turn
        self._skipped = metrics.traffic_skipped
        self._counters: dict[str, Any] = {}
        # per device topic (each device uses a few): (parsed, action, its message counter, the device check's error
        # or None, the registry it was checked against, the metric name when it is a telemetry topic that passed
        # the check, else None); worked out again when the registry is reloaded
        self._topics: dict[str, tuple[topics.DeviceTopic, str, Any, str | None, object, str | None]] = {}
        # counter increments of this loop turn, applied once at its end (prometheus takes a lock per inc)
        self._tallies: dict[Any, float] = {}
        self._stored_measurements = metrics.stored.labels("measurements")
        self._child_decodes = writer.decodes_telemetry
        writer.on_telemetry(self._telemetry_done)
        self._tracked: asyncio.Future[Any] | None = None
        self._times: list[float] = []

    def _drop(self, reason: str, msg: Message, detail: str) -> None:
        self._refused(reason, msg.client_id, msg.topic, detail)

    def _refused(self, reason: str, client_id: str, topic: str, detail: str) -> None:
        self._metrics.drops.labels(reason).inc()
        log.warning("dropped %s from %s on %r: %s", reason, client_id, topic, detail)

    async def accept(self, msg: Message) -> asyncio.Future[Any] | None:
        """Queue the message's write; waits while the writer is full (backpressure on the publisher)."""
        await self._writer.wait_room()
        return self.submit(msg)

    def submit(self, msg: Message) -> asyncio.Future[Any] | None:
        """Queue the message's rows now; the future resolves at the COMMIT that stores them.

        None for a message outside the device protocol (another root): it is only logged in the bounded
        traffic log, best effort, and has no record to wait for. The broker applies backpressure by pausing
        its reads while the writer is congested.
        """
        # Telemetry from a known topic, the bulk of the traffic, straight: what `_submit` does for it, in the same
        # order, without its classification step. Anything else, or a payload that fails, goes there.
        known = self._topics.get(msg.topic)
        if known is None or known[5] is None or known[4] is not self._accounts.accounts:
            return self._submit(msg)
        payload = msg.payload
        if len(payload) > self._max_payload:
            return self._submit(msg)
        parsed = known[0]
        received_at = msg.received_at
        rows: asyncio.Future[Any] | None
        if self._child_decodes:
            # the bulk child decodes it and writes its traffic row, with the payload's error if it has one
            self._tally(known[2])
            self._presence.seen(parsed.device_id, received_at)
            item = (parsed.device_id, known[5], received_at, payload, parsed.msgpack, msg.client_id, msg.topic)
            rows = self._writer.append_telemetry((*item, msg.qos, int(msg.retain), self._keep, self._traffic_budget()))
            self._track(rows, received_at)
            return rows
        try:
            measured = telemetry.rows(parsed.device_id, known[5], received_at, payload, parsed.msgpack)
        except PayloadError:
            return self._submit(msg)  # decoded again there, counted and logged with its reason
        self._tally(known[2])
        self._presence.seen(parsed.device_id, received_at)
        rows = self._store_rows(measured)
        if self._traffic_budget():
            traffic = self._writer.append(TRAFFIC_SQL, self._traffic_row(msg, None))
            if rows is None:
                rows = traffic
        if rows is not None:
            self._track(rows, received_at)
        return rows

    def _telemetry_done(self, measured: int, rejects: list[tuple[str, str, str, int]]) -> None:
        """The bulk child's count of a committed group's measurement rows, and the telemetry that stored none,
        counted and logged as on the loop (the child wrote their traffic rows)."""
        if measured:
            self._tally(self._stored_measurements, measured)
        for reason, client_id, topic, size in rejects:
            if reason == NO_MEASUREMENTS:
                self._metrics.drops.labels(reason).inc()
            else:
                self._refused(reason, client_id, topic, f"{size} bytes")

    def _submit(self, msg: Message) -> asyncio.Future[Any] | None:
        """`submit` for every message."""
        step = self._plan(msg)
        writer = self._writer
        traffic = None
        if step.error is not None or self._traffic_budget():
            traffic = writer.append(TRAFFIC_SQL, self._traffic_row(msg, step.error))
        if step.foreign:
            return None
        if step.op is None:
            rows = step.bulk or traffic
            if rows is not None:
                self._track(rows, msg.received_at)
            return rows
        future = writer.submit(step.op)
        received_at = msg.received_at
        future.add_done_callback(lambda f: self._after_commit(f, received_at))
        return future

    def _traffic_budget(self) -> bool:
        """Token bucket for the traffic log: `traffic_rate` rows a second, bursts up to one second's worth.

        Refilled from the clock only once the bucket is empty, and then at most once per loop turn: a burst beyond
        the rate (one loop turn may read thousands of messages) costs a comparison per message, not a clock read.
        """
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if not self._traffic_rate:
            return True
        if not self._refill_pending:
            self._refill()
            self._refill_pending = True
            asyncio.get_running_loop().call_soon(self._refill_done)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
        self._tally(self._skipped)
        return False

    def _refill(self) -> None:
        now = time.monotonic()
        tokens = self._tokens + (now - self._refilled) * self._traffic_rate
        self._tokens = tokens if tokens < self._traffic_burst else self._traffic_burst
        self._refilled = now

    def _refill_done(self) -> None:
        self._refill_pending = False

    def _traffic_row(self, msg: Message, error: str | None) -> tuple[Any, ...]:
        payload = msg.payload if len(msg.payload) <= self._keep else msg.payload[: self._keep]
        return (
            msg.received_at,
            "in",
            msg.client_id,
            msg.topic,
            msg.qos,
            int(msg.retain),
            len(msg.payload),
            payload,
            error,
        )

    def _track(self, future: asyncio.Future[Any], received_at: float) -> None:
        """Commit latency of bulk rows: one callback per group, not per message."""
        if future is not self._tracked:
            self._tracked = future
            self._times = times = list[float]()
            future.add_done_callback(lambda f: self._observe(f, times))
        self._times.append(received_at)

    def _observe(self, future: asyncio.Future[Any], times: list[float]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        now = time.time()
        observe_many(self._latency, [now - received_at for received_at in times])

    def _after_commit(self, future: asyncio.Future[Any], received_at: float) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._metrics.drops.labels("store_error").inc()
            log.error("ingest write failed: %s", exc)
            return
        self._latency.observe(time.time() - received_at)
        outcome = future.result() or ()
        for kind, data in outcome:
            if kind not in _CALL_KINDS:
                self._presence.apply(kind, data)
                self._hub.publish(kind, data)
        if self.calls is not None and len(outcome) > 1:
            self.calls.dispatch([item for item in outcome if item[0] in _CALL_KINDS])

    def _count(self, action: str) -> None:
        counter = self._counters.get(action)
        if counter is None:
            counter = self._counters[action] = self._metrics.messages.labels(action, "in")
        self._tally(counter)

    def _plan(self, msg: Message) -> _Step:
        """Classification on the loop: what to store for this message.

        What depends only on the topic (its parse, the action, whether its device exists in that namespace) is
        worked out once per topic and again after the registry is reloaded.
        """
        topic = msg.topic
        if not topic.startswith(self._prefix):
            self._count("other")
            return _Step(foreign=True)
        if len(msg.payload) > self._max_payload:
            self._count("other")
            self._drop("oversized_payload", msg, f"{len(msg.payload)} bytes")
            return _Step(error="oversized_payload")
        registry = self._accounts.accounts
        known = self._topics.get(topic)
        if known is None or known[4] is not registry:
            try:
                parsed = known[0] if known is not None else topics.parse(topic, self._root)
            except TopicError as exc:
                self._count("bad_topic")
                self._drop(exc.reason, msg, f"{len(msg.payload)} bytes")
                return _Step(error=exc.reason)
            device = self._accounts.device(parsed.device_id)
            check = None
            if device is None:
                check = "unknown_device"
            elif (device.site, device.room, device.type) != (parsed.site, parsed.room, parsed.type):
                check = "wrong_namespace"
            action = parsed.action.split("/", 1)[0]
            counter = self._metrics.messages.labels(action, "in")
            metric = None
            if check is None and action not in _ROUTES and not action.startswith("cmd"):
                metric = parsed.action.replace("/", ".")
            known = (parsed, action, counter, check, registry, metric)
            if len(self._topics) >= 20_000:
                self._topics.clear()
            self._topics[topic] = known
        parsed, action, counter, error, _, metric = known
        body: Any = None
        if error is None:
            try:
                body = codec.normalize(codec.decode(msg.payload, parsed.msgpack))
            except PayloadError as exc:
                error = exc.reason
        self._tally(counter)
        if error is not None:
            self._drop(error, msg, f"{len(msg.payload)} bytes")
            return _Step(error=error)
        self._presence.seen(parsed.device_id, msg.received_at, transition=action != "availability")
        route = _ROUTES.get(action)
        if route is None:
            if metric is not None:
                return _Step(bulk=self._measure(parsed, metric, body, msg.received_at))
            return _Step()
        device_id, received_at, dtopic = parsed.device_id, msg.received_at, parsed

        def op(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            result: list[tuple[str, dict[str, Any]]] = route(conn, dtopic, device_id, body, received_at, self)
            return result

        return _Step(op=op)

    def _measure(
        self, parsed: topics.DeviceTopic, metric: str, body: Any, received_at: float
    ) -> asyncio.Future[Any] | None:
        """Telemetry: one measurement row per metric, all in the writer's next group (the PUBACK waits for that
        group only, so a message's rows must not straddle two)."""
        return self._store_rows(telemetry.normalized_rows(parsed.device_id, metric, received_at, body))

    def _store_rows(self, rows: list[Any]) -> asyncio.Future[Any] | None:
        """A message's measurement rows in the next group; None (counted) when it had none."""
        if not rows:
            self._metrics.drops.labels(NO_MEASUREMENTS).inc()
            return None
        future = self._writer.append_many(MEASUREMENT_SQL, rows)
        self._tally(self._stored_measurements, len(rows))
        return future

    def _tally(self, counter: Any, amount: float = 1.0) -> None:
        """`counter.inc(amount)` at the end of this loop turn, summed with the turn's other increments."""
        tallies = self._tallies
        if not tallies:
            asyncio.get_running_loop().call_soon(self._apply_tallies)
        tallies[counter] = tallies.get(counter, 0.0) + amount

    def _apply_tallies(self) -> None:
        tallies, self._tallies = self._tallies, {}
        for counter, amount in tallies.items():
            counter.inc(amount)


@dataclass(slots=True)
class _Step:
    op: Any = None
    bulk: asyncio.Future[Any] | None = None
    error: str | None = None
    foreign: bool = False


def _device_ts(body: Any, received_at: float) -> float:
    if isinstance(body, dict):
        for key in ("timestamp", "time", "ts"):
            ts = codec.parse_time(body.get(key))
            if ts is not None and telemetry.plausible(ts, received_at):
                return ts
    return received_at


Route = Any


def _status(
    conn: sqlite3.Connection, t: topics.DeviceTopic, device_id: str, body: Any, now: float, ingest: Ingest
) -> list[tuple[str, dict[str, Any]]]:
    body = body if isinstance(body, dict) else {}
    battery = codec.to_number(body.get("battery"))
    signal = codec.to_number(body.get("signal_strength", body.get("rssi", body.get("signal"))))
    firmware = body.get("firmware_version", body.get("firmware"))
    conn.execute(
        "UPDATE devices SET battery = coalesce(?, battery), signal = coalesce(?, signal), "
        "firmware = coalesce(?, firmware), status_json = ?, last_seen = ? WHERE device_id = ?",
        (
            battery,
            signal,
            None if firmware is None else str(firmware),
            json.dumps(body, default=str),
            now,
            device_id,
        ),
    )
    return [("device.status", {"device_id": device_id, "battery": battery, "signal": signal})]


def _heartbeat(
    conn: sqlite3.Connection, t: topics.DeviceTopic, device_id: str, body: Any, now: float, ingest: Ingest
) -> list[tuple[str, dict[str, Any]]]:
    # last_seen is kept in memory by Presence and flushed in batches: a heartbeat costs only its traffic row
    return []


def _availability(
    conn: sqlite3.Connection, t: topics.DeviceTopic, device_id: str, body: Any, now: float, ingest: Ingest
) -> list[tuple[str, dict[str, Any]]]:
    state = str(body).lower() if body is not None else ""
    if state not in ("online", "offline"):
        ingest._metrics.drops.labels("bad_availability").inc()
        return []
    return ingest._presence.set_in_tx(conn, device_id, state == "online", now, "availability")


def _press(
    conn: sqlite3.Connection, t: topics.DeviceTopic, device_id: str, body: Any, now: float, ingest: Ingest
) -> list[tuple[str, dict[str, Any]]]:
    body = dict(body) if isinstance(body, dict) else {}
    body.pop("device_id", None)  # the device id comes from the topic, never the payload (DESIGN)
    sequence = codec.to_number(body.get("sequence_id"))
    sequence_id = int(sequence) if sequence is not None else None
    press_type = body["press_type"] = str(body.get("press_type") or "single")
    tx = ingest.calls.tx(conn, now) if ingest.calls is not None else None
    if tx is not None:
        body["priority"] = tx.priority_for(device_id, body.get("priority"), press_type)
    elif body.get("priority") not in _PRIORITIES:
        body["priority"] = "normal"
    ts = _device_ts(body, now)
    cur = conn.execute(
        "INSERT OR IGNORE INTO events(device_id, type, ts, received_at, sequence_id, payload) "
        "VALUES (?, 'press', ?, ?, ?, ?)",
        (device_id, ts, now, sequence_id, json.dumps(body, default=str)),
    )
    if cur.rowcount == 0:
        ingest._metrics.drops.labels("duplicate_press").inc()
        return []
    event = {
        "id": cur.lastrowid,
        "device_id": device_id,
        "type": "press",
        "ts": ts,
        "received_at": now,
        "sequence_id": sequence_id,
        "site": t.site,
        "room": t.room,
        **body,
    }
    outbox(conn, LANE_PRIORITY, "event", event, device_id)
    ingest._metrics.stored.labels("events").inc()
    if tx is None:
        return [("event.press", event)]
    assert cur.lastrowid is not None
    event_id = cur.lastrowid
    if not tx.guarded(
        f"press {event_id}", lambda: tx.press(device_id, t.site, t.room, body["priority"], press_type, event_id)
    ):
        ingest._metrics.call_errors.inc()
    return [("event.press", event), *tx.out]


def _ack(
    conn: sqlite3.Connection, t: topics.DeviceTopic, device_id: str, body: Any, now: float, ingest: Ingest
) -> list[tuple[str, dict[str, Any]]]:
    body = body if isinstance(body, dict) else {}
    command_id = body.get("command_id")
    status = body.get("status")
    if not isinstance(command_id, str) or status not in _ACK_STATUSES:
        ingest._metrics.drops.labels("bad_ack").inc()
        return []
    detail = body.get("detail")
    cur = conn.execute(
        "UPDATE commands SET status = ?, detail = ?, acked_at = ? WHERE command_id = ? AND device_id = ?",
        (status, None if detail is None else str(detail), now, command_id, device_id),
    )
    if cur.rowcount == 0:
        ingest._metrics.drops.labels("unknown_command").inc()
        return []
    acked = ("command.ack", {"command_id": command_id, "device_id": device_id, "status": status})
    if ingest.calls is None:
        return [acked]
    tx = ingest.calls.tx(conn, now)
    if not tx.guarded(f"ack {command_id}", lambda: tx.answer(command_id, device_id, status)):
        ingest._metrics.call_errors.inc()
    return [acked, *tx.out]


_ROUTES: dict[str, Route] = {
    "status": _status,
    "heartbeat": _heartbeat,
    "availability": _availability,
    "press": _press,
    "ack": _ack,
}
