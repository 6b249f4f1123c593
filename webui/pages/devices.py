"""Devices: the grid with filters and search, a device's page (telemetry charts, events, commands), and the
installers' actions (identify, reset, rename, move, disable) one device at a time or on a selection.

Reads go through the registry and gateway.store.views (the JSON API's functions); changes go through
`registry.update_device` and `Commands.send`, which audit them. Actions admit staff only: the crew see no
buttons and the server refuses their posts (403).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlencode

from litestar import get, post
from litestar.response import Redirect, Template
from markupsafe import Markup

from gateway.errors import NotFound, RegistryError
from gateway.models import DeviceRow
from gateway.store import registry, views
from webui.auth import STAFF
from webui.charts import line_chart
from webui.pages.base import PAGE, Req, go, render
from webui.pages.dashboard import LOW_BATTERY

__all__ = ["device_action", "device_page", "devices_command", "devices_page"]

COMMANDS = ("identify", "reset")  # commands without arguments, offered as buttons
STATES = ("online", "offline", "low", "disabled")
CHART_POINTS = 300  # latest values drawn per metric
CHART_METRICS = 8  # metrics charted per device
UNITS = {"temperature": "°C", "humidity": "%", "battery": "%", "rssi": "dBm", "signal": "dBm", "voltage": "V"}


@dataclass(frozen=True)
class Filters:
    """The grid's GET form: every field optional, all must match."""

    site: str = ""
    room: str = ""
    type: str = ""
    state: str = ""
    q: str = ""

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Filters:
        values = {f.name: str(params.get(f.name) or "").strip()[:100] for f in fields(cls)}
        if values["state"] not in STATES:
            values["state"] = ""
        return cls(**values)

    def query(self) -> str:
        return urlencode({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)})

    def keep(self, d: DeviceRow) -> bool:
        if (self.site and d.site != self.site) or (self.room and d.room != self.room):
            return False
        if self.type and d.type != self.type:
            return False
        if self.state == "online" and not (d.online and not d.disabled):
            return False
        if self.state == "offline" and (d.online or d.disabled):
            return False
        if self.state == "low" and not (d.battery is not None and d.battery < LOW_BATTERY):
            return False
        if self.state == "disabled" and not d.disabled:
            return False
        if self.q:
            needle = self.q.casefold()
            haystack = (d.device_id, d.name or "", d.site, d.room, d.type, d.firmware or "")
            return any(needle in text.casefold() for text in haystack)
        return True


@dataclass(frozen=True)
class Chart:
    metric: str
    svg: Markup
    points: int
    last: float | None
    last_ts: float | None


def _options(devices: list[DeviceRow], filters: Filters) -> dict[str, list[str]]:
    """What the filter selects offer: the values present (rooms of the chosen site only)."""
    rooms = {d.room for d in devices if not filters.site or d.site == filters.site}
    return {
        "sites": sorted({d.site for d in devices}),
        "rooms": sorted(rooms),
        "types": sorted({d.type for d in devices}),
        "states": list(STATES),
    }


def _signal_bars(signal: float | None) -> int:
    """RSSI in dBm as 0-4 bars (-55 or better: 4; -85 or worse: 1)."""
    if signal is None:
        return 0
    return max(1, min(4, int((signal + 95) // 10)))


def _when(ts: float | None) -> str:
    """A table's time: the clock for today, the date too for older rows."""
    if ts is None:
        return "\N{EN DASH}"
    moment = dt.datetime.fromtimestamp(ts)
    return moment.strftime("%H:%M:%S" if moment.date() == dt.date.today() else "%d %b %H:%M")


def _staff(request: Req) -> bool:
    return request.state.user.role in STAFF


@get("/devices", opt=PAGE())
async def devices_page(request: Req) -> Template:
    gw = request.app.state.gateway
    filters = Filters.of(request.query_params)
    every = await gw.reader.call(registry.list_devices)
    shown = [d for d in every if filters.keep(d)]
    context: dict[str, Any] = {
        "devices": shown,
        "filters": filters,
        "low_battery": LOW_BATTERY,
        "bars": _signal_bars,
        "staff": _staff(request),
    }
    if request.query_params.get("fragment") == "grid":
        return render(request, "devices_grid.html", **context)
    notice = None
    if request.query_params.get("sent") is not None:
        notice = {
            "command": request.query_params.get("command", ""),
            "sent": request.query_params.get("sent", "0"),
            "skipped": request.query_params.get("skipped", "0"),
        }
    return render(
        request,
        "devices.html",
        total=len(every),
        options=_options(every, filters),
        commands=COMMANDS,
        notice=notice,
        **context,
    )


@post("/devices", opt=PAGE(*STAFF))
async def devices_command(request: Req) -> Redirect:
    """A command to the devices ticked on the grid, or to every device the filters show (`all`)."""
    gw = request.app.state.gateway
    form = await request.form()
    name = str(form.get("command") or "")
    if name not in COMMANDS:
        raise RegistryError(f"choose a command: {', '.join(COMMANDS)}")
    filters = Filters.of(form)
    if form.get("all"):
        ids = [d.device_id for d in await gw.reader.call(registry.list_devices) if filters.keep(d)]
    else:
        ids = list(dict.fromkeys(str(v) for v in form.getall("device_id", [])))
    if not ids:
        raise RegistryError("tick at least one device (or 'every device shown')")
    actor = request.state.user.username
    sent = skipped = 0
    for device_id in ids:
        try:
            await gw.commands.send(device_id, name, {}, actor)
            sent += 1
        except RegistryError:  # disabled or deleted meanwhile: the others still get it
            skipped += 1
    query = urlencode({"sent": sent, "skipped": skipped, "command": name})
    return go(f"/devices?{filters.query()}&{query}" if filters.query() else f"/devices?{query}")


def _charts(series: dict[str, list[dict[str, Any]]]) -> list[Chart]:
    charts = []
    for metric, rows in series.items():
        points = [(r["ts"], r["value"]) for r in rows]
        last = next(((t, v) for t, v in reversed(points) if v is not None), (None, None))
        svg = line_chart(points, metric, UNITS.get(metric, ""))
        charts.append(Chart(metric, svg, sum(1 for _, v in points if v is not None), last[1], last[0]))
    return charts


def _detail(device_id: str) -> Any:
    def read(conn: Any) -> dict[str, Any]:
        device = registry.get_device(conn, device_id)
        metrics = views.device_metrics(conn, device_id)[:CHART_METRICS]
        series = {m: views.measurements(conn, device_id, m, limit=CHART_POINTS) for m in metrics}
        return {
            "device": device,
            "series": series,
            "events": views.device_events(conn, device_id, 50),
            "commands": views.device_commands(conn, device_id, 50),
        }

    return read


@get("/devices/{device_id:str}", opt=PAGE())
async def device_page(request: Req, device_id: str) -> Template:
    gw = request.app.state.gateway
    data = await gw.reader.call(_detail(device_id))
    context = {
        "device": data["device"],
        "events": data["events"],
        "commands": data["commands"],
        "staff": _staff(request),
        "low_battery": LOW_BATTERY,
        "bars": _signal_bars,
        "command_names": COMMANDS,
        "when": _when,
    }
    fragment = request.query_params.get("fragment")
    if fragment in ("status", "events", "commands"):
        return render(request, f"device_{fragment}.html", **context)
    return render(request, "device.html", charts=_charts(data["series"]), **context)


@post("/devices/{device_id:str}/{action:str}", opt=PAGE(*STAFF))
async def device_action(request: Req, device_id: str, action: str) -> Redirect:
    """identify or reset (a command), rename, move (site/room), disable or enable; each one is audited."""
    gw = request.app.state.gateway
    form = await request.form()
    actor = request.state.user.username
    if action in COMMANDS:
        await gw.commands.send(device_id, action, {}, actor)
        return go(f"/devices/{device_id}")
    if action == "rename":
        name = str(form.get("name") or "").strip()
        if len(name) > 120:
            raise RegistryError("a device name has at most 120 characters")
        changes: dict[str, Any] = {"name": name or None}
    elif action == "move":
        changes = {"site": str(form.get("site") or "").strip(), "room": str(form.get("room") or "").strip()}
    elif action in ("disable", "enable"):
        changes = {"disabled": action == "disable"}
    else:
        raise NotFound(f"no action {action!r} on devices ({', '.join((*COMMANDS, 'rename', 'move', 'disable'))})")
    await gw.writer.run(lambda c: registry.update_device(c, device_id, changes, actor))
    await gw.accounts.refresh()  # a disabled or moved device is disconnected now
    return go(f"/devices/{device_id}")
