"""Table-driven tests for gateway.acl: what devices, integrations and anonymous clients may do."""

from __future__ import annotations

import pytest

from gateway import acl
from gateway.models import Device, Principal

ROOT = "bosun"
B1 = Principal("device", "b1", device=Device("b1", "yacht", "c101", "button", disabled=False))
OWN = "bosun/yacht/c101/button/b1"  # B1's namespace, without the trailing slash

# An HQ integration: reads status everywhere and all of site `yacht`, sends commands, but never
# anything in room `secure`.
HQ = Principal(
    "integration",
    "hq",
    read=("bosun/+/+/+/+/status", "bosun/yacht/#"),
    write=("bosun/+/+/+/+/cmd/#",),
    deny=("bosun/yacht/secure/#",),
)
# Anonymous clients: a public area to publish in, read everything except the device protocol and the
# admin corner.
ANON = Principal(
    "anonymous",
    "anonymous",
    read=("#",),
    write=("public/#",),
    deny=("public/admin/#", "bosun/#"),
)
NOBODY = Principal("anonymous", "anonymous")


# --- devices --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        (f"{OWN}/press", True),
        (f"{OWN}/availability", True),
        (f"{OWN}/status", True),
        (f"{OWN}/telemetry.mp", True),
        (f"{OWN}/ack", True),
        (f"{OWN}/temperature/inside", True),
        # never into its own command subtree (only the gateway sends commands)
        (f"{OWN}/cmd/notify", False),
        (f"{OWN}/cmd/reset", False),
        (f"{OWN}/cmd/", False),
        # not the namespace itself, with or without the slash
        (f"{OWN}/", False),
        (OWN, False),
        # not another device's namespace, however close the name
        ("bosun/yacht/c101/button/b2/press", False),
        ("bosun/yacht/c101/button/b10/press", False),
        ("bosun/yacht/c101/button/b/press", False),
        ("bosun/yacht/c102/button/b1/press", False),
        ("bosun/yacht/c101/watch/b1/press", False),
        ("bosun/hotel/c101/button/b1/press", False),
        ("obedio/yacht/c101/button/b1/press", False),
        ("bosun/yacht/c101/button/b2/cmd/notify", False),
        ("bosun/yacht/c101/button", False),
        ("$SYS/broker/uptime", False),
        ("public/chat", False),
    ],
)
def test_device_publish(topic: str, allowed: bool) -> None:
    assert acl.may_publish(B1, topic, ROOT) is allowed


def test_device_namespace_follows_the_root() -> None:
    assert acl.may_publish(B1, "obedio/yacht/c101/button/b1/press", "obedio")
    assert not acl.may_publish(B1, f"{OWN}/press", "obedio")
    assert acl.may_subscribe(B1, "obedio/yacht/c101/button/b1/cmd/#", "obedio")
    assert not acl.may_subscribe(B1, f"{OWN}/cmd/#", "obedio")
    assert acl.may_receive(B1, "obedio/yacht/c101/button/b1/cmd/notify", "obedio")


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        (f"{OWN}/cmd/#", True),
        (f"{OWN}/cmd/notify", True),
        (f"{OWN}/cmd/+", True),
        (f"{OWN}/cmd/+/x", True),
        (f"{OWN}/cmd", True),  # matched by cmd/# (the parent level, 4.7.1.2), so narrower
        # anything wider than its own cmd/#, or outside it
        (f"{OWN}/#", False),
        (f"{OWN}/+", False),
        (f"{OWN}/press", False),
        (f"{OWN}/+/notify", False),
        ("bosun/yacht/c101/button/+/cmd/#", False),
        ("bosun/yacht/c101/button/b2/cmd/#", False),
        ("bosun/yacht/c101/button/b10/cmd/#", False),
        ("+/yacht/c101/button/b1/cmd/#", False),
        ("bosun/#", False),
        ("#", False),
        ("+", False),
        ("$SYS/#", False),
    ],
)
def test_device_subscribe(topic_filter: str, allowed: bool) -> None:
    assert acl.may_subscribe(B1, topic_filter, ROOT) is allowed


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        (f"{OWN}/cmd/notify", True),
        (f"{OWN}/cmd/reset", True),
        (f"{OWN}/press", False),
        (f"{OWN}/availability", False),
        ("bosun/yacht/c101/button/b2/cmd/notify", False),
        ("bosun/yacht/c101/button/b10/cmd/notify", False),
        ("$SYS/broker/uptime", False),
    ],
)
def test_device_receive(topic: str, allowed: bool) -> None:
    assert acl.may_receive(B1, topic, ROOT) is allowed


def test_device_rules_ignore_pattern_fields() -> None:
    # a device principal that somehow carries patterns still gets only its namespace
    loaded = Principal("device", "b1", device=B1.device, read=("#",), write=("#",))
    assert not acl.may_publish(loaded, "bosun/yacht/c101/button/b2/press", ROOT)
    assert not acl.may_subscribe(loaded, "#", ROOT)
    assert not acl.may_receive(loaded, "bosun/yacht/c101/button/b2/cmd/notify", ROOT)


# --- integrations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("bosun/yacht/c101/button/b1/cmd/notify", True),
        ("bosun/hotel/r7/watch/w1/cmd/reset", True),
        ("bosun/yacht/c101/button/b1/cmd", True),  # cmd/# includes its parent (4.7.1.2)
        ("bosun/yacht/c101/button/b1/press", False),  # not in write
        ("bosun/yacht/c101/button/b1/status", False),  # readable, not writable
        ("bosun/yacht/secure/button/b1/cmd/reset", False),  # deny wins over write
        ("bosun/yacht/c101/button/cmd/notify", False),
        ("$SYS/broker/uptime", False),
    ],
)
def test_integration_publish(topic: str, allowed: bool) -> None:
    assert acl.may_publish(HQ, topic, ROOT) is allowed


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("bosun/yacht/#", True),
        ("bosun/yacht/c101/#", True),
        ("bosun/yacht/+/button/+/press", True),
        ("bosun/+/+/+/+/status", True),
        ("bosun/hotel/r7/sensor/s1/status", True),
        ("bosun/hotel/+/+/+/status", True),
        # wider than any read pattern
        ("bosun/#", False),
        ("#", False),
        ("bosun/+/+/+/+/+", False),
        ("bosun/hotel/r7/sensor/s1/telemetry", False),
        ("bosun/+/+/+/+/status/#", False),
        # entirely inside a deny pattern
        ("bosun/yacht/secure/#", False),
        ("bosun/yacht/secure/button/b1/press", False),
        ("bosun/yacht/secure/+/+/status", False),
        ("$SYS/#", False),
    ],
)
def test_integration_subscribe(topic_filter: str, allowed: bool) -> None:
    assert acl.may_subscribe(HQ, topic_filter, ROOT) is allowed


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("bosun/yacht/c101/button/b1/press", True),
        ("bosun/yacht/c101/button/b1/cmd/notify", True),
        ("bosun/hotel/r7/sensor/s1/status", True),
        ("bosun/hotel/r7/sensor/s1/telemetry", False),
        # deny wins even where a read pattern matches (bosun/yacht/# and bosun/+/+/+/+/status)
        ("bosun/yacht/secure/button/b1/press", False),
        ("bosun/yacht/secure/button/b1/status", False),
        ("bosun/yacht/secure", False),
        ("$SYS/broker/uptime", False),
    ],
)
def test_integration_receive(topic: str, allowed: bool) -> None:
    assert acl.may_receive(HQ, topic, ROOT) is allowed


def test_subscription_overlapping_deny_is_filtered_per_message() -> None:
    # Subscribing to bosun/yacht/# is allowed although it overlaps the deny pattern; the broker then
    # checks each delivery, and the denied part never arrives.
    assert acl.may_subscribe(HQ, "bosun/yacht/#", ROOT)
    assert acl.may_receive(HQ, "bosun/yacht/c101/button/b1/press", ROOT)
    assert not acl.may_receive(HQ, "bosun/yacht/secure/button/b1/press", ROOT)


# --- anonymous ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("publish", "public/chat", True),
        ("publish", "public", True),
        ("publish", "public/admin/reset", False),  # deny wins
        ("publish", "public/admin", False),  # deny '#' includes the parent level
        ("publish", "bosun/yacht/c101/button/b1/press", False),  # no spoofed device messages
        ("publish", "private/x", False),
        ("subscribe", "public/#", True),
        ("subscribe", "weather/+", True),
        ("subscribe", "#", True),  # allowed; the deny patterns apply per message (receive)
        ("subscribe", "bosun/#", False),
        ("subscribe", "bosun/yacht/c101/button/b1/cmd/#", False),
        ("subscribe", "bosun/+/+/+/+/press", False),
        ("subscribe", "public/admin/#", False),
        ("subscribe", "public/admin/+", False),
        ("receive", "public/chat", True),
        ("receive", "weather/today", True),
        ("receive", "public/admin/reset", False),
        ("receive", "bosun/yacht/c101/button/b1/press", False),
        ("receive", "bosun/yacht/c101/button/b1/cmd/notify", False),
        ("receive", "$SYS/broker/uptime", False),  # '#' does not match '$' topics (4.7.2)
    ],
)
def test_anonymous_deny_wins(action: str, topic: str, allowed: bool) -> None:
    check = {"publish": acl.may_publish, "subscribe": acl.may_subscribe, "receive": acl.may_receive}[action]
    assert check(ANON, topic, ROOT) is allowed


@pytest.mark.parametrize("topic", ["public/chat", "#", "bosun/yacht/c101/button/b1/press", "a"])
def test_anonymous_without_patterns_gets_nothing(topic: str) -> None:
    assert not acl.may_publish(NOBODY, topic, ROOT)
    assert not acl.may_subscribe(NOBODY, topic, ROOT)
    assert not acl.may_receive(NOBODY, topic, ROOT)


def test_deny_everything_beats_allow_everything() -> None:
    locked = Principal("integration", "locked", read=("#",), write=("#",), deny=("#",))
    for topic in ("a", "a/b", "bosun/yacht/c101/button/b1/cmd/notify"):
        assert not acl.may_publish(locked, topic, ROOT)
        assert not acl.may_receive(locked, topic, ROOT)
    assert not acl.may_subscribe(locked, "#", ROOT)
    assert not acl.may_subscribe(locked, "a/+", ROOT)


# --- explain --------------------------------------------------------------------------------------


def test_explain_names_the_rule() -> None:
    assert f"{OWN}/" in acl.explain(B1, "publish", f"{OWN}/press", ROOT)
    text = acl.explain(HQ, "subscribe", "bosun/#", ROOT)
    assert "hq" in text
    assert "bosun/yacht/#" in text
    assert "bosun/yacht/secure/#" in text
