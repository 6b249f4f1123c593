"""Live traffic: the traffic log filtered by an MQTT topic filter, newest first, and (with /static/traffic.js)
the messages arriving from /api/v1/traffic/stream, with pause, resume and export.

The history is server-rendered and works without JavaScript; the stream starts right after the newest row
this page was rendered with, so nothing falls between the two.
"""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.response import Template

from gateway.errors import RegistryError
from webui.auth import STAFF
from webui.pages.base import PAGE, Req, render
from webui.routes.traffic_stream import check_filter, history, latest_id

__all__ = ["traffic_page"]

PAGE_ROWS = 100


def _before(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@get("/traffic", opt=PAGE(*STAFF))
async def traffic_page(request: Req) -> Template:
    q = request.query_params
    text = (q.get("topic") or "").strip()
    before = _before(q.get("before"))
    error: str | None = None
    try:
        flt = check_filter(text)
    except RegistryError as exc:
        flt, error = None, str(exc)

    def read(conn: Any) -> tuple[list[dict[str, Any]], int | None, int]:
        if error is not None:
            return [], None, latest_id(conn)
        rows, older = history(conn, flt, before, PAGE_ROWS)
        return rows, older, latest_id(conn)

    rows, older, latest = await request.app.state.gateway.reader.call(read)
    context = {"topic": text, "flt": flt, "error": error, "rows": rows, "older": older, "before": before}
    status = 400 if error else 200
    if q.get("fragment") == "history":  # the page's script swaps this in when the filter changes
        return render(request, "traffic_history.html", status_code=status, latest=latest, **context)
    return render(request, "traffic.html", status_code=status, latest=latest, **context)
