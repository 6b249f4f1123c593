"""Prometheus metrics for one gateway instance (own registry, so tests can run several gateways)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


# the writer thread's commit and its wait for the bulk child's lock share one scale, so the two read side by side
_WRITER_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected = Gauge("bosun_mqtt_connected_clients", "Connected MQTT clients by kind", ["kind"], registry=r)
        self.messages = Counter(
            "bosun_mqtt_messages",
            "MQTT messages by protocol action and direction",
            ["action", "direction"],
            registry=r,
        )
        self.drops = Counter(
            "bosun_drops", "Messages or payloads refused or dropped, by reason", ["reason"], registry=r
        )
        self.auth_failures = Counter(
            "bosun_auth_failures", "Refused MQTT connections by reason", ["reason"], registry=r
        )
        self.traffic_skipped = Counter(
            "bosun_traffic_log_skipped", "Messages not written to the traffic log (store.traffic_rate)", registry=r
        )
        self.stored = Counter("bosun_stored_rows", "Rows stored by table", ["table"], registry=r)
        self.writer_batch = Histogram(
            "bosun_writer_batch_size",
            "Writes committed per group",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.writer_commit = Histogram(
            "bosun_writer_commit_seconds",
            "Time to apply and commit one group",
            buckets=_WRITER_SECONDS,
            registry=r,
        )
        self.writer_lock_wait = Histogram(
            "bosun_writer_lock_wait_seconds",
            "Time an op group waited for the write lock held by the bulk writer process",
            buckets=_WRITER_SECONDS,
            registry=r,
        )
        self.wal_restarts = Counter(
            "bosun_wal_restarts", "Times the WAL was restarted from its start (it held more than 64 MB)", registry=r
        )
        self.commit_latency = Histogram(
            "bosun_ingest_commit_seconds",
            "From reading a PUBLISH to the COMMIT that stores it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.writer_queue = Gauge("bosun_writer_queue_depth", "Writes waiting for the writer", registry=r)
        self.ingest_queue = Gauge("bosun_ingest_queue_depth", "Messages waiting in session delivery queues", registry=r)
        self.devices_online = Gauge("bosun_devices_online", "Devices currently online", registry=r)
        self.index_behind = Gauge(
            "bosun_index_behind_rows",
            "Measurements the per-device index has not reached yet (device queries read them from the table)",
            registry=r,
        )
        self.calls = Counter("bosun_calls", "Crew calls opened, by priority", ["priority"], registry=r)
        self.call_errors = Counter(
            "bosun_call_errors",
            "Call transitions that failed (the press or ack that caused them is stored)",
            registry=r,
        )
        self.call_escalations = Counter("bosun_call_escalations", "Escalation tiers reached by open calls", registry=r)
        self.call_notify_latency = Histogram(
            "bosun_call_notify_seconds",
            "From reading a press to publishing its cmd/notify to the watches",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

        # uplink (gateway/uplink): backlog per lane, what reached HQ, and how long the site can stay offline
        self.uplink_backlog_records = Gauge(
            "bosun_uplink_backlog_records", "Records not yet confirmed by HQ, by lane", ["lane"], registry=r
        )
        self.uplink_backlog_bytes = Gauge(
            "bosun_uplink_backlog_bytes",
            "Bytes of the backlog by lane (outbox bodies; telemetry: estimated on the wire)",
            ["lane"],
            registry=r,
        )
        self.uplink_oldest_age = Gauge(
            "bosun_uplink_oldest_unsent_seconds",
            "Age of the oldest record not yet at HQ, by lane",
            ["lane"],
            registry=r,
        )
        self.uplink_sent_records = Counter(
            "bosun_uplink_sent_records", "Records confirmed by HQ, by lane", ["lane"], registry=r
        )
        self.uplink_sent_bytes = Counter(
            "bosun_uplink_sent_bytes", "Bytes on the wire of confirmed batches, by lane", ["lane"], registry=r
        )
        self.uplink_wire_bytes_per_record = Gauge(
            "bosun_uplink_wire_bytes_per_record", "Bytes on the wire per record in the last batch", ["lane"], registry=r
        )
        self.uplink_last_success = Gauge(
            "bosun_uplink_last_success_timestamp_seconds", "When HQ last confirmed a batch", registry=r
        )
        self.uplink_connected = Gauge("bosun_uplink_connected", "1 when the last send reached HQ", registry=r)
        self.uplink_errors = Counter(
            "bosun_uplink_errors", "Failed sends: transient, retry_after, refused, store", ["kind"], registry=r
        )
        self.uplink_lost = Gauge(
            "bosun_uplink_lost_records",
            "Records evicted before HQ had them (reported to HQ), by lane",
            ["lane"],
            registry=r,
        )
        self.uplink_runway = Gauge(
            "bosun_uplink_runway_seconds",
            "Seconds until unsent telemetry would be evicted at the current data rate and budget (-1: not growing)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def counter_values(self, counter: Counter) -> dict[str, float]:
        """{label: value} of a one-label counter, for /healthz."""
        out: dict[str, float] = {}
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels:
                    out[",".join(sample.labels.values())] = sample.value
        return out


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for each value, with one increment per bucket used instead of one per value.

    Relies on prometheus_client's Histogram internals (`_upper_bounds`, `_buckets`, `_sum`); tests/test_metrics.py
    checks it against `observe` so an upgrade that changes them fails there.
    """
    from bisect import bisect_left  # appended helper: the imports above stay as they are

    if not values:
        return
    bounds = histogram._upper_bounds
    counts: dict[int, int] = {}
    for value in values:
        index = bisect_left(bounds, value)  # the first bucket whose upper bound is >= value, as observe() picks
        counts[index] = counts.get(index, 0) + 1
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for index, count in counts.items():
        buckets[index].inc(count)
