"""One MQTT client connection: read, parse and act on packets in order, in one coroutine.

Why not amqtt's handler: it ran a Task per packet, a `wait_for` per read and ignored keep-alive. Here a read
returns whatever bytes arrived, the parser cuts them into packets and each is handled inline, in order, so
what a client sent before its DISCONNECT is always processed (stock lost it on Python 3.12+). Acks for
QoS 1/2 wait for the COMMIT of the message and still go out in PUBLISH order (MQTT 3.1.1 section 4.6).
While the writer is congested the loop stops reading: the client's TCP window fills and it slows down.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from gateway.broker import packets
from gateway.broker.packets import Malformed
from gateway.broker.security import SUBSCRIBE
from gateway.broker.session import Session, Will
from gateway.topics import valid_filter

if TYPE_CHECKING:
    from gateway.broker.server import GatewayBroker

__all__ = ["Connection", "StreamProtocol", "Transport"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_HIGH_WATER = 1 << 20  # bytes buffered for a client before it counts as slow
_FLUSH_AT = 1 << 16  # bytes of output gathered in one loop turn before they are written without waiting for its end


class Transport:
    """Bytes out over TCP/TLS (an asyncio transport); bytes in reach `Connection.feed` from `StreamProtocol`.
    The WebSocket listener subclasses it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._out_size = 0
        self._drained: asyncio.Future[None] | None = None  # set while the transport has paused our writing

    def write(self, data: bytes) -> None:
        """Buffer until the end of this loop iteration: one send() per client per iteration, not per packet."""
        if not self._out:
            if self._transport.is_closing():
                return
            self._loop.call_soon(self._flush)
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= _FLUSH_AT:
            # one loop turn may read megabytes from a fast publisher (libuv reads a socket until it is empty):
            # hand them to the socket as they come instead of counting a subscriber slow that is only waiting
            self._flush()

    def write_now(self, data: bytes) -> None:
        """Send at once unless this iteration already buffered output (then after it, in order)."""
        if self._out:
            self.write(data)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        self._out_size = 0
        if not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    @property
    def congested(self) -> bool:
        return self._out_size + self._transport.get_write_buffer_size() >= _HIGH_WATER

    def writing_paused(self) -> None:
        if self._drained is None:
            self._drained = self._loop.create_future()

    def writing_resumed(self) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drained(self) -> None:
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def peer_certificate(self) -> dict[str, Any] | None:
        """The client certificate the TLS listener verified against the gateway's CA (None: plain TCP, or none sent)."""
        cert = self._transport.get_extra_info("peercert")
        return cert if isinstance(cert, dict) and cert else None

    def peer(self) -> str:
        info = self._transport.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if isinstance(info, tuple) else "?"


class StreamProtocol(asyncio.Protocol):
    """A TCP/TLS listener's connection: bytes go straight from the event loop's read callback to the parser.

    Why not asyncio streams: a StreamReader wakes a coroutine (a Future, a Task step) for every read, which was
    about a fifth of the event loop's time at 10,000 msg/s from 1,000 devices.
    """

    def __init__(self, broker: GatewayBroker, listener_name: str) -> None:
        self._broker = broker
        self._listener = listener_name
        self._transport: Transport | None = None
        self._conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike
        self._transport = Transport(cast(asyncio.Transport, transport))
        self._conn = self._broker.open_connection(self._listener, self._transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            conn.feed(data)

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours (MQTT has no half-open use)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.writing_paused()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.writing_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport.writing_resumed()
        if self._conn is not None:
            self._conn.lost()


class Connection:
    """Packets are handled as their bytes arrive (`feed`), in order. Two things pause reading: a CONNECT being
    authenticated (the packets read after it wait in `_pending`) and a congested writer (backpressure)."""

    def __init__(self, broker: GatewayBroker, transport: Transport) -> None:
        self.broker = broker
        self.transport = transport
        self.session: Session | None = None
        self.remote = transport.peer()
        self._loop = asyncio.get_running_loop()
        self._parser = packets.Parser(broker.max_packet)
        self._acks: deque[tuple[int, int, asyncio.Future[Any] | None]] = deque()
        self._pending: list[tuple[int, int, bytes]] = []
        self._waiting = False  # packets wait in _pending: a CONNECT is being authenticated, or the writer is full
        self._keep_alive = 0.0
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._graceful = False
        self._closed = False
        self._finished = False
        self._draining: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.ended: asyncio.Future[None] = self._loop.create_future()
        self.listener: Any = None  # amqtt's Server whose connection count holds a slot for this connection
        self.reason = "closed by client"
        self.write = transport.write  # what the broker sends this client (routing calls it once per delivery)

    # -- reading -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._timer = self._loop.call_later(self.broker.cfg.connect_timeout_s, self._connect_timeout)

    def feed(self, data: bytes) -> None:
        """Bytes from the client: parse and handle every whole packet now."""
        if self._closed:
            return
        self._last_rx = self._loop.time()
        try:
            found = self._parser.feed(data)
        except Malformed as exc:
            self._malformed(exc)
            return
        if self._waiting:
            self._pending.extend(found)
            return
        self._handle(found)

    def _handle(self, found: list[tuple[int, int, bytes]]) -> None:
        try:
            for index, (kind, flags, body) in enumerate(found):
                if self._closed:
                    return
                if self.session is None:
                    # section 3.1.0: the first packet is CONNECT, and only the first
                    if kind != packets.CONNECT:
                        raise Malformed("section 3.1.0: the first packet must be CONNECT")
                    self._wait(found[index + 1 :])
                    self._connecting = self._loop.create_task(self._connect(body))
                    return
                if kind == packets.PUBLISH:
                    self._on_publish(flags, body)
                elif kind == packets.PUBACK or kind == packets.PUBCOMP:
                    self._on_done(packets.decode_pid(body))
                elif kind == packets.PINGREQ:
                    self.transport.write(packets.pingresp())
                elif kind == packets.CONNECT:
                    raise Malformed("section 3.1.0: a second CONNECT")
                elif kind == packets.PUBREC:
                    self._on_pubrec(packets.decode_pid(body))
                elif kind == packets.PUBREL:
                    self._on_pubrel(packets.decode_pid(body))
                elif kind == packets.SUBSCRIBE:
                    self._on_subscribe(body)
                elif kind == packets.UNSUBSCRIBE:
                    self._on_unsubscribe(body)
                elif kind == packets.DISCONNECT:
                    self._graceful = True
                    self.reason = "DISCONNECT"
                    self.close()
                    return
                else:
                    raise Malformed(f"section 2.2.1: a client may not send packet type {kind}")
        except Malformed as exc:
            self._malformed(exc)
            return
        except Exception:
            self._failed()
            return
        if self.broker.store_writer.congested:
            # backpressure: stop reading until the writer catches up (the socket buffers, then TCP pushes back)
            self.broker.metrics.drops.labels("backpressure_pause").inc()
            self._wait([])
            self.broker.resume_when_room(self)

    def _wait(self, rest: list[tuple[int, int, bytes]]) -> None:
        self._waiting = True
        self._pending.extend(rest)
        self.transport.pause_reading()

    def go_on(self) -> None:
        """Reading may resume: handle what was read meanwhile, then take new bytes."""
        if self._closed or not self._waiting:
            return
        self._waiting = False
        pending, self._pending = self._pending, []
        self.transport.resume_reading()
        if pending:
            self._handle(pending)

    def _failed(self) -> None:
        log.exception("closing %s (%s) after an unexpected error", self._name(), self.remote)
        self.reason = "internal error"
        self.close()

    def _malformed(self, exc: Malformed) -> None:
        self.broker.metrics.drops.labels("protocol_error").inc()
        log.warning("closing %s (%s): %s", self._name(), self.remote, exc)
        self.reason = f"protocol error: {exc}"
        self.close()

    # -- CONNECT -------------------------------------------------------------------------------------------

    async def _connect(self, body: bytes) -> None:
        try:
            accepted = await self._on_connect(body)
        except Malformed as exc:
            self._malformed(exc)
            return
        except Exception:
            self._failed()
            return
        finally:
            self._connecting = None
        if not accepted:
            self.close()
            return
        self.go_on()

    async def _on_connect(self, body: bytes) -> bool:
        request = packets.decode_connect(body)
        if request.level != 4:
            # section 3.1.2.2: unsupported protocol level -> return code 1 and close
            self.transport.write(packets.connack(False, 1))
            self.reason = f"protocol level {request.level}"
            self.broker.metrics.auth_failures.labels("protocol_level").inc()
            return False
        if request.errors:
            self.transport.write(packets.connack(False, 4))
            self.reason = request.errors[0]
            return False
        if not request.client_id:
            if not request.clean:
                # section 3.1.3.1: an empty client id needs clean session 1
                self.transport.write(packets.connack(False, 2))
                self.reason = "empty client id with clean session 0"
                return False
            request.client_id = f"auto-{secrets.token_hex(8)}"
        principal = await self.broker.gate.authenticate(
            request.client_id,
            request.username,
            request.password,
            request.will_topic,
            self.remote,
            self.transport.peer_certificate(),
        )
        if principal is None or self._closed:
            self.transport.write(packets.connack(False, 5))
            self.reason = "not authorized"
            return False
        will = None
        if request.will_topic is not None:
            will = Will(request.will_topic, request.will_payload, request.will_qos, request.will_retain)
        session, present = self.broker.attach(self, request.client_id, request.clean, request.username, principal)
        session.will = will
        self.session = session
        self.transport.write(packets.connack(present, 0))
        self._keep_alive = request.keep_alive * 1.5  # section 3.1.2.10
        self._arm()
        self.broker.resume(session)
        return True

    def _connect_timeout(self) -> None:
        if self.session is None and not self._closed:
            self.reason = "no CONNECT in time"
            self.broker.metrics.drops.labels("connect_timeout").inc()
            self.close()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._keep_alive > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._last_rx + self._keep_alive, self._check_alive)

    def _check_alive(self) -> None:
        """Section 3.1.2.10: nothing heard for 1.5 x keep-alive: close as if the network failed (will goes out)."""
        self._timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        deadline = self._last_rx + self._keep_alive
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._check_alive)
            return
        self.reason = f"keep-alive expired ({self._keep_alive / 1.5:g} s x 1.5)"
        self.broker.metrics.drops.labels("keepalive_timeout").inc()
        log.info("closing %s (%s): %s", self._name(), self.remote, self.reason)
        self.close()

    # -- inbound PUBLISH and its acknowledgement -----------------------------------------------------------

    def _on_publish(self, flags: int, body: bytes) -> None:
        topic, pid, payload = packets.decode_publish(flags, body)
        qos = (flags >> 1) & 3
        session = self.session
        assert session is not None
        if qos == 2 and pid in session.incoming:
            # section 4.3.3: a resent QoS 2 PUBLISH before PUBREL is not a new message; PUBREC it again
            self._ack_after(packets.PUBREC, pid, session.incoming[pid])
            return
        if not topic or "+" in topic or "#" in topic:
            self.broker.metrics.drops.labels("invalid_topic").inc()
            raise Malformed(f"section 3.3.2.1: PUBLISH topic {topic!r} is empty or has wildcards")
        stored = self.broker.accept(session, topic, payload, qos, bool(flags & 1))
        if qos == 1:
            self._ack_after(packets.PUBACK, pid, stored)
        elif qos == 2:
            session.incoming[pid] = stored
            self._ack_after(packets.PUBREC, pid, stored)

    def _ack_after(self, kind: int, pid: int, stored: asyncio.Future[Any] | None) -> None:
        """Acknowledge once `stored` commits (None: nothing to store), keeping PUBLISH order (section 4.6)."""
        if stored is None and not self._acks:
            self.transport.write(packets.ack(kind, pid))
            return
        acks = self._acks
        # one callback per write waited for: acks queued behind the same write are released by its callback
        if stored is not None and not (acks and acks[-1][2] is stored):
            stored.add_done_callback(self._flush_acks)
        acks.append((kind, pid, stored))

    def _flush_acks(self, _: object = None) -> None:
        acks = self._acks
        out: list[bytes] = []
        while acks:
            kind, pid, stored = acks[0]
            if stored is not None:
                if not stored.done():
                    break
                if stored.cancelled() or stored.exception() is not None:
                    # not on disk, so not acknowledged: the client keeps it and resends it (section 4.4)
                    acks.popleft()
                    log.error("no acknowledgement for %s packet %d: the write failed", self._name(), pid)
                    if kind == packets.PUBREC and self.session is not None:
                        self.session.incoming.pop(pid, None)
                    continue
            acks.popleft()
            out.append(packets.ack(kind, pid))
        if out:
            # called back by the COMMIT, so nothing else for this client is likely buffered: no extra loop turn
            self.transport.write_now(out[0] if len(out) == 1 else b"".join(out))

    def _on_pubrel(self, pid: int) -> None:
        assert self.session is not None
        self.session.incoming.pop(pid, None)
        self.transport.write(packets.ack(packets.PUBCOMP, pid))  # section 4.3.3: PUBCOMP even for an unknown id

    # -- outbound acknowledgements -------------------------------------------------------------------------

    def _on_done(self, pid: int) -> None:
        if self.session is not None:
            self.broker.delivered(self.session, pid)

    def _on_pubrec(self, pid: int) -> None:
        assert self.session is not None
        self.broker.released(self.session, pid)

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------------------

    def _on_subscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        pid, requests = packets.decode_subscribe(body)
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        for topic_filter, qos in requests:
            if not valid_filter(topic_filter) or not self.broker.gate.allows(
                session.principal, topic_filter, SUBSCRIBE
            ):
                codes.append(0x80)  # section 3.9.3: failure
                continue
            qos = min(qos, self.broker.gate.max_qos(session.principal))  # section 3.9.3: a lower QoS may be granted
            self.broker.subscribe(session, topic_filter, qos)
            codes.append(qos)
            granted.append((topic_filter, qos))
        self.transport.write(packets.suback(pid, codes))
        for topic_filter, qos in granted:
            self.broker.send_retained(session, topic_filter, qos)

    def _on_unsubscribe(self, body: bytes) -> None:
        session = self.session
        assert session is not None
        pid, filters = packets.decode_unsubscribe(body)
        for topic_filter in filters:
            self.broker.unsubscribe(session, topic_filter)
        self.transport.write(packets.unsuback(pid))

    # -- output and closing --------------------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        return self.transport.congested

    def wait_drain(self) -> None:
        """A slow client's buffer is full: deliver what waits in its session once it drains."""
        if self._draining is not None or self._closed:
            return

        async def drain() -> None:
            await self.transport.drained()
            self._draining = None
            if self.session is not None and self.session.link is self:
                self.broker.pump(self.session)

        self._draining = asyncio.get_running_loop().create_task(drain())

    def close(self) -> None:
        """Close the socket; `lost` follows and publishes the will unless the client sent DISCONNECT."""
        if not self._closed:
            self._closed = True
            self.transport.close()

    def lost(self) -> None:
        """The connection is gone (closed by either side): release the session and the listener slot once."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self.transport.close()
        if self.session is not None:
            self.broker.detach(self, graceful=self._graceful)
        self.broker.connection_ended(self)
        if not self.ended.done():
            self.ended.set_result(None)

    def _name(self) -> str:
        return self.session.client_id if self.session is not None else "a client"
