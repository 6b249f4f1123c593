"""gateway/telemetry.py: what the bulk child makes of a group's undecoded telemetry before it takes the lock."""

from __future__ import annotations

import msgpack

from gateway.telemetry import MEASUREMENT_SQL, NO_MEASUREMENTS, TELEMETRY, TRAFFIC_SQL, decode_group, rows

NOW = 1_767_322_100.0
OTHER = "INSERT INTO outbox(x) VALUES (?)"


def _item(payload: bytes, metric: str = "telemetry", logged: bool = True, mp: bool = False, keep: int = 1024) -> tuple:
    return ("s1", metric, NOW, payload, mp, "s1", f"bosun/yacht/c101/sensor/s1/{metric}", 1, 0, keep, logged)


def test_a_group_s_telemetry_becomes_measurement_and_traffic_rows() -> None:
    tables = [
        (OTHER, [(1,)]),
        (
            TELEMETRY,
            [
                _item(b'{"temperature": 21.5, "rh": 40.0}'),
                _item(b'{"value": 612, "time": 1767322000}', metric="co2", logged=False),
                _item(b'{"value": 5, "time": 1000}', metric="co2", logged=False),  # a clock that was never set
                _item(msgpack.packb({"t": 1.5}), metric="telemetry.mp", mp=True, logged=False),
            ],
        ),
    ]
    out, measured, rejects = decode_group(tables)
    assert rejects == [] and measured == 5
    assert out == [
        (OTHER, [(1,)]),
        (
            MEASUREMENT_SQL,
            [
                ("s1", "temperature", NOW, 21.5),
                ("s1", "rh", NOW, 40.0),
                ("s1", "co2", 1767322000.0, 612.0),
                ("s1", "co2", NOW, 5.0),
                ("s1", "t", NOW, 1.5),
            ],
        ),
        (
            TRAFFIC_SQL,
            [
                (
                    NOW,
                    "in",
                    "s1",
                    "bosun/yacht/c101/sensor/s1/telemetry",
                    1,
                    0,
                    33,
                    b'{"temperature": 21.5, "rh": 40.0}',
                    None,
                )
            ],
        ),
    ]


def test_payloads_that_store_nothing_come_back_with_their_reason() -> None:
    """A payload that does not decode is refused with PayloadError's reason, and its traffic row (written whatever
    the budget) carries it; one with no measurement is counted apart and its traffic row, if any, has no error; the
    group's other rows still go."""
    tables = [
        (
            TELEMETRY,
            [
                _item(b'{"t": 1,}', keep=4, logged=False),
                _item(b'{"note": "no numbers"}'),
                _item(b'{"note": "unlogged"}', logged=False),
                _item(b"\xc1", metric="telemetry.mp", mp=True),
                _item(b'{"t": 2.5}', logged=False),
            ],
        )
    ]
    out, measured, rejects = decode_group(tables)
    assert measured == 1 and out[0] == (MEASUREMENT_SQL, [("s1", "t", NOW, 2.5)])
    topic = "bosun/yacht/c101/sensor/s1/"
    assert rejects == [
        ("bad_json", "s1", topic + "telemetry", 9),
        (NO_MEASUREMENTS, "s1", topic + "telemetry", 22),
        (NO_MEASUREMENTS, "s1", topic + "telemetry", 20),
        ("bad_msgpack", "s1", topic + "telemetry.mp", 1),
    ]
    traffic = out[1]
    assert traffic[0] == TRAFFIC_SQL
    assert [(row[3], row[6], row[7], row[8]) for row in traffic[1]] == [
        (topic + "telemetry", 9, b'{"t"', "bad_json"),  # the size is the payload's, the bytes kept are `keep`
        (topic + "telemetry", 22, b'{"note": "no numbers"}', None),
        (topic + "telemetry.mp", 1, b"\xc1", "bad_msgpack"),
    ]


def test_rows_of_one_message() -> None:
    assert rows("s1", "env.temp", NOW, b"21.5", False) == [("s1", "env.temp", NOW, 21.5)]
    assert rows("s1", "telemetry", NOW, b"", False) == []
