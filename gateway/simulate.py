"""`bosun simulate`: real MQTT devices speaking the device protocol against a running gateway.

Buttons send heartbeats and guest presses (QoS 1, increasing sequence ids), sensors send telemetry, watches
send status with a draining battery, repeaters send link telemetry. Every device announces itself retained
on `availability` with a Last Will, answers commands on `ack`, and says goodbye at the end. Figures of the
gateway (stored rows per second, writer batch size, RSS) come from its /healthz before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from amqtt.client import MQTTClient
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gateway.models import DeviceRow

__all__ = ["Plan", "run_simulation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    count: int
    rate: float
    duration: float
    host: str
    mqtt_port: int
    http_port: int
    site: str
    root: str


@dataclass
class Tally:
    sent: dict[str, int] = field(default_factory=dict)
    presses: int = 0
    commands: int = 0
    errors: int = 0
    connected: int = 0

    def add(self, action: str) -> None:
        self.sent[action] = self.sent.get(action, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())


class SimDevice:
    def __init__(self, plan: Plan, row: DeviceRow, secret: str, tally: Tally) -> None:
        self.plan = plan
        self.row = row
        self.secret = secret
        self.tally = tally
        self.prefix = f"{plan.root}/{row.site}/{row.room}/{row.type}/{row.device_id}/"
        self.sequence = int(time.time() * 1000) % 1_000_000_000  # increasing across runs
        self.battery = random.uniform(60, 100)
        self.client = MQTTClient(
            client_id=row.device_id,
            config={
                "keep_alive": 30,
                "auto_reconnect": False,
                "plugins": {},
                "will": {
                    "topic": self.prefix + "availability",
                    "message": "offline",
                    "qos": 1,
                    "retain": True,
                },
            },
        )

    async def _pub(self, action: str, payload: Any, qos: int, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(self.prefix + action, data, qos=qos, retain=retain)
        self.tally.add(action)

    async def run(self, deadline: float) -> None:
        uri = f"mqtt://{self.row.device_id}:{self.secret}@{self.plan.host}:{self.plan.mqtt_port}/"
        try:
            await self.client.connect(uri, cleansession=True)
        except Exception as exc:  # amqtt raises ConnectError and OS errors; both mean "not connected"
            self.tally.errors += 1
            log.warning("%s could not connect: %s", self.row.device_id, exc)
            return
        self.tally.connected += 1
        listener = asyncio.create_task(self._commands())
        try:
            await self.client.subscribe([(self.prefix + "cmd/#", 2)])
            await self._pub("availability", b"online", 1, retain=True)
            await self._pub("status", self._status(), 1)
            interval = 1.0 / self.plan.rate
            next_at = time.monotonic() + random.uniform(0, interval)
            while True:
                next_at += interval
                if next_at > deadline:
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                await self._tick()
            await self._pub("availability", b"offline", 1, retain=True)
        except Exception as exc:
            self.tally.errors += 1
            log.warning("%s stopped: %r", self.row.device_id, exc)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            with contextlib.suppress(Exception):  # the gateway may already have gone
                await self.client.disconnect()

    def _status(self) -> dict[str, Any]:
        self.battery = max(5.0, self.battery - random.uniform(0, 0.05))
        return {
            "battery": round(self.battery, 1),
            "signalStrength": random.randint(-80, -40),
            "firmwareVersion": "1.4.2",
            "timestamp": time.time(),
        }

    async def _tick(self) -> None:
        kind = self.row.type
        roll = random.random()
        if kind == "button":
            if roll < 0.05:
                self.sequence += 1
                self.tally.presses += 1
                press_type = random.choice(["single", "single", "double", "long"])
                priority = "urgent" if press_type == "long" else random.choice(["normal"] * 9 + ["emergency"])
                await self._pub(
                    "press",
                    {
                        "timestamp": time.time(),
                        "press_type": press_type,
                        "duration": random.randint(80, 2500),
                        "sequence_id": self.sequence,
                        "priority": priority,
                    },
                    1,
                )
            elif roll < 0.1:
                await self._pub("status", self._status(), 1)
            else:
                await self._pub("heartbeat", b"", 0)
        elif kind == "sensor":
            await self._pub(
                "telemetry",
                {
                    "temperature": round(random.gauss(22, 1.5), 2),
                    "humidity": round(random.uniform(35, 65), 1),
                    "co2": str(random.randint(400, 1200)),
                },
                0,
            )
        elif kind == "watch":
            if roll < 0.2:
                await self._pub("status", self._status(), 1)
            else:
                await self._pub("heartbeat", {"uptime": int(time.monotonic())}, 0)
        else:
            await self._pub(
                "telemetry",
                {
                    "rssi": random.randint(-90, -40),
                    "clients": random.randint(0, 12),
                    "linkQuality": random.uniform(0.5, 1.0),
                },
                0,
            )

    async def _commands(self) -> None:
        while True:
            message = await self.client.deliver_message()
            if message is None:
                return
            try:
                command = json.loads(bytes(message.data))
                status = "accepted" if message.topic.endswith("/notify") else "done"
                await self._pub("ack", {"command_id": command["command_id"], "status": status}, 1)
                self.tally.commands += 1
            except (ValueError, KeyError, TypeError):
                self.tally.errors += 1


async def _health(plan: Plan) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://{plan.host}:{plan.http_port}/healthz")
            return response.json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


async def run_simulation(plan: Plan, credentials: list[tuple[DeviceRow, str]]) -> dict[str, Any]:
    console = Console()
    tally = Tally()
    devices = [SimDevice(plan, row, secret, tally) for row, secret in credentials]
    before = await _health(plan)
    started = time.monotonic()
    deadline = started + plan.duration
    # stagger connects over a second so the gateway sees a realistic (not a synthetic) storm
    tasks = []
    for index, device in enumerate(devices):
        tasks.append(asyncio.create_task(device.run(deadline)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    columns = (
        TextColumn("[bold]simulating"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("run", total=plan.duration, info="")
        while not all(t.done() for t in tasks):
            elapsed = time.monotonic() - started
            rate = tally.total / elapsed if elapsed > 0 else 0.0
            progress.update(
                bar,
                completed=min(elapsed, plan.duration),
                info=f"{tally.connected}/{len(devices)} connected, {tally.total} sent, {rate:,.0f} msg/s",
            )
            await asyncio.sleep(0.25)
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)  # let the last group commit before reading the gateway's figures
    after = await _health(plan)
    report = _report(plan, tally, elapsed, before, after)
    table = Table(title=f"bosun simulate: {plan.count} devices x {plan.rate:g} msg/s for {plan.duration:g} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, value if isinstance(value, str) else f"{value:,.1f}")
    console.print(table)
    return report


def _report(
    plan: Plan, tally: Tally, elapsed: float, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "devices connected": float(tally.connected),
        "messages sent": float(tally.total),
        "sent per second": tally.total / elapsed,
        "presses sent": float(tally.presses),
        "commands answered": float(tally.commands),
        "device errors": float(tally.errors),
    }
    if before and after:
        rows = after["writer"]["rows"] - before["writer"]["rows"]
        commits = after["writer"]["commits"] - before["writer"]["commits"]
        report["gateway writes committed per second"] = rows / elapsed
        report["gateway writer batch size (mean)"] = rows / commits if commits else 0.0
        report["gateway RSS MB"] = after["process"]["rss_bytes"] / 1e6
        cpu = after["process"]["cpu_seconds"] - before["process"]["cpu_seconds"]
        report["gateway CPU % of one core"] = 100 * cpu / elapsed
        drops = after["counters"]["drops"]
        report["gateway drops"] = ", ".join(f"{k}={v:g}" for k, v in sorted(drops.items())) or "none"
    else:
        report["gateway figures"] = "unavailable (is its HTTP port right?)"
    return report
