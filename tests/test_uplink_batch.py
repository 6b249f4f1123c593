"""The uplink's pure parts, table-driven: the batch format, backoff, Retry-After, the window, the pacer."""

from __future__ import annotations

import random
import zlib

import msgpack
import pytest

from gateway.uplink import batch, policy

ROWS = [
    (11, "sensor-1", "temperature", 1_700_000_000.123456, 21.5),
    (12, "sensor-2", "temperature", 1_700_000_000.2, 19.25),
    (13, "sensor-1", "humidity", 1_700_000_000.3, None),
    (15, "sensor-1", "temperature", 1_700_000_001.0, -3.0),
]


def test_telemetry_round_trip_keeps_every_field() -> None:
    data = batch.encode_telemetry("gw-1", 10, ROWS)
    got = batch.decode(data)
    assert (got.gateway_id, got.lane, got.first, got.last, got.count) == ("gw-1", "telemetry", 10, 15, 4)
    for m, (seq, dev, met, ts, value) in zip(got.measurements, ROWS, strict=True):
        assert (m.seq, m.device_id, m.metric, m.value) == (seq, dev, met, value)
        assert m.ts == pytest.approx(ts, abs=1e-6)  # microseconds on the wire


@pytest.mark.parametrize(
    ("values", "scale"),
    [
        ([1.0, 2.0, None], 0),
        ([21.5, 19.25], 2),
        ([0.000001], 6),
        ([0.1 + 0.2], None),  # 0.30000000000000004: floats, sent exactly
        ([1e15], None),
    ],
)
def test_values_are_scaled_integers_only_when_exact(values: list[float | None], scale: int | None) -> None:
    rows = [(i + 1, "d", "m", 1.0, v) for i, v in enumerate(values)]
    head = msgpack.unpackb(zlib.decompress(batch.encode_telemetry("g", 1, rows)))
    assert head["scale"] == scale
    assert [m.value for m in batch.decode(batch.encode_telemetry("g", 1, rows)).measurements] == values


def test_outbox_round_trip_keeps_bodies_as_stored() -> None:
    body = msgpack.packb({"id": 7, "state": "open"})
    rows = [(3, "call", "btn-1", 1.5, body), (4, "audit", None, 2.5, msgpack.packb({"a": 1}))]
    got = batch.decode(batch.encode_outbox("gw-1", "priority", 1, rows))
    assert (got.first, got.last, got.lane) == (1, 4, "priority")
    assert [(r.seq, r.kind, r.device_id, r.created_at, r.body) for r in got.records] == [
        (3, "call", "btn-1", 1.5, body),
        (4, "audit", None, 2.5, msgpack.packb({"a": 1})),
    ]


def test_typical_telemetry_is_a_few_bytes_per_record() -> None:
    rng = random.Random(1)
    rows, t, level = [], 1_700_000_000.0, dict.fromkeys(range(100), 20.0)
    for i in range(10_000):
        dev = rng.randrange(100)
        level[dev] = round(level[dev] + rng.uniform(-0.3, 0.3), 1)
        t += rng.random() / 1000
        rows.append((i + 1, f"sensor-{dev:03d}", "temperature" if i % 2 else "humidity", t, level[dev]))
    assert len(batch.encode_telemetry("gw", 1, rows)) / len(rows) < 20  # issue 6's target, with room


def _raw(head: object) -> bytes:
    return zlib.compress(msgpack.packb(head))


GOOD = msgpack.unpackb(zlib.decompress(batch.encode_telemetry("g", 1, ROWS)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not zlib at all", "not zlib-compressed"),
        (zlib.compress(b"\xc1\xc1"), "not msgpack"),
        (_raw([1, 2]), "not a map"),
        (_raw({**GOOD, "v": 9}), "format 9 is not supported"),
        (_raw({**GOOD, "n": 3}), "not increasing"),
        (_raw({**GOOD, "seq": [15, -1, 1, 2]}), "not increasing"),
        (_raw({**GOOD, "last": 99}), "do not match first/last"),
        (_raw({**GOOD, "val": [1]}), "differ in length"),
        (_raw({k: v for k, v in GOOD.items() if k != "mets"}), "malformed: KeyError"),
        (_raw({**GOOD, "n": 10**9}), "counts are invalid"),
        (zlib.compress(b"\x00" * 2_000_000), "inflates to more than"),
    ],
)
def test_a_bad_batch_is_refused_with_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(batch.BatchError, match=message):
        batch.decode(data, max_bytes=1_000_000)


def test_the_epoch_travels_with_the_batch() -> None:
    assert batch.decode(batch.encode_telemetry("g", 1, ROWS, "e1")).epoch == "e1"
    assert batch.decode(batch.encode_outbox("g", "state", 1, [], "e2")).epoch == "e2"
    legacy = {k: v for k, v in GOOD.items() if k != "epoch"}
    assert batch.decode(_raw(legacy)).epoch == ""


def test_idempotency_key_names_gateway_lane_and_range() -> None:
    assert batch.idempotency_key("gw-1", "state", 5, 9) == "gw-1:state:5-9"


@pytest.mark.parametrize("attempt", [1, 2, 5, 30, 1000])
def test_backoff_is_full_jitter_under_the_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    draws = [policy.backoff(attempt, 60, rng) for _ in range(200)]
    ceiling = min(60, policy.BACKOFF_BASE_S * 2**attempt)
    assert all(0 <= d <= ceiling for d in draws)
    assert max(draws) > ceiling * 0.8 and min(draws) < ceiling * 0.2  # spread over the whole range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: at once
        ("soon", None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(header: str | None, expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert policy.retry_after(header, now) == expected


@pytest.mark.parametrize(
    ("window", "hour", "minute", "inside"),
    [
        ("", 3, 0, True),
        ("22:00-06:00", 23, 30, True),
        ("22:00-06:00", 5, 59, True),
        ("22:00-06:00", 6, 0, False),
        ("22:00-06:00", 12, 0, False),
        ("09:30-17:00", 9, 30, True),
        ("09:30-17:00", 9, 29, False),
        ("00:00-00:00", 12, 0, True),
    ],
)
def test_window(window: str, hour: int, minute: int, inside: bool) -> None:
    assert policy.in_window(window, hour, minute) is inside


def test_pacer_spaces_sends_to_the_rate() -> None:
    pacer = policy.Pacer(1000)
    assert pacer.delay(500, 10.0) == 0
    assert pacer.delay(500, 10.0) == pytest.approx(0.5)
    assert pacer.delay(100, 12.0) == 0  # the link was idle meanwhile
    assert policy.Pacer(0).delay(10**9, 0) == 0


@pytest.mark.parametrize(
    ("budget", "used", "reclaimable", "inflow", "expected"),
    [
        (1000, 400, 0, 10.0, 60.0),
        (1000, 400, 200, 10.0, 80.0),
        (1000, 1200, 0, 10.0, 0.0),
        (1000, 400, 0, 0.0, None),
    ],
)
def test_runway(budget: int, used: int, reclaimable: int, inflow: float, expected: float | None) -> None:
    assert policy.runway_s(budget, used, reclaimable, inflow) == expected
