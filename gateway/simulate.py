"""`bosun simulate`: real MQTT devices speaking the device protocol against a running gateway.

Buttons send heartbeats and guest presses (QoS 1, increasing sequence ids), sensors send telemetry, watches
send status with a draining battery, repeaters send link telemetry. Every device announces itself retained
on `availability` with a Last Will, answers commands on `ack`, and says goodbye at the end.

Watches behave like crew (DESIGN "Device protocol", issue 4): a `cmd/notify` with state `new` or `escalated`
is acknowledged `received` at once; after a random delay the watch accepts or declines it, or never answers;
once the gateway confirms the accept, the watch completes the call after another delay (`done`, same command
id). `taken`, `completed` and `cancelled` make it forget the call. Buttons record the feedback they get
(`received`, `accepted`, `completed`), so the report shows the loop as a guest sees it.

Figures of the gateway (stored rows per second, writer batch size, RSS) come from its /healthz before and
after; its own call statistics from `GET /api/v1/calls/stats` when an API token is at hand. Times from a
press are measured on this side; which press made a call is found from the call's `created_at`, so they
assume the simulator and the gateway share a clock (the same host, or NTP).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
from amqtt.client import MQTTClient
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gateway.bench.stats import percentile
from gateway.models import DeviceRow

__all__ = ["Crew", "Ledger", "Plan", "parse_range", "run_simulation"]

log = logging.getLogger(__name__)

CONNECT_WINDOW_S = 5.0  # a freshly registered device reaches the gateway's account cache within its poll (1 s)
PRESSES_KEPT = 64  # per button, to find the press that made a call


def parse_range(text: str) -> tuple[float, float]:
    """`"2-20"` -> (2.0, 20.0); `"5"` -> (5.0, 5.0). Seconds, never negative, low <= high."""
    low_text, _, high_text = text.partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise ValueError(f"{text!r} is not a range of seconds like 2-20") from None
    if low < 0 or high < low:
        raise ValueError(f"{text!r}: needs 0 <= low <= high")
    return low, high


@dataclass(frozen=True)
class Crew:
    """How the simulated crew answers calls on their watches."""

    accept_delay: tuple[float, float] = (2.0, 10.0)  # seconds from a notify to accepting or declining
    done_delay: tuple[float, float] = (3.0, 10.0)  # seconds from the confirmed accept to `done`
    decline: float = 0.1  # chance that an answer is a decline
    ignore: float = 0.1  # chance that a watch never answers a call


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
    crew: Crew = Crew()
    press_share: float = 0.05  # share of a button's messages that are guest presses
    api_token: str | None = None  # for the gateway's call statistics


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


@dataclass
class CallSeen:
    """One call as the simulated devices saw it (times from this host's clock)."""

    press_at: float | None = None
    first_notify_at: float | None = None
    button_accepted_at: float | None = None
    button_states: set[str] = field(default_factory=set)
    accepted: bool = False
    completed: bool = False


@dataclass
class Ledger:
    """The call loop as every simulated device saw it; shared by all of them (one event loop, no locks)."""

    presses: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, CallSeen] = field(default_factory=dict)
    notifies: dict[str, int] = field(default_factory=dict)  # notify states received by watches
    answers: dict[str, int] = field(default_factory=dict)  # accepted / declined / done sent by watches
    ignored: int = 0  # notifies a watch decided never to answer
    late: int = 0  # accepts answered with `taken` (another watch was first)

    def pressed(self, device_id: str, at: float) -> None:
        times = self.presses.setdefault(device_id, [])
        times.append(at)
        del times[:-PRESSES_KEPT]

    def answered(self, status: str) -> None:
        self.answers[status] = self.answers.get(status, 0) + 1

    def call(self, command: dict[str, Any], at: float, button: str | None = None) -> CallSeen | None:
        """The call a notify is about (first seen now: matched to the press that made it)."""
        call_id = command.get("call_id")
        if not isinstance(call_id, str | int):
            return None
        seen = self.calls.get(str(call_id))
        if seen is None:
            device = command.get("device_id") or button
            created = command.get("created_at")
            bound = created if isinstance(created, int | float) and not isinstance(created, bool) else at
            seen = self.calls[str(call_id)] = CallSeen(press_at=self._press_before(device, bound))
        return seen

    def _press_before(self, device_id: Any, bound: float) -> float | None:
        # the press that made a call is the device's last one sent before the gateway stamped created_at
        times = self.presses.get(device_id, []) if isinstance(device_id, str) else []
        index = bisect.bisect_right(times, bound + 1e-6)
        return times[index - 1] if index else None

    def watch_notified(self, command: dict[str, Any], at: float) -> None:
        state = str(command.get("state"))
        self.notifies[state] = self.notifies.get(state, 0) + 1
        seen = self.call(command, at)
        if seen is None:
            return
        if state in ("new", "escalated") and seen.first_notify_at is None:
            seen.first_notify_at = at
        seen.accepted |= state == "accepted"
        seen.completed |= state == "completed"

    def button_told(self, command: dict[str, Any], button: str, at: float) -> None:
        seen = self.call(command, at, button)
        if seen is None:
            return
        state = str(command.get("state"))
        seen.button_states.add(state)
        if state == "accepted" and seen.button_accepted_at is None:
            seen.button_accepted_at = at
        seen.accepted |= state == "accepted"
        seen.completed |= state == "completed"

    def figures(self) -> dict[str, Any]:
        calls = self.calls.values()
        to_notify = sorted(c.first_notify_at - c.press_at for c in calls if c.first_notify_at and c.press_at)
        to_accept = sorted(c.button_accepted_at - c.press_at for c in calls if c.button_accepted_at and c.press_at)
        return {
            "calls notified to watches": sum(1 for c in calls if c.first_notify_at is not None),
            "watch notifies new/escalated/taken": "/".join(
                str(self.notifies.get(s, 0)) for s in ("new", "escalated", "taken")
            ),
            "watch accepts sent": self.answers.get("accepted", 0),
            "watch accepts too late (taken)": self.late,
            "watch declines sent": self.answers.get("declined", 0),
            "watch notifies ignored": self.ignored,
            "watch dones sent": self.answers.get("done", 0),
            "calls accepted": sum(1 for c in calls if c.accepted),
            "calls completed": sum(1 for c in calls if c.completed),
            "buttons told received/accepted/done": "/".join(
                str(sum(1 for c in calls if s in c.button_states)) for s in ("received", "accepted", "completed")
            ),
            "press to 1st notify ms, p50 / p90": _pair(to_notify, 1000),
            "press to button accepted s, p50 / p90": _pair(to_accept, 1),
        }


def _pair(ordered: list[float], scale: float) -> str:
    if not ordered:
        return "-"
    return f"{percentile(ordered, 50) * scale:,.1f} / {percentile(ordered, 90) * scale:,.1f} (n={len(ordered)})"


@dataclass
class Answer:
    """A watch's part in one call: the command id it answers with and its pending timer."""

    command_id: Any
    mode: str  # pending | ignoring | declined | accepting | accepted | done
    timer: asyncio.Task[None] | None = None


class SimDevice:
    def __init__(self, plan: Plan, row: DeviceRow, secret: str, tally: Tally, ledger: Ledger) -> None:
        self.plan = plan
        self.row = row
        self.secret = secret
        self.tally = tally
        self.ledger = ledger
        self.prefix = f"{plan.root}/{row.site}/{row.room}/{row.type}/{row.device_id}/"
        self.sequence = int(time.time() * 1000) % 1_000_000_000  # increasing across runs
        self.battery = random.uniform(60, 100)
        self.client = self._client()
        self.answers: dict[str, Answer] = {}  # watches: call id -> our part in it
        self.tasks: set[asyncio.Task[None]] = set()
        self.up: asyncio.Future[bool] = asyncio.get_running_loop().create_future()  # connected, or gave up

    def _client(self) -> MQTTClient:
        return MQTTClient(
            client_id=self.row.device_id,
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

    async def _connect(self) -> bool:
        # the gateway polls its registry about once a second: a device registered (or given a new secret) just
        # now may be refused at first, so keep trying for a few seconds as firmware would
        uri = f"mqtt://{self.row.device_id}:{self.secret}@{self.plan.host}:{self.plan.mqtt_port}/"
        give_up = time.monotonic() + CONNECT_WINDOW_S
        while True:
            try:
                await self.client.connect(uri, cleansession=True)
                return True
            except Exception as exc:  # amqtt raises ConnectError and OS errors; both mean "not connected"
                if time.monotonic() > give_up:
                    self.tally.errors += 1
                    log.warning("%s could not connect: %s", self.row.device_id, exc)
                    return False
            self.client = self._client()
            await asyncio.sleep(random.uniform(0.3, 0.7))

    async def run(self, go: asyncio.Future[float]) -> None:
        """Connect and announce, wait for `go` (the deadline, set once every device is up), then send."""
        connected = await self._connect()
        self.up.set_result(connected)
        if not connected:
            return
        self.tally.connected += 1
        listener = asyncio.create_task(self._commands())
        try:
            await self.client.subscribe([(self.prefix + "cmd/#", 2)])
            await self._pub("availability", b"online", 1, retain=True)
            await self._pub("status", self._status(), 1)
            deadline = await go
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
            for task in (listener, *self.tasks):
                task.cancel()
            await asyncio.gather(listener, *self.tasks, return_exceptions=True)
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
            if roll < self.plan.press_share:
                await self._press()
            elif roll < self.plan.press_share + 0.05:
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

    async def _press(self) -> None:
        self.sequence += 1
        self.tally.presses += 1
        press_type = random.choice(["single", "single", "double", "long"])
        priority = "urgent" if press_type == "long" else random.choice(["normal"] * 9 + ["emergency"])
        now = time.time()
        self.ledger.pressed(self.row.device_id, now)
        await self._pub(
            "press",
            {
                "timestamp": now,
                "press_type": press_type,
                "duration": random.randint(80, 2500),
                "sequence_id": self.sequence,
                "priority": priority,
            },
            1,
        )

    async def _commands(self) -> None:
        while True:
            message = await self.client.deliver_message()
            if message is None:
                return
            at = time.time()
            try:
                command = json.loads(bytes(message.data))
                command_id = command["command_id"]
            except (ValueError, KeyError, TypeError):
                self.tally.errors += 1
                continue
            self.tally.commands += 1
            if not message.topic.endswith("/cmd/notify"):
                await self._ack(command_id, "done")
            elif self.row.type == "watch":
                await self._notified(command, at)
            else:
                if self.row.type == "button":
                    self.ledger.button_told(command, self.row.device_id, at)
                await self._ack(command_id, "received")

    async def _ack(self, command_id: Any, status: str) -> None:
        await self._pub("ack", {"command_id": command_id, "status": status}, 1)

    def _later(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _notified(self, command: dict[str, Any], at: float) -> None:
        """A watch's side of a call (DESIGN "Device protocol", `cmd/notify` and `ack`)."""
        self.ledger.watch_notified(command, at)
        state = command.get("state")
        call_id = str(command.get("call_id"))
        answer = self.answers.get(call_id)
        if state in ("new", "escalated"):
            await self._ack(command["command_id"], "received")
            if answer is None or answer.mode == "declined":  # a re-notification asks again
                answer = self.answers[call_id] = Answer(command["command_id"], "pending")
                if random.random() < self.plan.crew.ignore:
                    answer.mode = "ignoring"
                    self.ledger.ignored += 1
                else:
                    answer.timer = self._later(self._answer(call_id, answer))
            elif answer.mode in ("pending", "ignoring"):
                answer.command_id = command["command_id"]
        elif state == "accepted":
            if answer is not None and answer.mode == "accepting":
                answer.mode = "accepted"
                answer.timer = self._later(self._done(call_id, answer))
        elif state in ("taken", "completed", "cancelled"):
            self.answers.pop(call_id, None)
            if answer is not None:
                if answer.mode == "accepting" and state == "taken":
                    self.ledger.late += 1
                if answer.timer is not None:  # only while it waits: an answer being sent is left to finish
                    answer.timer.cancel()

    async def _answer(self, call_id: str, answer: Answer) -> None:
        await asyncio.sleep(random.uniform(*self.plan.crew.accept_delay))
        answer.timer = None
        status = "declined" if random.random() < self.plan.crew.decline else "accepted"
        answer.mode = "declined" if status == "declined" else "accepting"
        await self._send_answer(answer.command_id, status)

    async def _done(self, call_id: str, answer: Answer) -> None:
        await asyncio.sleep(random.uniform(*self.plan.crew.done_delay))
        answer.timer = None
        answer.mode = "done"
        await self._send_answer(answer.command_id, "done")

    async def _send_answer(self, command_id: Any, status: str) -> None:
        try:
            await self._ack(command_id, status)
        except Exception as exc:  # the connection may be closing at the deadline
            self.tally.errors += 1
            log.warning("%s could not answer %s: %r", self.row.device_id, status, exc)
            return
        self.ledger.answered(status)


async def _health(plan: Plan) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://{plan.host}:{plan.http_port}/healthz")
            return response.json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


async def _call_stats(plan: Plan, since: float) -> dict[str, Any] | str:
    """The gateway's own call statistics since `since`, or why they are not available."""
    if plan.api_token is None:
        return "skipped: no API token (pass --api-token, or a --data-dir with a user to mint one for)"
    url = f"http://{plan.host}:{plan.http_port}/api/v1/calls/stats"
    try:
        async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {plan.api_token}"}) as client:
            response = await client.get(url, params={"since": since})
    except httpx.HTTPError as exc:
        return f"unavailable: {exc!r}"
    if response.status_code != 200:
        return f"unavailable: HTTP {response.status_code} {response.text[:120]}"
    try:
        stats = response.json()
    except ValueError:
        return "unavailable: the answer is not JSON"
    return stats if isinstance(stats, dict) else "unavailable: the answer is not an object"


async def run_simulation(plan: Plan, credentials: list[tuple[DeviceRow, str]]) -> dict[str, Any]:
    console = Console()
    tally = Tally()
    ledger = Ledger()
    devices = [SimDevice(plan, row, secret, tally, ledger) for row, secret in credentials]
    before = await _health(plan)
    since = time.time()
    go: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    # stagger connects so the gateway sees a realistic (not a synthetic) storm
    tasks = []
    for index, device in enumerate(devices):
        tasks.append(asyncio.create_task(device.run(go)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    # every device is up (or gave up) before the first press: a call made while the watches are still
    # connecting would be notified to nobody (clean sessions) and wait for its escalation
    if devices:
        with console.status(f"connecting {len(devices)} devices"):
            await asyncio.wait([d.up for d in devices], timeout=CONNECT_WINDOW_S + 5)
    started = time.monotonic()
    go.set_result(started + plan.duration)
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
            calls = ledger.calls.values()
            progress.update(
                bar,
                completed=min(elapsed, plan.duration),
                info=(
                    f"{tally.connected}/{len(devices)} connected, {rate:,.0f} msg/s; "
                    f"calls {sum(1 for c in calls if c.first_notify_at)} notified, "
                    f"{sum(1 for c in calls if c.accepted)} accepted, {sum(1 for c in calls if c.completed)} done"
                ),
            )
            await asyncio.sleep(0.25)
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)  # let the last group commit before reading the gateway's figures
    after = await _health(plan)
    stats = await _call_stats(plan, since)
    report = _report(plan, tally, elapsed, before, after)
    report.update(ledger.figures())
    report.update(_stats_figures(stats))
    table = Table(title=f"bosun simulate: {plan.count} devices x {plan.rate:g} msg/s for {plan.duration:g} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, _cell(value))
    console.print(table)
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _report(
    plan: Plan, tally: Tally, elapsed: float, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "devices connected": tally.connected,
        "messages sent": tally.total,
        "sent per second": tally.total / elapsed,
        "presses sent": tally.presses,
        "commands received": tally.commands,
        "device errors": tally.errors,
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


def _stats_figures(stats: dict[str, Any] | str) -> dict[str, Any]:
    """The gateway's `GET /api/v1/calls/stats` as report lines."""
    if isinstance(stats, str):
        return {"gateway call stats": stats}

    def pair(key: str) -> str:
        part = stats.get(key) or {}
        median, p90 = part.get("median"), part.get("p90")
        if median is None or p90 is None:
            return f"- (n={part.get('count', 0)})"
        return f"{median:,.1f} / {p90:,.1f} (n={part.get('count', 0)})"

    def spread(key: str) -> str:
        part = stats.get(key) or {}
        return " ".join(f"{k}={v}" for k, v in part.items() if v) or "none"

    return {
        "gateway calls since the start": stats.get("total"),
        "gateway calls by state": spread("by_state"),
        "gateway calls by priority": spread("by_priority"),
        "gateway accept s, p50 / p90": pair("accept_s"),
        "gateway complete s, p50 / p90": pair("complete_s"),
        "gateway escalated calls / steps / missed": " / ".join(
            str(stats.get(key, "-")) for key in ("escalated", "escalations", "missed")
        ),
    }
