"""The dashboard: open calls, device health, message rate, storage, uplink and the box's own health.

Figures come from the same places as the API and /healthz: the calls table, the device registry, the traffic
log, the database's page counts, the uplink's `health()` and psutil. Each part is a fragment of its own
(`?fragment=calls|devices|system`) so the live script can refresh it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from litestar import get
from litestar.response import Template
from markupsafe import Markup

from gateway.models import DeviceRow
from gateway.store import registry, views
from webui.charts import sparkline
from webui.pages.base import PAGE, Req, render

__all__ = ["LOW_BATTERY", "dashboard_page", "device_health", "size", "uplink_state"]

LOW_BATTERY = 20  # percent: below this a device counts as low on battery (here and on the devices page)
_MIB = 1024 * 1024
# boards name their CPU sensor differently: a Raspberry Pi says cpu_thermal, x86 coretemp or k10temp
_SENSORS = ("cpu_thermal", "soc_thermal", "coretemp", "k10temp", "zenpower", "acpitz")


@dataclass(frozen=True)
class DeviceHealth:
    total: int
    online: int
    offline: int
    low_battery: int
    disabled: int


@dataclass(frozen=True)
class Rate:
    per_minute: list[int | None]  # logged messages per minute, the last hour, oldest first; None: not in the log
    last_hour: int
    last_minute: int
    peak: int
    log_from: float | None  # oldest row in the traffic log
    cap: int  # store.traffic_rate (0: every message is logged)
    not_logged: float  # messages the cap kept out of the log since the gateway started
    received: float  # messages received since the gateway started (exact, from the counters)
    chart: Markup


@dataclass(frozen=True)
class Storage:
    used: int
    budget: int
    wal: int = 0  # bytes of the write-ahead log file: on disk besides the database, not in the budget

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.budget if self.budget else 0.0


@dataclass(frozen=True)
class System:
    cpu_percent: float
    load: tuple[float, float, float]
    memory_percent: float
    memory_used: int
    memory_total: int
    disk_percent: float
    disk_used: int
    disk_total: int
    temperature: float | None  # degrees Celsius, where the board reports one
    boot_time: float
    gateway_started: float


def size(n: float) -> str:
    """Bytes for people: 1.5 GB, 320 MB, 12 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def device_health(devices: list[DeviceRow]) -> DeviceHealth:
    active = [d for d in devices if not d.disabled]
    online = sum(1 for d in active if d.online)
    low = sum(1 for d in active if d.battery is not None and d.battery < LOW_BATTERY)
    return DeviceHealth(len(devices), online, len(active) - online, low, len(devices) - len(active))


async def _rate(gw: Any) -> Rate:
    now = time.time()
    counts, log_from = await gw.reader.call(lambda c: views.traffic_per_minute(c, now))
    known = [n for n in counts if n is not None]
    messages = gw.metrics.counter_values(gw.metrics.messages)
    received = sum(v for k, v in messages.items() if k.endswith(",in"))
    not_logged = sum(
        s.value for m in gw.metrics.traffic_skipped.collect() for s in m.samples if s.name.endswith("_total")
    )
    chart = sparkline(counts, "messages per minute, last hour", width=300, height=56)
    return Rate(
        per_minute=counts,
        last_hour=sum(known),
        last_minute=counts[-1] or 0,
        peak=max(known, default=0),
        log_from=log_from,
        cap=gw.cfg.store.traffic_rate,
        not_logged=not_logged,
        received=received,
        chart=chart,
    )


def _temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)  # not on every platform
    if read is None:
        return None
    try:
        sensors = read()
    except OSError:
        return None
    for name in (*_SENSORS, *sensors):
        for entry in sensors.get(name, []):
            if entry.current:
                return float(entry.current)
    return None


_cpu_sampled = False


def _system(data_dir: Path, started: float) -> System:
    """psutil's view of the box (runs on a worker thread: it reads /proc and /sys)."""
    global _cpu_sampled
    # cpu_percent(None) compares with the previous call; the very first one has nothing to compare with
    cpu = psutil.cpu_percent(None if _cpu_sampled else 0.2)
    _cpu_sampled = True
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(data_dir))
    return System(
        cpu_percent=cpu,
        load=os.getloadavg(),
        memory_percent=memory.percent,
        memory_used=memory.total - memory.available,
        memory_total=memory.total,
        disk_percent=disk.percent,
        disk_used=disk.used,
        disk_total=disk.total,
        temperature=_temperature(),
        boot_time=psutil.boot_time(),
        gateway_started=started,
    )


def uplink_state(gw: Any) -> dict[str, Any] | None:
    """The uplink's own status dict, if this gateway has an uplink: connected, backlog, last success, error."""
    uplink = getattr(gw, "uplink", None)
    health = getattr(uplink, "health", None)
    if health is None:
        return None
    state: dict[str, Any] = health()
    lanes = state.get("lanes") or {}
    return {
        "enabled": bool(state.get("enabled")),
        "connected": bool(state.get("connected")),
        "backlog": sum(int(lane.get("records", 0)) for lane in lanes.values()),
        "oldest_age_s": max((float(lane.get("oldest_age_s") or 0) for lane in lanes.values()), default=0.0),
        "last_success": state.get("last_success"),
        "last_error": state.get("last_error"),
        "url": state.get("url"),
    }


def _wal_bytes(db_path: Path) -> int:
    """The WAL file keeps its size between restarts (store.writer cuts it back only past 256 MB), so under heavy load
    it holds up to some tens of MB of disk that the database's own figure does not show."""
    try:
        return db_path.with_name(db_path.name + "-wal").stat().st_size
    except FileNotFoundError:
        return 0


async def _system_part(request: Req) -> dict[str, Any]:
    gw = request.app.state.gateway
    used = await gw.db_used_bytes()
    system = await asyncio.to_thread(_system, gw.cfg.data_dir, gw.started_at)
    return {
        "rate": await _rate(gw),
        "storage": Storage(used, gw.cfg.store.max_db_mb * _MIB, _wal_bytes(gw.cfg.db_path)),
        "uplink": uplink_state(gw),
        "system": system,
    }


@get("/dashboard", opt=PAGE())
async def dashboard_page(request: Req) -> Template:
    gw = request.app.state.gateway
    fragment = request.query_params.get("fragment")
    if fragment == "system":
        return render(request, "dashboard_system.html", size=size, **await _system_part(request))
    if fragment == "calls":
        return render(request, "dashboard_calls.html", calls=await gw.reader.call(views.call_counts))
    devices = device_health(await gw.reader.call(registry.list_devices))
    if fragment == "devices":
        return render(request, "dashboard_devices.html", devices=devices, low_battery=LOW_BATTERY)
    calls = await gw.reader.call(views.call_counts)
    context = await _system_part(request)
    return render(
        request, "dashboard.html", calls=calls, devices=devices, low_battery=LOW_BATTERY, size=size, **context
    )
