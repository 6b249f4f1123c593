"""The embedded broker: a subclass of amqtt 0.12.1's Broker (pinned; see tests/test_amqtt_pin.py).

What the subclass changes, each for a reason a user would notice:
- every accepted PUBLISH goes to ingest in-process, and a QoS 1 PUBACK is sent only once the message is
  committed to SQLite (MQTT 3.1.1 section 4.3.2: the receiver takes ownership when it sends PUBACK);
- a client's queued messages are ingested before its DISCONNECT is handled (stock drops them);
- the Last Will goes through ingest like any publish, so a device's `availability: offline` is recorded;
- ACL checks call the Gatekeeper directly (no Task per check); oversized payloads are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import INCOMING
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import ApplicationMessage, IncomingApplicationMessage, Session

from gateway.broker.security import Gatekeeper, principal_of
from gateway.config import MqttSection
from gateway.errors import StoreError
from gateway.ingest import Ingest, Message
from gateway.metrics import Metrics
from gateway.topics import filter_matches

__all__ = ["GatewayBroker", "bound_port", "broker_config"]

log = logging.getLogger(__name__)


def broker_config(cfg: MqttSection, gate: Gatekeeper) -> dict[str, Any]:
    """amqtt's config dict: our listeners and exactly our plugins (no defaults: they add Tasks per packet)."""
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{cfg.bind}:{cfg.port}", "max_connections": cfg.max_connections},
    }
    if cfg.ws_port >= 0:
        listeners["ws"] = {
            "type": "ws",
            "bind": f"{cfg.bind}:{cfg.ws_port}",
            "max_connections": cfg.max_connections,
        }
    return {
        "listeners": listeners,
        "plugins": {
            "gateway.broker.security.BosunAuthPlugin": {"gate": gate},
            "gateway.broker.security.BosunTopicPlugin": {"gate": gate},
        },
    }


def bound_port(broker: Broker, listener: str = "default") -> int:
    """The port a listener really bound (port 0 picks one); amqtt only exposes it through a private field."""
    server = broker._servers[listener].instance
    sockets = getattr(server, "sockets", None)
    if sockets:
        return int(sockets[0].getsockname()[1])
    return int(next(iter(server.sockets)).getsockname()[1])  # websockets server


class DurableMessage(IncomingApplicationMessage):
    """An incoming QoS 1 message that carries the future of its commit (the stock class has __slots__)."""

    __slots__ = ("stored",)

    def __init__(self, packet_id: int | None, topic: str, qos: int | None, data: bytes, retain: bool) -> None:
        super().__init__(packet_id, topic, qos, data, retain)
        self.stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class DurableHandler(BrokerProtocolHandler):
    """Sends a QoS 1 PUBACK after the message is on disk instead of when it is queued in memory."""

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        if publish_packet.qos != QOS_1:
            await super().handle_publish(publish_packet)
            return
        if publish_packet.topic_name is None or publish_packet.data is None or publish_packet.variable_header is None:
            return
        message = DurableMessage(
            publish_packet.variable_header.packet_id,
            publish_packet.topic_name,
            QOS_1,
            publish_packet.data,
            publish_packet.retain_flag,
        )
        message.publish_packet = publish_packet
        await self._handle_qos1_message_flow(message)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != INCOMING or not isinstance(app_message, DurableMessage):
            await super()._handle_qos1_message_flow(app_message)
            return
        assert self.session is not None
        await self.session.delivered_message_queue.put(app_message)
        # MQTT 3.1.1 section 4.3.2: PUBACK transfers ownership, so it waits for the COMMIT
        try:
            await app_message.stored
        except StoreError as exc:
            # not on disk, so not acknowledged: the device keeps the message and resends it (section 4.4)
            log.error("no PUBACK for %s packet %s: %s", self.session.client_id, app_message.packet_id, exc)
            return
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback


def _settle(message: ApplicationMessage | None, outcome: asyncio.Future[Any] | None = None) -> None:
    """Release a durable message's PUBACK: when its write commits, or now if it was not stored."""
    if not isinstance(message, DurableMessage) or message.stored.done():
        return
    if outcome is None:
        message.stored.set_result(None)
        return

    def done(result: asyncio.Future[Any]) -> None:
        if message.stored.done():
            return
        if not result.cancelled() and result.exception() is not None:
            message.stored.set_exception(StoreError(str(result.exception())))  # counted by ingest
        else:
            message.stored.set_result(None)

    outcome.add_done_callback(done)


class GatewayBroker(Broker):
    def __init__(
        self, config: dict[str, Any], gate: Gatekeeper, ingest: Ingest, metrics: Metrics, cfg: MqttSection
    ) -> None:
        super().__init__(config)
        self._gate = gate
        self._ingest = ingest
        self._metrics = metrics
        self._max_payload = cfg.max_payload

    def port(self, listener: str = "default") -> int:
        return bound_port(self, listener)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        # BrokerProtocolHandler is hard-coded in init_from_connect; DurableHandler adds no state of its own
        handler.__class__ = DurableHandler
        return handler, session

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        return self._gate.allowed(session, topic, action)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        return await self._deliver(client_session, wait_deliver.result())

    async def _deliver(self, session: Session, message: ApplicationMessage | None) -> bool:
        """Validate, authorize, ingest, route one incoming message. False closes the connection."""
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic:
            # MQTT 3.1.1 sections 4.7.3 and 3.3.2.1: a PUBLISH topic is non-empty and has no wildcards
            self._metrics.drops.labels("invalid_topic").inc()
            _settle(message)
            return False
        if topic.startswith("$"):
            # section 4.7.2: `$` topics are the server's; refuse, count, keep serving the connection
            self._metrics.drops.labels("dollar_topic").inc()
            _settle(message)
            return True
        if not self._gate.allowed(session, topic, Action.PUBLISH):
            _settle(message)
            return True
        if len(message.data) > self._max_payload:
            self._metrics.drops.labels("oversized_payload").inc()
            log.warning(
                "dropped %d-byte payload from %s on %r (max %d)",
                len(message.data),
                session.client_id,
                topic,
                self._max_payload,
            )
            _settle(message)
            return True
        stored = await self._ingest.accept(
            Message(
                session.client_id or "",
                topic,
                bytes(message.data),
                message.qos or 0,
                bool(message.publish_packet and message.publish_packet.retain_flag),
                time.time(),
            )
        )
        _settle(message, stored)
        await self._broadcast_message(session, topic, message.data)
        if message.publish_packet and message.publish_packet.retain_flag:
            await self.retain_message(session, topic, message.data, message.qos)
        return True

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # messages the client sent before DISCONNECT are still queued: ingest them first (stock drops them)
        await self._drain_session(client_session)
        result = disconnect_waiter.result()
        abnormal = result is None or not isinstance(result, DisconnectPacket)
        if abnormal and client_session.will_flag and client_session.will_topic:
            # MQTT 3.1.1 section 3.1.2.5: publish the will; through ingest so presence sees it
            await self._ingest.accept(
                Message(
                    client_session.client_id or "",
                    client_session.will_topic,
                    bytes(client_session.will_message or b""),
                    client_session.will_qos or 0,
                    bool(client_session.will_retain),
                    time.time(),
                )
            )
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        self._count_connected()

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        self._count_connected()
        await super()._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages for a filter the session holds, each checked against its ACL.

        Stock calls this at connect for every filter any client holds and sends matches without an ACL
        check, so one device could read another's retained topics (MQTT 3.1.1 section 3.3.1.3 sends only
        what the new subscription matches).
        """
        topic_filter = subscription[0]
        granted = [qos for s, qos in self._subscriptions.get(topic_filter, ()) if s.client_id == session.client_id]
        handler = self._get_handler(session)
        if not granted or handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    topic,
                    retained.data,
                    min(granted[0], granted[0] if retained.qos is None else retained.qos),
                    retain=True,
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if filter_matches(topic_filter, topic) and self._gate.allowed(session, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)

    async def _stop_handler(self, handler: BrokerProtocolHandler) -> None:
        # Close the socket before stock stop() cancels the reader: on Python 3.11, asyncio.wait_for swallows
        # a cancellation that lands while its read completes (bpo-42130), so under load the reader kept
        # running and shutdown hung. A closed socket ends the reader with EOF whatever the timing.
        if handler.writer is not None:
            try:
                await asyncio.wait_for(handler.writer.close(), 2)
            except (TimeoutError, OSError):
                log.debug("closing %s's socket timed out", handler.session.client_id if handler.session else "?")
        await super()._stop_handler(handler)

    async def _cleanup_session(self, client_id: str) -> None:
        # at shutdown: what a client already sent is ingested before its session goes away
        entry = self._sessions.get(client_id)
        if entry is not None:
            await self._drain_session(entry[0])
        await super()._cleanup_session(client_id)

    def _count_connected(self) -> None:
        counts = {"device": 0, "integration": 0, "anonymous": 0}
        for session, _ in self._sessions.values():
            principal = principal_of(session)
            if principal is not None and session.transitions.is_connected():
                counts[principal.kind] += 1
        for kind, value in counts.items():
            self._metrics.connected.labels(kind).set(value)

    def connected_clients(self) -> int:
        return sum(1 for s, _ in self._sessions.values() if s.transitions.is_connected())

    def queued_messages(self) -> int:
        return sum(s.delivered_message_queue.qsize() for s, _ in self._sessions.values())

    async def disconnect_client(self, client_id: str) -> bool:
        """Drop a client's connection now (a device was disabled or deleted). Its will is published."""
        entry = self._sessions.get(client_id)
        if entry is None or not entry[0].transitions.is_connected():
            return False
        await entry[1].handle_connection_closed()
        return True

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """The gateway's own publish (commands); not subject to device ACLs."""
        self._metrics.messages.labels(topic.rsplit("/", 2)[-2] if "/cmd/" in topic else "other", "out").inc()
        await self.internal_message_broadcast(topic, payload, qos)

    async def drain(self) -> None:
        """Ingest everything still queued in sessions (before the writer's last commit at shutdown)."""
        for session, _ in list(self._sessions.values()):
            await self._drain_session(session)

    async def _drain_session(self, session: Session) -> None:
        """Ingest what a session already received and queued (before DISCONNECT or shutdown drops it)."""
        queue = session.delivered_message_queue
        while not queue.empty():
            await self._deliver(session, queue.get_nowait())
