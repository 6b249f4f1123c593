"""Persistent MQTT sessions and retained messages in SQLite (MQTT 3.1.1 sections 3.1.2.4 and 3.3.1.3).

Every change is a writer op queued in the order it happened, so it commits no later than the PUBLISH that
caused it: once a publisher has its PUBACK, the copies queued for offline subscribers are on disk too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.broker.session import Outgoing
from gateway.store.writer import Writer

__all__ = ["SessionStore", "StoredSession", "load"]


@dataclass
class StoredSession:
    client_id: str
    username: str | None = None
    subscriptions: dict[str, int] = field(default_factory=dict)
    messages: list[Outgoing] = field(default_factory=list)


def load(conn: sqlite3.Connection) -> tuple[dict[str, StoredSession], dict[str, tuple[bytes, int]], int]:
    """Sessions, retained messages and the highest message sequence number, as stored."""
    sessions = {
        cid: StoredSession(cid, user) for cid, user in conn.execute("SELECT client_id, username FROM mqtt_sessions")
    }
    for cid, topic_filter, qos in conn.execute("SELECT client_id, filter, qos FROM mqtt_subscriptions"):
        sessions[cid].subscriptions[topic_filter] = qos
    rows = conn.execute(
        "SELECT client_id, seq, topic, payload, qos, pid, released FROM mqtt_messages ORDER BY client_id, seq"
    )
    last = 0
    for cid, seq, topic, payload, qos, pid, released in rows:
        sessions[cid].messages.append(Outgoing(topic, bytes(payload), qos, False, pid, bool(released), pid != 0, seq))
        last = max(last, seq)
    retained = {t: (bytes(p), q) for t, p, q in conn.execute("SELECT topic, payload, qos FROM mqtt_retained")}
    return sessions, retained, last


class SessionStore:
    """Queues the writes that mirror session state; fire and forget (a failure is logged by the writer's op)."""

    def __init__(self, writer: Writer, last_seq: int) -> None:
        self._writer = writer
        self._seq = last_seq

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _submit(self, sql: str, params: tuple[object, ...]) -> asyncio.Future[Any]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(sql, params)

        return self._writer.submit(op)

    def create(self, client_id: str, username: str | None) -> None:
        # not INSERT OR REPLACE: a replaced row would cascade-delete the session's subscriptions and messages
        self._submit(
            "INSERT INTO mqtt_sessions(client_id, username, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET username = excluded.username",
            (client_id, username, time.time()),
        )

    def delete(self, client_id: str) -> None:
        self._submit("DELETE FROM mqtt_sessions WHERE client_id = ?", (client_id,))

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        self._submit(
            "INSERT OR REPLACE INTO mqtt_subscriptions(client_id, filter, qos) VALUES (?, ?, ?)",
            (client_id, topic_filter, qos),
        )

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        self._submit("DELETE FROM mqtt_subscriptions WHERE client_id = ? AND filter = ?", (client_id, topic_filter))

    def add(self, client_id: str, msg: Outgoing) -> asyncio.Future[Any]:
        msg.seq = self.next_seq()
        return self._submit(
            "INSERT INTO mqtt_messages(client_id, seq, topic, payload, qos, pid, released) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (client_id, msg.seq, msg.topic, msg.payload, msg.qos, msg.pid, int(msg.released)),
        )

    def update(self, client_id: str, msg: Outgoing) -> None:
        self._submit(
            "UPDATE mqtt_messages SET pid = ?, released = ? WHERE client_id = ? AND seq = ?",
            (msg.pid, int(msg.released), client_id, msg.seq),
        )

    def remove(self, client_id: str, msg: Outgoing) -> None:
        self._submit("DELETE FROM mqtt_messages WHERE client_id = ? AND seq = ?", (client_id, msg.seq))

    def retain(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[Any]:
        if payload:
            return self._submit(
                "INSERT OR REPLACE INTO mqtt_retained(topic, payload, qos) VALUES (?, ?, ?)", (topic, payload, qos)
            )
        return self._submit("DELETE FROM mqtt_retained WHERE topic = ?", (topic,))
