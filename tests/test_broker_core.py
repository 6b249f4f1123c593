"""The broker's pure parts: the topic trie against the reference matcher, and the packet parser."""

from __future__ import annotations

import random
import re

import pytest

from gateway import config
from gateway.broker import packets
from gateway.broker.packets import Malformed, Parser
from gateway.broker.trie import Trie
from gateway.errors import ConfigError
from gateway.topics import filter_matches, valid_filter

LEVELS = ["a", "b", "c", "", "$SYS", "+", "#"]


def _random_filter(rng: random.Random) -> str:
    parts = [rng.choice(LEVELS) for _ in range(rng.randint(1, 4))]
    return "/".join(parts)


def _random_topic(rng: random.Random) -> str:
    return "/".join(rng.choice(["a", "b", "c", "", "$SYS", "$x"]) for _ in range(rng.randint(1, 4)))


def test_trie_agrees_with_the_reference_matcher_on_random_filters_and_topics() -> None:
    """MQTT 3.1.1 section 4.7: `+` one level, `#` this level and below (and the parent), `$` not by wildcards."""
    rng = random.Random(7)
    filters = sorted({f for f in (_random_filter(rng) for _ in range(400)) if valid_filter(f)})
    trie: Trie[str] = Trie()
    for i, f in enumerate(filters):
        trie.add(f, f, i % 3)
    for _ in range(3000):
        topic = _random_topic(rng)
        expected = {f for f in filters if filter_matches(f, topic)}
        assert set(trie.match(topic)) == expected, topic


def test_trie_keeps_the_highest_qos_per_subscriber_and_replaces_on_resubscribe() -> None:
    """Section 3.3.5: one copy at the highest QoS of the matching filters; 3.8.4: a new SUBSCRIBE replaces."""
    trie: Trie[str] = Trie()
    trie.add("a/#", "s", 0)
    trie.add("a/+/c", "s", 2)
    assert trie.match("a/b/c") == {"s": 2}
    trie.add("a/+/c", "s", 1)
    assert trie.match("a/b/c") == {"s": 1} and trie.count == 2
    assert trie.remove("a/+/c", "s") and not trie.remove("a/+/c", "s")
    assert trie.match("a/b/c") == {"s": 0}
    trie.remove("a/#", "s")
    assert trie.match("a/b/c") == {} and trie.count == 0


def _publish(topic: str, payload: bytes, qos: int = 1, pid: int = 7) -> bytes:
    return packets.encode_publish(packets.topic_bytes(topic), payload, qos, False, pid)


def test_parser_reassembles_packets_split_at_every_byte() -> None:
    stream = _publish("t/1", b"x" * 300) + packets.pingresp() + _publish("t/2", b"", 0)
    for cut in range(1, len(stream)):
        parser = Parser(10_000)
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [kind for kind, _, _ in got] == [packets.PUBLISH, packets.PINGRESP, packets.PUBLISH]
        topic, pid, payload = packets.decode_publish(got[0][1], got[0][2])
        assert (topic, pid, payload) == ("t/1", 7, b"x" * 300)
        assert parser.buffered == 0


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "2.2.3"),  # remaining length over 4 bytes
        (b"\x62\x02\x00\x01", ""),  # PUBREL must have flags 0010: this is fine
        (b"\x60\x02\x00\x01", "2.2.2"),  # PUBREL with flags 0000
        (b"\x82\x05\x00\x01\x00\x01a", ""),  # a SUBSCRIBE whose requested QoS byte is missing: decoded later
    ],
)
def test_parser_refuses_malformed_fixed_headers(data: bytes, rule: str) -> None:
    parser = Parser(10_000)
    if not rule:
        assert len(parser.feed(data)) == 1
        return
    with pytest.raises(Malformed, match=rule.replace(".", r"\.")):
        parser.feed(data)


def test_parser_refuses_a_packet_over_the_limit_before_reading_it() -> None:
    with pytest.raises(Malformed, match="exceeds"):
        Parser(100).feed(b"\x30\xe8\x07")  # announces 1000 bytes
    whole = _publish("t/1", b"x" * 60)  # a whole small packet in one read takes the parser's short way
    assert len(Parser(100).feed(whole)) == 1
    with pytest.raises(Malformed, match="exceeds"):
        Parser(50).feed(whole)


def test_decoders_name_the_rule_broken() -> None:
    with pytest.raises(Malformed, match=re.escape("3.3.1.2")):
        packets.decode_publish(0b0110, b"\x00\x01a\x00\x01")  # QoS 3
    with pytest.raises(Malformed, match=re.escape("2.3.1")):
        packets.decode_publish(0b0010, b"\x00\x01a\x00\x00")  # packet id 0
    with pytest.raises(Malformed, match=re.escape("3.8.3")):
        packets.decode_subscribe(b"\x00\x01\x00\x01a")  # filter without QoS
    with pytest.raises(Malformed, match=re.escape("3.8.3.1")):
        packets.decode_subscribe(b"\x00\x01\x00\x01a\x03")
    with pytest.raises(Malformed, match=re.escape("3.1.2.1")):
        packets.decode_connect(b"\x00\x04MQIS\x04\x02\x00\x3c\x00\x01c")
    connect = packets.decode_connect(b"\x00\x04MQTT\x04\x42\x00\x3c\x00\x01c\x00\x02pw")
    assert connect.errors == ["password without user name"]


def test_max_inflight_is_bounded_by_packet_identifiers() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.max_inflight"):
        config.load(None, {}, {"mqtt.max_inflight": 70000})
