"""The whole benchmark run: gateway with synchronous=FULL, with NORMAL, a fresh gateway and Mosquitto relaying.

Every phase is bounded in time and its failure is recorded, not fatal: a slow or crashing broker yields low
figures and an error note, and the next phase still runs. Every subprocess and the temporary directory are
cleaned up on the way out, Ctrl-C included (AsyncExitStack).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gateway import __version__, config
from gateway.bench import procs
from gateway.bench.loadgen import Fleet, connect_many
from gateway.bench.scenarios import HOST, DurablePlan, DurableSession, RelayPlan, Report, idle_clients, relay
from gateway.bench.seed import Seeded, mqtt_root, seed

__all__ = ["Settings", "machine_info", "run"]

PREFIX = "bench"  # topic prefix of the anonymous relay clients (outside the device protocol's root)


@dataclass(frozen=True)
class Settings:
    devices: int = 1000
    rates: tuple[float, ...] = (10_000.0, 20_000.0)
    duration: float = 20.0
    warmup: float = 5.0
    normal_duration: float = 10.0
    qos: int = 1
    inflight: int = 20
    probe_rate: float = 20.0
    idle: int = 1000
    relay_qos0: int = 50_000
    relay_qos1: int = 30_000
    relay_inflight: int = 1000
    relay_rounds: int = 3  # each broker's relay is run this many times at each QoS; the median round is reported
    relay_deadline: float = 60.0
    relay_sync: str = "NORMAL"
    skip_relay: bool = False
    skip_mosquitto: bool = False
    quick: bool = False
    out: str = "bench-results.json"

    @property
    def target_rate(self) -> float:
        """The rate of the NORMAL run and of the 10,000 msg/s targets: 10,000 if asked for, else the first."""
        return 10_000.0 if 10_000.0 in self.rates else self.rates[0]


@dataclass
class Ui:
    progress: Progress
    console: Console

    def phase(self, name: str) -> tuple[TaskID, Report]:
        task = self.progress.add_task(name, total=1.0, info="")

        def report(fraction: float, info: str) -> None:
            self.progress.update(task, completed=max(0.0, min(1.0, fraction)), info=info)

        return task, report

    def done(self, task: TaskID, info: str) -> None:
        self.progress.update(task, completed=1.0, info=info)


@dataclass
class Results:
    settings: Settings
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data.update(
            {
                "version": 1,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "settings": dataclasses.asdict(self.settings),
                "machine": {},
                "connect": {},
                "durable": [],
                "relay": {"gateway": {}, "mosquitto": {}, "ratio": {}},
                "errors": [],
                "notes": [],
                "cpu_probes": [],
            }
        )

    def probe(self, phase: str) -> None:
        self.data["cpu_probes"].append({"phase": phase, "ms": cpu_probe_ms()})

    def error(self, phase: str, exc: BaseException) -> None:
        self.data["errors"].append({"phase": phase, "error": f"{type(exc).__name__}: {exc}".rstrip(": ")})


# A fixed pure-Python loop, timed before each phase: the host's speed at that moment. On the shared virtual machine
# the figures are measured on, the same loop took from 135 to 250 ms within an hour (2026-11-23), with nothing
# else running, and every latency figure moved with it; the report shows the probes beside the figures.
_PROBE_LOOPS = 1_000_000


def cpu_probe_ms() -> float:
    """Milliseconds for `_PROBE_LOOPS` iterations of a small arithmetic loop in this process (lower is faster)."""
    started = time.perf_counter()
    x = 0
    for i in range(_PROBE_LOOPS):
        x += i * i % 7
    return round((time.perf_counter() - started) * 1000, 1)


def machine_info(mosquitto: str | None) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = Path(__file__).resolve().parent
        head = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, timeout=5
        )
        commit = head.stdout.decode().strip() or commit
    return {
        "bosun_commit": commit,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "bosun": __version__,
        "amqtt": version("amqtt"),
        "uvloop": version("uvloop"),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": procs.mosquitto_version(mosquitto) if mosquitto else "not installed",
    }


async def run(settings: Settings, console: Console) -> dict[str, Any]:
    results = Results(settings)
    results.data["settings"]["gateway_env"] = gateway_overrides(settings)
    mosquitto = procs.mosquitto_binary()
    results.data["machine"] = machine_info(mosquitto)
    results.probe("start")
    columns = (
        TextColumn("[bold]{task.description:<24}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    async with AsyncExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="bosun-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        progress = stack.enter_context(Progress(*columns, console=console, refresh_per_second=4))
        ui = Ui(progress, console)
        root = mqtt_root()
        await _guarded(results, "gateway FULL", _gateway_phase(settings, tmp, "FULL", root, ui, results))
        if settings.normal_duration > 0:
            await _guarded(results, "gateway NORMAL", _gateway_phase(settings, tmp, "NORMAL", root, ui, results))
        if settings.skip_relay:
            results.data["notes"].append("relay skipped (--skip-relay)")
        else:
            if settings.skip_mosquitto:
                results.data["notes"].append("Mosquitto skipped (--skip-mosquitto)")
            elif mosquitto is None:
                results.data["notes"].append("Mosquitto is not installed (make bench installs it): no baseline")
            baseline = None if settings.skip_mosquitto else mosquitto
            results.probe("relay")
            await _guarded(results, "relay", _relay_phase(settings, tmp, baseline, ui, results))
        _ratios(results.data["relay"])
    results.probe("end")
    return results.data


async def _guarded(results: Results, phase: str, work: Any) -> None:
    try:
        await work
    except (OSError, RuntimeError, TimeoutError, ValueError, httpx.HTTPError) as exc:
        results.error(phase, exc)


async def _gateway_phase(settings: Settings, tmp: Path, sync: str, root: str, ui: Ui, results: Results) -> None:
    rates = settings.rates if sync == "FULL" else (settings.target_rate,)
    window = settings.duration if sync == "FULL" else settings.normal_duration
    async with AsyncExitStack() as stack:
        proc, seeded = await _start_gateway(stack, tmp, sync, settings, settings.devices, ui)
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {seeded.token}"}, timeout=10)
        )
        session = DurableSession(proc, seeded, root, http, settings.qos)
        try:
            task, report = ui.phase(f"{sync}: connect")
            connect = await session.open(report)
            results.data["connect"][sync] = connect
            ui.done(task, f"{connect['connected']}/{connect['devices']} in {connect['connect_s']:.1f} s")
            for rate in rates:
                plan = DurablePlan(rate, settings.warmup, window, settings.qos, settings.inflight, settings.probe_rate)
                results.probe(f"{sync} {rate:,.0f} msg/s")
                task, report = ui.phase(f"{sync}: {rate:,.0f} msg/s")
                figures = {"synchronous": sync, **await session.run(plan, report)}
                results.data["durable"].append(figures)
                ui.done(task, _durable_line(figures))
                if not proc.alive:
                    figures["error"] = f"the gateway exited with {proc.popen.returncode} during this run"
                    raise RuntimeError(f"{figures['error']}:\n{proc.log_tail()}")
                if figures.get("stored_per_s", 0) < 0.5 * rate and rate != rates[-1]:
                    results.data["notes"].append(
                        f"{sync}: stopped the ramp at {rate:,.0f} msg/s (stored under half the offered rate)"
                    )
                    break
        finally:
            await session.close()
        await _stop(proc, sync, ui)


@dataclass
class _Relayed:
    name: str
    port: int
    proc: procs.Proc
    fleet: Fleet | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


async def _relay_phase(settings: Settings, tmp: Path, mosquitto: str | None, ui: Ui, results: Results) -> None:
    """A fresh gateway (its RSS with the idle clients means something; no devices: anonymous clients only) and
    Mosquitto relay side by side: both run with their idle clients connected, and their rounds alternate (the
    gateway first in odd rounds, Mosquitto in even ones). A slow phase of the shared machine lasts tens of seconds:
    measured one broker after the other, it could fall on one alone and decide the ratio."""
    async with AsyncExitStack() as stack:
        label = f"relay ({settings.relay_sync})"
        gateway, _ = await _start_gateway(stack, tmp, settings.relay_sync, settings, 0, ui, label)
        brokers = [_Relayed("gateway", gateway.mqtt_port, gateway)]
        if mosquitto is not None:
            try:
                workdir = tmp / "mosquitto"
                workdir.mkdir()
                baseline = await procs.start_mosquitto(mosquitto, workdir)
            except (OSError, RuntimeError, TimeoutError) as exc:  # the gateway's relay is still measured
                results.error("mosquitto", exc)
            else:
                stack.push_async_callback(baseline.stop)
                brokers.append(_Relayed("mosquitto", baseline.port, baseline))
        for broker in brokers:
            broker.fleet = await _idle_fleet(settings, broker, ui, results)
            stack.push_async_callback(broker.fleet.close)
        for qos, messages in ((0, settings.relay_qos0), (1, settings.relay_qos1)):
            plan = RelayPlan(qos, messages, settings.relay_inflight, settings.relay_deadline)
            for broker in brokers:
                broker.rounds = []
            for index in range(1, settings.relay_rounds + 1):
                for broker in brokers if index % 2 else brokers[::-1]:
                    await _relay_round(settings, broker, plan, index, ui)
            for broker in brokers:
                results.data["relay"][broker.name][f"qos{qos}"] = _median_round(broker.rounds)
        for broker in brokers:
            assert broker.fleet is not None
            await broker.fleet.close()
        await _stop(gateway, label, ui)


async def _idle_fleet(settings: Settings, broker: _Relayed, ui: Ui, results: Results) -> Fleet:
    task, report = ui.phase(f"{broker.name}: idle clients")
    fleet: Fleet = await connect_many(
        HOST,
        broker.port,
        idle_clients(settings.idle, PREFIX),
        progress=lambda done, ok, total: report(done / total, f"{ok}/{total} connected"),
    )
    fleet.start_pings()
    rss = broker.proc.rss_bytes()
    results.data["relay"][broker.name] = {
        "idle_connected": len(fleet.conns),
        "idle_failed": fleet.failed,
        "idle_errors": fleet.errors,
        "connect_s": round(fleet.connect_s, 3),
        "rss_mb_idle": round(rss / 1e6, 1),
    }
    ui.done(task, f"{len(fleet.conns)}/{settings.idle} in {fleet.connect_s:.1f} s, RSS {rss / 1e6:.0f} MB")
    return fleet


async def _relay_round(settings: Settings, broker: _Relayed, plan: RelayPlan, index: int, ui: Ui) -> None:
    name, qos = broker.name, plan.qos
    task, report = ui.phase(f"{name}: relay QoS {qos}, round {index}/{settings.relay_rounds}")
    started = time.time()
    figures = await relay(broker.port, broker.proc, plan, PREFIX, f"{name}-q{qos}-r{index}", report)
    figures["started"] = round(started, 3)
    assert broker.fleet is not None
    figures["idle_alive"] = broker.fleet.alive
    broker.rounds.append(figures)
    ui.done(task, _relay_line(figures))
    proc = broker.proc
    if not proc.alive:
        raise RuntimeError(f"{name} exited with {proc.popen.returncode} during the relay:\n{proc.log_tail()}")


async def _stop(proc: procs.Proc, name: str, ui: Ui) -> None:
    task, _ = ui.phase(f"{name}: stop {proc.name}")
    code = await proc.stop()
    ui.done(task, f"exit code {code}")


def gateway_overrides(settings: Settings) -> dict[str, str]:
    """Settings the gateway gets beyond the defaults, only for keys its config knows (it refuses unknown ones).

    Like Mosquitto's `max_queued_messages 0`, a subscriber's queue must hold a whole relay burst: with a
    bounded queue a broker drops messages for a subscriber that lags, and the relay measures drops.
    """
    known = {env for env, *_ in config.describe()}
    out = {}
    queue = "BOSUN_MQTT_SESSION_QUEUE_MAX"
    if queue in known and queue not in os.environ:
        out[queue] = str(max(settings.relay_qos0, settings.relay_qos1) + 1000)
    return out


async def _start_gateway(
    stack: AsyncExitStack, tmp: Path, sync: str, settings: Settings, devices: int, ui: Ui, label: str = ""
) -> tuple[procs.GatewayProc, Seeded]:
    label = label or sync
    task, report = ui.phase(f"{label}: start gateway")
    report(0.0, f"registering {devices} devices")
    suffix = "-relay" if label != sync else ""
    data_dir = tmp / f"{sync.lower()}{suffix}"
    seeded = await asyncio.to_thread(seed, data_dir, devices)
    report(0.5, "starting")
    log_path = tmp / f"gateway-{sync.lower()}{suffix}.log"
    proc = await procs.start_gateway(data_dir, sync, PREFIX, log_path, gateway_overrides(settings))
    stack.push_async_callback(proc.stop)
    ui.done(task, f"pid {proc.pid}, MQTT {proc.mqtt_port}, HTTP {proc.http_port}")
    return proc, seeded


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round of median rate, with every round's rate beside it. A relay round lasts well under a second (30,000
    QoS 1 messages in ~0.3 s), so a moment's stall of the shared machine decides a single round: over 15 full runs
    one round each gave a QoS 1 ratio to Mosquitto from 0.94 to 1.70. Both brokers are measured the same way."""
    ranked = sorted(rounds, key=lambda f: f["rate"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["round_rates"] = [f["rate"] for f in rounds]
    median["round_started"] = [f.get("started") for f in rounds]  # Unix time: the brokers' rounds interleave
    return median


def _ratios(relay: dict[str, Any]) -> None:
    for qos in ("qos0", "qos1"):
        ours, theirs = relay["gateway"].get(qos), relay["mosquitto"].get(qos)
        if not ours or not theirs:
            continue
        rate = ours["rate"] / theirs["rate"] if theirs["rate"] else None
        ours_us, theirs_us = ours["cpu_us_per_msg"], theirs["cpu_us_per_msg"]
        cpu = ours_us / theirs_us if ours_us is not None and theirs_us else None
        relay["ratio"][qos] = {
            "rate": None if rate is None else round(rate, 3),
            "cpu_us_per_msg": None if cpu is None else round(cpu, 2),
        }


def _durable_line(f: dict[str, Any]) -> str:
    if "error" in f:
        return str(f["error"])
    p99 = (f.get("puback_ms") or {}).get("p99")
    ack = f"PUBACK p99 {p99:.1f} ms, " if p99 is not None else ""
    return f"stored {f['stored_per_s']:,.0f}/s, {ack}CPU {f['cpu_percent']:.0f} %"


def _relay_line(f: dict[str, Any]) -> str:
    us = f["cpu_us_per_msg"]
    cost = f", {us:.1f} µs/msg" if us is not None else ""
    return f"{f['received']:,}/{f['messages']:,} at {f['rate']:,.0f} msg/s{cost}"
