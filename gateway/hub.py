"""The live bus: in-process pub/sub of gateway events (new press, presence, command ack) with bounded queues.

A slow subscriber never slows ingest: when its queue is full the event is dropped for it and counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.metrics import Metrics

__all__ = ["Hub"]


class Hub:
    def __init__(self, metrics: Metrics, queue_size: int = 1000) -> None:
        self._subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self._metrics = metrics
        self._queue_size = queue_size

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for queue in self._subscribers:
            try:
                queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                self._metrics.drops.labels("hub_subscriber_full").inc()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[tuple[str, dict[str, Any]]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
