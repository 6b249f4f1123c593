"""An MQTT session: subscriptions and the outbound QoS 1/2 state that outlives a connection.

Outbound flow (MQTT 3.1.1 section 4.3): at most `max_inflight` messages are unacknowledged at a time; the rest
wait in `queue`, bounded by `queue_max` (oldest dropped first, counted). Nothing in flight is ever dropped on
a timer (stock amqtt dropped a QoS 1 message whose PUBACK took over 5 s, upstream issue #391): it is resent
with DUP=1 when the client reconnects with clean session 0 (section 4.4), and for persistent sessions it is
in SQLite so a gateway restart keeps it too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.broker import packets
from gateway.models import Principal

if TYPE_CHECKING:
    import asyncio

__all__ = ["Link", "Outgoing", "Session", "Will"]


class Link(Protocol):
    """What a session needs of its live connection."""

    def write(self, data: bytes) -> None: ...

    @property
    def congested(self) -> bool: ...

    def wait_drain(self) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False  # only for a retained message sent because of a new subscription (section 3.3.1.3)
    pid: int = 0
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    sent: bool = False  # sent at least once: a resend carries DUP=1
    seq: int = 0  # row in mqtt_messages for a persistent session; 0 when not stored
    encoded_topic: bytes = b""  # the topic with its length prefix, encoded once per routed message

    def frame(self) -> bytes:
        if self.released:
            return packets.ack(packets.PUBREL, self.pid)
        topic = self.encoded_topic or packets.topic_bytes(self.topic)
        return packets.encode_publish(topic, self.payload, self.qos, self.retain, self.pid, self.sent)


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Session:
    __slots__ = (
        "acl",
        "clean",
        "client_id",
        "incoming",
        "inflight",
        "link",
        "next_pid",
        "principal",
        "publish_acl",
        "queue",
        "subscriptions",
        "username",
        "will",
    )

    def __init__(self, client_id: str, clean: bool, principal: Principal | None, username: str | None) -> None:
        self.client_id = client_id
        self.clean = clean
        self.principal = principal
        self.username = username
        self.subscriptions: dict[str, int] = {}
        # ACL decisions per topic (receive, publish), cleared whenever the accounts change
        self.acl: dict[str, bool] = {}
        self.publish_acl: dict[str, bool] = {}
        self.inflight: dict[int, Outgoing] = {}  # insertion order = send order
        self.queue: deque[Outgoing] = deque()
        self.incoming: dict[int, asyncio.Future[Any] | None] = {}  # QoS 2 packet ids awaiting PUBREL
        self.link: Link | None = None
        self.next_pid = 0
        self.will: Will | None = None

    @property
    def persistent(self) -> bool:
        return not self.clean

    def take_pid(self) -> int:
        """The next packet id not in flight (section 2.3.1: 1..65535, unique among unacknowledged)."""
        for _ in range(65535):
            self.next_pid = self.next_pid % 65535 + 1
            if self.next_pid not in self.inflight:
                return self.next_pid
        raise RuntimeError("no free packet identifier")

    def pending(self) -> int:
        return len(self.inflight) + len(self.queue)
