"""Press-to-watch-notify latency: a guest button presses, a crew watch is told, the watch completes the call.

One call at a time, so every press opens a new call (a press while the room's call is open would only join
it): press, wait for the watch's `cmd/notify` state "new" (the sample), ack `done`, wait for the button's
"completed", next press. The rest of the benchmark's load runs meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from gateway.bench import stats
from gateway.bench.loadgen import Connection, open_connection
from gateway.bench.seed import Device

__all__ = ["CallProbe"]

_WAIT_S = 2.0  # a notify later than this counts as lost for the figure (it is still delivered)


class CallProbe:
    def __init__(self, watch: Device, caller: Device, root: str) -> None:
        self.watch_device = watch
        self.caller_device = caller
        self.root = root
        self.watch: Connection | None = None
        self.caller: Connection | None = None
        self.samples: list[tuple[float, float]] = []  # (pressed at, latency)
        self.lost: list[float] = []
        self.error: str | None = None
        self.sequence = int(time.time()) * 1000
        self._notified: asyncio.Future[dict[str, Any]] | None = None
        self._completed: asyncio.Future[None] | None = None

    async def open(self, host: str, port: int) -> None:
        w, c = self.watch_device, self.caller_device
        try:
            self.watch = await open_connection(
                host,
                port,
                w.device_id,
                w.device_id,
                w.password,
                ((w.topic(self.root, "cmd/#"), 1),),
                on_message=self._on_watch,
            )
            self.caller = await open_connection(
                host,
                port,
                c.device_id,
                c.device_id,
                c.password,
                ((c.topic(self.root, "cmd/#"), 1),),
                on_message=self._on_caller,
            )
            self.watch.send_publish(w.topic(self.root, "availability"), b"online", 1, time.monotonic())
        except (OSError, RuntimeError, TimeoutError, PermissionError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _on_watch(self, topic: str, payload: bytes, now: float) -> None:
        body = json.loads(payload)
        future = self._notified
        if (
            body.get("state") == "new"
            and body.get("device_id") == self.caller_device.device_id
            and future
            and not future.done()
        ):
            future.set_result({**body, "at": now})

    def _on_caller(self, topic: str, payload: bytes, now: float) -> None:
        future = self._completed
        if json.loads(payload).get("state") == "completed" and future and not future.done():
            future.set_result(None)

    async def run(self, start: float, end: float, rate: float = 5.0) -> None:
        if self.watch is None or self.caller is None:
            return
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        loop = asyncio.get_running_loop()
        next_at = time.monotonic()
        while next_at < end:
            self._notified, self._completed = loop.create_future(), loop.create_future()
            self.sequence += 1
            pressed = time.monotonic()
            press = {"sequence_id": self.sequence, "press_type": "single", "timestamp": time.time()}
            self.caller.send_publish(
                self.caller_device.topic(self.root, "press"), json.dumps(press).encode(), 1, pressed
            )
            try:
                async with asyncio.timeout(_WAIT_S):
                    notify = await self._notified
                self.samples.append((pressed, notify["at"] - pressed))
                ack = {"command_id": notify["command_id"], "status": "done"}
                self.watch.send_publish(
                    self.watch_device.topic(self.root, "ack"), json.dumps(ack).encode(), 1, time.monotonic()
                )
                async with asyncio.timeout(_WAIT_S):
                    await self._completed
            except TimeoutError:
                self.lost.append(pressed)
            next_at = max(next_at + 1.0 / rate, time.monotonic())
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def figures(self, window: tuple[float, float]) -> dict[str, Any]:
        inside = [latency for pressed, latency in self.samples if window[0] <= pressed < window[1]]
        lost = sum(1 for pressed in self.lost if window[0] <= pressed < window[1])
        return {**stats.summary(inside), "lost": lost, "error": self.error}

    def close(self) -> None:
        for conn in (self.watch, self.caller):
            if conn is not None:
                conn.close()
