"""Pure topic handling: parse and format device-protocol topics, validate and match MQTT filters."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import TopicError

__all__ = [
    "SEGMENT",
    "DeviceTopic",
    "command_topic",
    "device_prefix",
    "filter_matches",
    "parse",
    "valid_filter",
    "valid_segment",
]

SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_segment(value: str) -> bool:
    return SEGMENT.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """`{root}/{site}/{room}/{type}/{device_id}/{action}`; action may have levels (`cmd/notify`)."""

    site: str
    room: str
    type: str
    device_id: str
    action: str
    msgpack: bool = False


def parse(topic: str, root: str) -> DeviceTopic:
    """Split a device-protocol topic; raise TopicError with a metrics reason if it is not one.

    A final `.mp` on the action marks a msgpack payload (DESIGN: device protocol).
    """
    levels = topic.split("/")
    if levels[0] != root:
        raise TopicError("foreign_root", f"topic {topic!r} is not under {root!r}/")
    if len(levels) < 6:
        raise TopicError("short_topic", f"topic {topic!r} has {len(levels)} levels, expected at least 6")
    action_levels = levels[5:]
    msgpack = False
    if action_levels[-1].endswith(".mp"):
        msgpack = True
        action_levels[-1] = action_levels[-1][:-3]
    for level in levels[1:5] + action_levels:
        if not valid_segment(level):
            raise TopicError("bad_segment", f"topic {topic!r}: level {level!r} is not [A-Za-z0-9_-]{{1,64}}")
    return DeviceTopic(levels[1], levels[2], levels[3], levels[4], "/".join(action_levels), msgpack)


def device_prefix(root: str, site: str, room: str, type_: str, device_id: str) -> str:
    """The namespace a device may publish under (with the trailing slash)."""
    return f"{root}/{site}/{room}/{type_}/{device_id}/"


def command_topic(root: str, site: str, room: str, type_: str, device_id: str, name: str) -> str:
    return f"{device_prefix(root, site, room, type_, device_id)}cmd/{name}"


def valid_filter(topic_filter: str) -> bool:
    """MQTT 3.1.1 section 4.7.1: '#' only as the whole last level, '+' only as a whole level."""
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Does `topic` match `topic_filter`? (MQTT 3.1.1 section 4.7; `$` topics skip leading wildcards, 4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    for index, level in enumerate(flevels):
        if level == "#":
            return True
        if index >= len(tlevels):
            return False
        if level != "+" and level != tlevels[index]:
            return False
    return len(flevels) == len(tlevels)


def filter_covers(outer: str, inner: str) -> bool:
    """Is every topic matched by filter `inner` also matched by filter `outer`? (used for SUBSCRIBE ACLs)"""
    if inner.startswith("$") and outer[:1] in ("+", "#"):
        return False  # MQTT 3.1.1 section 4.7.2: a leading wildcard matches no `$` topic
    olevels = outer.split("/")
    ilevels = inner.split("/")
    for index, level in enumerate(olevels):
        if level == "#":
            return True
        if index >= len(ilevels):
            return False
        inner_level = ilevels[index]
        if inner_level == "#":
            return False
        if level == "+":
            continue
        if inner_level == "+" or inner_level != level:
            return False
    return len(olevels) == len(ilevels)
