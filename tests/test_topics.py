"""Table-driven tests for gateway.topics: device-topic parsing and MQTT 3.1.1 filter rules (section 4.7)."""

from __future__ import annotations

import pytest

from gateway import topics
from gateway.errors import TopicError
from gateway.topics import DeviceTopic

ROOT = "bosun"
P = "bosun/yacht/c101/button/b1"  # a device's namespace without the trailing slash


# --- parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (f"{P}/press", DeviceTopic("yacht", "c101", "button", "b1", "press")),
        (f"{P}/availability", DeviceTopic("yacht", "c101", "button", "b1", "availability")),
        (
            "bosun/hotel-2/Suite_7/sensor/esp-32_a/temperature",
            DeviceTopic("hotel-2", "Suite_7", "sensor", "esp-32_a", "temperature"),
        ),
        # the action may have several levels (`cmd/notify`)
        (f"{P}/cmd/notify", DeviceTopic("yacht", "c101", "button", "b1", "cmd/notify")),
        # a final `.mp` marks a msgpack payload and is not part of the action
        (f"{P}/telemetry.mp", DeviceTopic("yacht", "c101", "button", "b1", "telemetry", msgpack=True)),
        (f"{P}/cmd/notify.mp", DeviceTopic("yacht", "c101", "button", "b1", "cmd/notify", msgpack=True)),
        # the type level is extensible: any valid segment is accepted
        ("bosun/yacht/c101/thermostat/t1/status", DeviceTopic("yacht", "c101", "thermostat", "t1", "status")),
        # a segment of exactly 64 characters is allowed, also once `.mp` is stripped
        (
            f"bosun/{'s' * 64}/c101/button/b1/{'a' * 64}.mp",
            DeviceTopic("s" * 64, "c101", "button", "b1", "a" * 64, msgpack=True),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_parse_accepts_device_topics(topic: str, expected: DeviceTopic) -> None:
    assert topics.parse(topic, ROOT) == expected


def test_parse_uses_the_configured_root() -> None:
    parsed = topics.parse("obedio/yacht/c101/watch/w1/ack", "obedio")
    assert parsed == DeviceTopic("yacht", "c101", "watch", "w1", "ack")
    with pytest.raises(TopicError) as info:
        topics.parse("obedio/yacht/c101/watch/w1/ack", ROOT)
    assert info.value.reason == "foreign_root"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        # not under the root at all (counted separately, or not at all, by the caller)
        ("", "foreign_root"),
        ("obedio/yacht/c101/button/b1/press", "foreign_root"),
        ("bosunx/yacht/c101/button/b1/press", "foreign_root"),
        ("Bosun/yacht/c101/button/b1/press", "foreign_root"),
        ("/bosun/yacht/c101/button/b1/press", "foreign_root"),
        ("$SYS/broker/uptime", "foreign_root"),
        # under the root but fewer than six levels
        ("bosun", "short_topic"),
        ("bosun/yacht", "short_topic"),
        (P, "short_topic"),
        # six or more levels, but a level is empty, too long or has characters outside [A-Za-z0-9_-]
        (f"{P}/", "bad_segment"),
        (f"{P}/press/", "bad_segment"),
        ("bosun//c101/button/b1/press", "bad_segment"),
        ("bosun/yacht/c101/button//press", "bad_segment"),
        (f"bosun/{'s' * 65}/c101/button/b1/press", "bad_segment"),
        (f"{P}/{'a' * 65}", "bad_segment"),
        ("bosun/yacht/c 101/button/b1/press", "bad_segment"),
        ("bosun/yacht/c101/button/b.1/press", "bad_segment"),
        ("bosun/yacht/cabine-é/button/b1/press", "bad_segment"),
        ("bosun/yacht/+/button/b1/press", "bad_segment"),
        (f"{P}/#", "bad_segment"),
        # `.mp` is only a suffix: alone, doubled, upper case or mid-topic it leaves a bad segment
        (f"{P}/.mp", "bad_segment"),
        (f"{P}/telemetry.mp.mp", "bad_segment"),
        (f"{P}/telemetry.MP", "bad_segment"),
        (f"{P}/cmd.mp/notify", "bad_segment"),
        ("bosun/yacht/c101/button/b1.mp/press", "bad_segment"),
    ],
)
def test_parse_rejects_with_a_reason(topic: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        topics.parse(topic, ROOT)
    assert info.value.reason == reason
    assert str(info.value)  # a human-readable detail for the log


# --- segments, prefixes and command topics --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("b1", True),
        ("A-z_09", True),
        ("x" * 64, True),
        ("", False),
        ("x" * 65, False),
        ("a b", False),
        ("a/b", False),
        ("a.b", False),
        ("+", False),
        ("#", False),
        ("é", False),
        ("b1\n", False),
    ],
)
def test_valid_segment(value: str, ok: bool) -> None:
    assert topics.valid_segment(value) is ok


def test_device_prefix_and_command_topic_round_trip_through_parse() -> None:
    prefix = topics.device_prefix(ROOT, "yacht", "c101", "button", "b1")
    assert prefix == f"{P}/"
    cmd = topics.command_topic(ROOT, "yacht", "c101", "button", "b1", "notify")
    assert cmd == f"{P}/cmd/notify"
    assert topics.parse(cmd, ROOT) == DeviceTopic("yacht", "c101", "button", "b1", "cmd/notify")


# --- filter_matches (MQTT 3.1.1 section 4.7) ------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        # no wildcards: exact, case-sensitive comparison (4.7.3)
        ("sport/tennis", "sport/tennis", True),
        ("sport/tennis", "sport/Tennis", False),
        ("sport/tennis", "sport/tennis/", False),
        ("sport/tennis", "sport", False),
        ("/finance", "/finance", True),
        ("/finance", "finance", False),
        # '#' multi-level, including the parent level (4.7.1.2)
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/tennis/player1/#", "sport/tennis/player2", False),
        ("sport/tennis/player1/#", "sport/tennis", False),
        ("sport/#", "sport", True),
        ("sport/#", "sports", False),
        ("#", "sport", True),
        ("#", "sport/tennis/player1", True),
        ("#", "/", True),
        # '+' exactly one level, which may be empty (4.7.1.3)
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/tennis/+", "sport/tennis", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+", "sport", True),
        ("+", "/finance", False),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+/+", "a//b", False),
        ("a/+/b", "a//b", True),
        ("+/tennis/#", "sport/tennis/player1", True),
        ("+/tennis/#", "sport/tennis", True),
        ("+/tennis/#", "sport/golf", False),
        ("sport/+/player1", "sport/tennis/player1", True),
        ("sport/+/player1", "sport/tennis/player2", False),
        ("+/+/+/+/+/cmd/#", f"{P}/cmd/notify", True),
        ("+/+/+/+/+/cmd/#", f"{P}/press", False),
        # '$' topics: a filter starting with a wildcard does not match them (4.7.2) ...
        ("#", "$SYS/broker/uptime", False),
        ("#", "$SYS", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("+", "$SYS", False),
        ("+/#", "$SYS/broker", False),
        # ... but a filter that spells the '$' level out does
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$SYS/broker/uptime", "$SYS/broker/uptime", True),
        # '$' later in a topic is an ordinary character
        ("a/+", "a/$b", True),
        ("a/#", "a/$b/c", True),
    ],
)
def test_filter_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topics.filter_matches(topic_filter, topic) is matches


# --- valid_filter (MQTT 3.1.1 sections 4.7.1 and 4.7.3) -------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "ok"),
    [
        ("sport/tennis/player1", True),
        ("sport/tennis/#", True),
        ("#", True),
        ("+", True),
        ("+/tennis/#", True),
        ("sport/+/player1", True),
        ("+/+", True),
        ("/+", True),
        ("/", True),
        ("$SYS/#", True),
        ("a" * 65535, True),
        # '#' must be a whole level and the last one
        ("sport/tennis#", False),
        ("sport/tennis/#/ranking", False),
        ("#/", False),
        ("##", False),
        # '+' must be a whole level
        ("sport+", False),
        ("sport/+tennis", False),
        ("++", False),
        # at least one character, at most 65535 bytes of UTF-8, no U+0000 (4.7.3, 1.5.3)
        ("", False),
        ("a" * 65536, False),
        ("é" * 32768, False),
        ("a\x00b", False),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else str(v),
)
def test_valid_filter(topic_filter: str, ok: bool) -> None:
    assert topics.valid_filter(topic_filter) is ok


# --- filter_covers: every topic `inner` matches is also matched by `outer` ------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/+", False),
        ("a/b", "a/#", False),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/#", False),
        ("a/#", "a", True),  # '#' includes the parent level (4.7.1.2)
        ("a/#", "a/b/c", True),
        ("a/#", "a/+/c", True),
        ("a/#", "a/#", True),
        ("a/#", "a/+/#", True),
        ("a/#", "b/#", False),
        ("a/#", "#", False),
        ("a/#", "+/b", False),
        ("a", "a/#", False),
        ("#", "a/b/c", True),
        ("#", "#", True),
        ("+/+", "a/+", True),
        ("+/+", "+/+", True),
        ("+/+", "a/b/c", False),
        ("+", "#", False),
        ("a/+/c", "a/+/c", True),
        ("a/+/c", "a/+/d", False),
        (f"{P}/cmd/#", f"{P}/cmd/notify", True),
        (f"{P}/cmd/#", f"{P}/cmd/+", True),
        (f"{P}/cmd/#", "bosun/yacht/c101/button/+/cmd/#", False),
    ],
)
def test_filter_covers(outer: str, inner: str, covers: bool) -> None:
    assert topics.filter_covers(outer, inner) is covers


@pytest.mark.parametrize(("outer", "inner"), [("#", "$SYS/#"), ("+/broker/uptime", "$SYS/broker/uptime")])
def test_filter_covers_respects_dollar_topics(outer: str, inner: str) -> None:
    # the inner filter matches "$SYS/broker/uptime", which the outer filter does not (see test_filter_matches)
    assert not topics.filter_matches(outer, "$SYS/broker/uptime")
    assert topics.filter_matches(inner, "$SYS/broker/uptime")
    assert topics.filter_covers(outer, inner) is False
