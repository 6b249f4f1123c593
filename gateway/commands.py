"""Commands to devices: `cmd/{name}` at QoS 2 with a command id, tracked until the device's `ack`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import RegistryError
from gateway.store.records import audit
from gateway.store.registry import get_device
from gateway.store.writer import Writer
from gateway.topics import command_topic, valid_segment

__all__ = ["COMMAND_NAMES", "MARK_SENT_SQL", "CommandRow", "Commands"]

COMMAND_NAMES = ("reset", "config", "identify", "notify", "ota")


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int) -> None: ...


@dataclass(frozen=True)
class CommandRow:
    command_id: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str
    detail: str | None
    created_at: float
    sent_at: float | None
    acked_at: float | None
    created_by: str | None


# an ack may already have arrived: only a pending command becomes 'sent'
MARK_SENT_SQL = (
    "UPDATE commands SET sent_at = ?, status = CASE status WHEN 'pending' THEN 'sent' ELSE status END "
    "WHERE command_id = ?"
)
COMMAND_COLUMNS = "command_id, device_id, name, args, status, detail, created_at, sent_at, acked_at, created_by"


def command_row(row: tuple[Any, ...]) -> CommandRow:
    return CommandRow(row[0], row[1], row[2], json.loads(row[3]), *row[4:])


class Commands:
    def __init__(self, root: str, writer: Writer, publisher: Publisher) -> None:
        self._root = root
        self._writer = writer
        self._publisher = publisher

    async def send(self, device_id: str, name: str, args: dict[str, Any], actor: str) -> CommandRow:
        """Record the command, publish it at QoS 2, mark it sent; the device's ack completes it."""
        if not valid_segment(name):
            raise RegistryError(f"command name {name!r} must be 1-64 characters of [A-Za-z0-9_-]")
        if "command_id" in args:
            raise RegistryError("args may not set command_id: the gateway assigns it")
        command_id = uuid.uuid4().hex
        now = time.time()

        def record(conn: Any) -> str:
            device = get_device(conn, device_id)
            if device.disabled:
                raise RegistryError(f"device {device_id} is disabled")
            conn.execute(
                "INSERT INTO commands(command_id, device_id, name, args, status, created_at, created_by) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (command_id, device_id, name, json.dumps(args), now, actor),
            )
            audit(conn, actor, "command.send", device_id, {"command_id": command_id, "name": name})
            return command_topic(self._root, device.site, device.room, device.type, device_id, name)

        topic = await self._writer.run(record)
        payload = json.dumps({"command_id": command_id, **args}).encode()
        await self._publisher.publish(topic, payload, 2)
        sent_at = time.time()

        def mark_sent(conn: Any) -> CommandRow:
            conn.execute(MARK_SENT_SQL, (sent_at, command_id))
            return command_row(
                conn.execute(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ?", (command_id,)).fetchone()
            )

        result: CommandRow = await self._writer.run(mark_sent)
        return result
