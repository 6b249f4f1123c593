"""The embedded broker: amqtt 0.12.1's Broker (pinned; see tests/test_amqtt_pin.py) with our own session core.

amqtt still owns the listeners (TCP, TLS, WebSocket), their connection limits and start/shutdown; each accepted
connection is handed to `Connection` (gateway/broker/connection.py) instead of amqtt's handler, and routing,
sessions and retained messages live here. Why, in terms a user would notice (measured in
../shared/research/amqtt-performance.md):
- routing through a topic trie with per-session ACL caches: 1,000 subscribed devices no longer cost 1,000
  filter checks per message (stock: ~600 msg/s at 1,000 clients);
- every accepted PUBLISH goes to ingest in-process and its PUBACK/PUBREC waits for the COMMIT (section 4.3);
- QoS is min(publish, subscription) (3.8.4), live deliveries carry RETAIN=0 (3.3.1.3), retained messages go
  only to the filter just subscribed and pass the RECEIVE ACL, `$` topics are refused and counted (4.7.2);
- keep-alive is enforced and the will published (3.1.2.10); in-flight messages are never dropped on a timer
  and persistent sessions (clean session 0) survive reconnects and restarts (3.1.2.4, 4.4);
- a connection over the listener's limit is refused at once instead of waiting forever for a slot.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import sys
import time
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import ListenerType

from gateway.broker import packets, persist
from gateway.broker.connection import Connection, StreamProtocol, Transport
from gateway.broker.persist import SessionStore
from gateway.broker.security import PUBLISH, RECEIVE, Gatekeeper
from gateway.broker.session import Outgoing, Session
from gateway.broker.trie import Trie
from gateway.broker.websocket import WsTransport
from gateway.config import MqttSection
from gateway.ingest import Ingest, Message
from gateway.metrics import Metrics
from gateway.models import Principal
from gateway.store.writer import Writer
from gateway.topics import filter_matches

__all__ = ["GatewayBroker", "bound_port", "broker_config"]

log = logging.getLogger(__name__)

_ACL_CACHE_MAX = 4096


def broker_config(cfg: MqttSection) -> dict[str, Any]:
    """amqtt's config dict: our listeners and no plugins (the defaults add Tasks per packet; we need none)."""
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{cfg.bind}:{cfg.port}", "max_connections": cfg.max_connections},
    }
    if cfg.ws_port >= 0:
        listeners["ws"] = {
            "type": "ws",
            "bind": f"{cfg.bind}:{cfg.ws_port}",
            "max_connections": cfg.max_connections,
        }
    return {"listeners": listeners, "plugins": {}}


def _moved(old: Principal | None, new: Principal) -> bool:
    if old is None or old.device is None or new.device is None:
        return False
    return (old.device.site, old.device.room, old.device.type) != (new.device.site, new.device.room, new.device.type)


def _both(first: asyncio.Future[Any], second: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Resolves when both have: with the first error, if any."""
    both = asyncio.gather(first, second)
    both.add_done_callback(lambda f: f.cancelled() or f.exception())
    return both


def bound_port(broker: Broker, listener: str = "default") -> int:
    """The port a listener really bound (port 0 picks one); amqtt only exposes it through a private field."""
    server = broker._servers[listener].instance
    sockets = getattr(server, "sockets", None)
    if sockets:
        return int(sockets[0].getsockname()[1])
    return int(next(iter(server.sockets)).getsockname()[1])  # websockets server


class GatewayBroker(Broker):
    def __init__(
        self,
        config: dict[str, Any],
        gate: Gatekeeper,
        ingest: Ingest,
        metrics: Metrics,
        cfg: MqttSection,
        writer: Writer,
    ) -> None:
        super().__init__(config)
        self.gate = gate
        self.ingest = ingest
        self.metrics = metrics
        self.cfg = cfg
        self.store_writer = writer
        # a PUBLISH may carry max_payload plus a topic of up to 65,535 bytes; anything longer is refused unread
        self.max_packet = cfg.max_payload + 65_542
        self._clients: dict[str, Session] = {}
        self._trie: Trie[Session] = Trie()
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._store: SessionStore | None = None
        self._connections: set[Connection] = set()
        self._paused: set[Connection] = set()  # stopped reading until the writer has room (backpressure)
        self._room_waiter: asyncio.Task[None] | None = None
        self._stopping = False
        self._collector_settings: tuple[int, int, int] | None = None
        self._switch_interval = sys.getswitchinterval()
        self._kinds = {"device": 0, "integration": 0, "anonymous": 0}
        self._out = metrics.messages.labels("relay", "out")
        self._out_count = 0  # deliveries of this loop turn, added to the counter once at its end (it takes a lock)
        self._slow = metrics.drops.labels("slow_subscriber")
        # the TLS listener's context, owned by gateway.tls (renewed in place): set before start()
        self.tls_context: ssl.SSLContext | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        sessions, retained, last_seq = await self.store_writer.run(persist.load)
        self._store = SessionStore(self.store_writer, last_seq)
        self._retained = retained
        for stored in sessions.values():
            principal = self.gate.principal(stored.username)
            if principal is None:
                # its account was deleted while the gateway was down
                self._store.delete(stored.client_id)
                continue
            session = Session(stored.client_id, False, principal, stored.username)
            self._clients[stored.client_id] = session
            for topic_filter, qos in stored.subscriptions.items():
                session.subscriptions[topic_filter] = qos
                self._trie.add(topic_filter, session, qos)
            for msg in stored.messages:
                if msg.pid:
                    session.inflight[msg.pid] = msg
                    session.next_pid = max(session.next_pid, msg.pid)
                else:
                    session.queue.append(msg)
        if sessions:
            log.info("restored %d persistent MQTT sessions, %d retained messages", len(sessions), len(retained))
        await super().start()
        self._collector_settings = gc.get_threshold()
        _quiet_collector()

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        """amqtt builds a context from files once; ours is the CA's live one, so a renewal reaches new handshakes."""
        if self.tls_context is not None:
            return self.tls_context
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        return context

    def port(self, listener: str = "default") -> int:
        return bound_port(self, listener)

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: Any,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        """TCP/TLS listeners serve `StreamProtocol` (bytes straight to the parser); WebSocket stays amqtt's."""
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: StreamProtocol(self, listener_name), address, port, reuse_address=True, ssl=ssl_context
        )

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        transport = WsTransport(websocket)
        conn = self.open_connection(listener_name, transport)
        if conn is not None:
            try:
                await transport.pump(conn)
            finally:
                conn.lost()

    def open_connection(self, listener_name: str, transport: Transport) -> Connection | None:
        """A client connected to a listener: its Connection, or None when refused (the socket is closed)."""
        server = self._servers.get(listener_name)
        if server is None or self._stopping:
            transport.close()
            return None
        if 0 < server.max_connections <= server.conn_count:
            # stock waited for a free slot with the socket open; refuse now so the client can back off
            self.metrics.auth_failures.labels("max_connections").inc()
            log.warning(
                "refused a connection from %s: %d connections is the limit", transport.peer(), server.max_connections
            )
            transport.close()
            return None
        server.conn_count += 1
        conn = Connection(self, transport)
        conn.listener = server
        self._connections.add(conn)
        conn.start()
        return conn

    def connection_ended(self, conn: Connection) -> None:
        """The slot is released whatever ended the connection (stock leaked it on refused CONNECTs)."""
        if conn in self._connections:
            self._connections.discard(conn)
            if conn.listener is not None:
                conn.listener.conn_count -= 1

    def resume_when_room(self, conn: Connection) -> None:
        """Backpressure: `conn` stopped reading; one waiter lets every paused connection go on once the writer
        has room again."""
        self._paused.add(conn)
        if self._room_waiter is None:
            self._room_waiter = asyncio.get_running_loop().create_task(self._wait_room())

    async def _wait_room(self) -> None:
        try:
            await self.store_writer.wait_room()
        finally:
            self._room_waiter = None
        paused, self._paused = self._paused, set()
        for conn in paused:
            conn.go_on()

    async def drain(self) -> None:
        """Kept for the runtime's stop order: every PUBLISH already read was handed to ingest when it was read."""

    async def shutdown(self) -> None:
        self._stopping = True
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        for conn in list(self._connections):
            conn.reason = "gateway stopping"
            conn.close()
        ended = [conn.ended for conn in self._connections]
        if ended:
            await asyncio.wait(ended, timeout=5)
        if self._room_waiter is not None:
            self._room_waiter.cancel()
        await super().shutdown()
        if self._collector_settings is not None:
            gc.unfreeze()  # a process that starts gateways one after another (tests) gets its memory back
            gc.set_threshold(*self._collector_settings)
            self._collector_settings = None
            sys.setswitchinterval(self._switch_interval)

    # -- sessions ------------------------------------------------------------------------------------------

    def attach(
        self, conn: Connection, client_id: str, clean: bool, username: str | None, principal: Principal
    ) -> tuple[Session, bool]:
        """Bind a connection to its session; returns (session, session present) for the CONNACK."""
        old = self._clients.get(client_id)
        if old is not None and old.link is not None:
            # section 3.1.4: a second connection with the same client id takes over; the first is closed
            previous = old.link
            log.info("client %s connected again from %s: closing its previous connection", client_id, conn.remote)
            self._drop_link(old, graceful=False)
            if isinstance(previous, Connection):
                previous.reason = "taken over by a new connection"
            previous.close()
            old = self._clients.get(client_id)
        present = False
        if old is not None and (clean or old.clean):
            self._discard(old)
            old = None
        if old is not None:
            session, present = old, True
        else:
            session = Session(client_id, clean, principal, username)
            self._clients[client_id] = session
        if not clean:
            assert self._store is not None
            self._store.create(client_id, username)
        session.principal = principal
        session.username = username
        session.acl.clear()
        session.publish_acl.clear()
        session.link = conn
        self._count(principal, 1)
        return session, present

    def resume(self, session: Session) -> None:
        """After CONNACK: resend what is unacknowledged with DUP=1 (section 4.4), then what waits."""
        link = session.link
        if link is None:
            return
        for msg in session.inflight.values():
            link.write(msg.frame())
            msg.sent = True
        self.pump(session)

    def detach(self, conn: Connection, graceful: bool) -> None:
        session = conn.session
        if session is not None and session.link is conn:
            self._drop_link(session, graceful)

    def _drop_link(self, session: Session, graceful: bool) -> None:
        session.link = None
        self._count(session.principal, -1)
        will, session.will = session.will, None
        if will is not None and not graceful and not self._stopping:
            # section 3.1.2.5: the will goes out when the connection ends without DISCONNECT; through ingest, so
            # a device's `availability: offline` is recorded like any publish
            self.accept(session, will.topic, will.payload, will.qos, will.retain)
        if session.clean:
            self._discard(session)

    def _discard(self, session: Session) -> None:
        for topic_filter in session.subscriptions:
            self._trie.remove(topic_filter, session)
        session.subscriptions.clear()
        session.queue.clear()
        session.inflight.clear()
        if self._clients.get(session.client_id) is session:
            del self._clients[session.client_id]
        if not session.clean:
            assert self._store is not None
            self._store.delete(session.client_id)

    def _count(self, principal: Principal | None, delta: int) -> None:
        if principal is not None:
            self._kinds[principal.kind] += delta
            self.metrics.connected.labels(principal.kind).set(self._kinds[principal.kind])

    def accounts_changed(self) -> None:
        """After a registry change: new ACL decisions; devices disabled, moved or deleted are disconnected."""
        for session in list(self._clients.values()):
            session.acl.clear()
            session.publish_acl.clear()
            old = session.principal
            principal = self.gate.principal(session.username)
            device = principal.device if principal is not None else None
            if principal is None or (old is not None and old.device is not None and device != old.device):
                self._registry_changed(session, gone=principal is None or _moved(old, principal))
            if principal is not None:
                session.principal = principal

    def _registry_changed(self, session: Session, gone: bool) -> None:
        link = session.link
        if link is not None:
            log.warning("disconnecting %s: its registry entry changed", session.client_id)
            if isinstance(link, Connection):
                link.reason = "registry entry changed"
            link.close()  # the will still goes out when the connection ends
        if gone and not session.clean:
            # deleted, or moved to another namespace: its stored subscriptions and queue no longer apply
            assert self._store is not None
            self._store.delete(session.client_id)
            session.clean = True  # discarded now, or when its closing connection detaches
            if link is None:
                self._discard(session)

    # -- inbound -------------------------------------------------------------------------------------------

    def accept(
        self, session: Session, topic: str, payload: bytes, qos: int, retain: bool
    ) -> asyncio.Future[Any] | None:
        """Store and route one PUBLISH from a client; the future resolves at its COMMIT (None: not stored)."""
        if topic[0] == "$":
            # section 4.7.2: `$` topics are the server's; refuse, count, keep serving the connection
            self.metrics.drops.labels("dollar_topic").inc()
            return None
        allowed = session.publish_acl.get(topic)
        if allowed is None:
            allowed = self.gate.allows(session.principal, topic, PUBLISH)
            if len(session.publish_acl) >= _ACL_CACHE_MAX:
                session.publish_acl.clear()
            session.publish_acl[topic] = allowed
        if not allowed:
            return None
        if not self.gate.within_limits(session.principal, qos, retain):
            return None  # the device's security profile: QoS above its max, or retain not allowed
        if len(payload) > self.cfg.max_payload:
            self.metrics.drops.labels("oversized_payload").inc()
            log.warning(
                "dropped %d-byte payload from %s on %r (max %d)",
                len(payload),
                session.client_id,
                topic,
                self.cfg.max_payload,
            )
            return None
        # copies for persistent sessions and the retained message are queued first, so the PUBACK, which waits
        # for the message's own rows, also covers them
        kept = self.route(topic, payload, qos)
        if retain:
            kept = self._retain(topic, payload, qos)
        stored = self.ingest.submit(Message(session.client_id, topic, payload, qos, retain, time.time()))
        if kept is None:
            return stored
        if stored is None:
            return kept
        return _both(stored, kept)  # the message's rows and its kept copies may commit in different groups

    def _retain(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[Any]:
        if payload:
            self._retained[topic] = (payload, qos)
        else:
            self._retained.pop(topic, None)  # section 3.3.1.3: a zero-byte retained message clears it
        assert self._store is not None
        return self._store.retain(topic, payload, qos)

    # -- outbound ------------------------------------------------------------------------------------------

    def route(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[Any] | None:
        """Deliver to every matching subscriber once, at min(publish QoS, subscription QoS) (section 3.8.4).

        Returns the write of the last copy kept for a persistent session, if any.
        """
        subscribers = self._trie.match(topic)
        if not subscribers:
            return None
        frame0: bytes | None = None
        encoded = b""
        kept: asyncio.Future[Any] | None = None
        for session, granted in subscribers.items():
            allowed = session.acl.get(topic)
            if allowed is None:
                allowed = self._may_receive(session, topic)
            if not allowed:
                continue
            if not self._out_count:
                asyncio.get_running_loop().call_soon(self._count_out)
            self._out_count += 1
            q = qos if qos < granted else granted
            if q == 0:
                link = session.link
                if link is None:
                    continue  # QoS 0 is not queued for an offline client (section 3.1.2.4 allows either)
                if link.congested:
                    self._slow.inc()
                    continue
                if frame0 is None:
                    encoded = encoded or packets.topic_bytes(topic)
                    frame0 = packets.encode_publish(encoded, payload, 0, False)
                link.write(frame0)
            else:
                encoded = encoded or packets.topic_bytes(topic)
                msg = Outgoing(topic, payload, q, encoded_topic=encoded)
                kept = self._enqueue(session, msg) or kept
        return kept

    def _count_out(self) -> None:
        count, self._out_count = self._out_count, 0
        self._out.inc(count)

    def _may_receive(self, session: Session, topic: str) -> bool:
        allowed = self.gate.allows(session.principal, topic, RECEIVE)
        if len(session.acl) >= _ACL_CACHE_MAX:
            session.acl.clear()
        session.acl[topic] = allowed
        return allowed

    def _enqueue(self, session: Session, msg: Outgoing) -> asyncio.Future[Any] | None:
        link = session.link
        store = self._store
        assert store is not None
        kept = None
        if (
            link is not None
            and not session.queue
            and len(session.inflight) < self.cfg.max_inflight
            and not link.congested
        ):
            msg.pid = session.take_pid()
            session.inflight[msg.pid] = msg
            if not session.clean:
                kept = store.add(session.client_id, msg)
            link.write(msg.frame())
            msg.sent = True
            return kept
        if not session.clean:
            kept = store.add(session.client_id, msg)
        if len(session.queue) >= self.cfg.session_queue_max:
            dropped = session.queue.popleft()
            self.metrics.drops.labels("session_queue_full").inc()
            log.warning(
                "session queue of %s is full: dropped its oldest message on %r", session.client_id, dropped.topic
            )
            if dropped.seq:
                store.remove(session.client_id, dropped)
        session.queue.append(msg)
        if link is not None and link.congested:
            link.wait_drain()
        return kept

    def pump(self, session: Session) -> None:
        """Send queued messages while the in-flight window and the socket have room."""
        link = session.link
        if link is None or not session.queue:
            return
        store = self._store
        assert store is not None
        while session.queue and len(session.inflight) < self.cfg.max_inflight:
            if link.congested:
                link.wait_drain()
                return
            msg = session.queue.popleft()
            msg.pid = session.take_pid()
            session.inflight[msg.pid] = msg
            if msg.seq:
                store.update(session.client_id, msg)
            link.write(msg.frame())
            msg.sent = True

    def delivered(self, session: Session, pid: int) -> None:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is the client's now."""
        msg = session.inflight.pop(pid, None)
        if msg is None:
            return
        if msg.seq:
            assert self._store is not None
            self._store.remove(session.client_id, msg)
        self.pump(session)

    def released(self, session: Session, pid: int) -> None:
        """PUBREC: answer PUBREL, and remember it so a reconnect resends PUBREL, not the PUBLISH (section 4.4)."""
        msg = session.inflight.get(pid)
        if msg is None or msg.qos != 2 or session.link is None:
            return
        if not msg.released:
            msg.released = True
            if msg.seq:
                assert self._store is not None
                self._store.update(session.client_id, msg)
        session.link.write(msg.frame())

    def send_retained(self, session: Session, topic_filter: str, granted: int) -> None:
        """Section 3.3.1.3: retained messages matching a new subscription, RETAIN=1, each through the ACL."""
        link = session.link
        if link is None:
            return
        for topic, (payload, qos) in list(self._retained.items()):
            if not filter_matches(topic_filter, topic) or not self._may_receive(session, topic):
                continue
            q = min(qos, granted)
            if q == 0:
                link.write(packets.encode_publish(packets.topic_bytes(topic), payload, 0, True))
            else:
                self._enqueue(session, Outgoing(topic, payload, q, retain=True))

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> None:
        session.subscriptions[topic_filter] = qos
        self._trie.add(topic_filter, session, qos)  # replaces an existing one's QoS (section 3.8.4)
        if not session.clean:
            assert self._store is not None
            self._store.subscribe(session.client_id, topic_filter, qos)

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        if session.subscriptions.pop(topic_filter, None) is None:
            return
        self._trie.remove(topic_filter, session)
        if not session.clean:
            assert self._store is not None
            self._store.unsubscribe(session.client_id, topic_filter)

    # -- the gateway's own use -----------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """The gateway's own publish (commands); not subject to device ACLs."""
        self.metrics.messages.labels(topic.rsplit("/", 2)[-2] if "/cmd/" in topic else "other", "out").inc()
        self.route(topic, payload, qos)

    def connected_clients(self) -> int:
        return sum(1 for s in self._clients.values() if s.link is not None)

    def queued_messages(self) -> int:
        return sum(s.pending() for s in self._clients.values())

    def session(self, client_id: str) -> Session | None:
        return self._clients.get(client_id)

    async def disconnect_client(self, client_id: str) -> bool:
        """Drop a client's connection now (a device was disabled or deleted). Its will is published."""
        session = self._clients.get(client_id)
        if session is None or session.link is None:
            return False
        session.link.close()
        return True


# Measured under make bench (10,000 msg/s, 20 s window, machine shared with other work; gc.callbacks timing):
# with the stock thresholds (700, 10, 10) the loop stopped for 8 full collections (p50 212 ms, max 459 ms) and
# 89 second-generation ones (max 406 ms), 3.3 s of pauses in all, each one a PUBACK stall for every device.
# Frozen start-up objects and a larger first generation: no full collection in the window, 4 second-generation
# ones (max 44 ms), 0.7 s in all.
_GC_THRESHOLDS = (10_000, 10, 10)
# How long the event loop may keep the GIL when the store's writer thread asks for it (Python's default: 5 ms). The
# thread's op releases the GIL around every SQLite call and waits to get it back each time, while the bulk child
# waits for the op: at 10,000 msg/s an op's turn took 15-25 ms on average with the default, 9-15 ms with 0.5 ms,
# and FULL PUBACK p99 over 15 s runs fell from 168-308 ms to 91-178 ms.
_SWITCH_INTERVAL_S = 0.0005


def _quiet_collector() -> None:
    """The cyclic collector's pauses stop the whole event loop; keep them short and rare once serving.

    `gc.freeze()` moves every object alive now (modules, classes, the app, the registry) out of the collector's
    reach, so a full collection only walks what was allocated since; the larger first-generation threshold lets
    the short-lived objects of a message (rows, futures, decoded payloads) die before a collection promotes them.
    """
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
