"""The crew's home page: open calls, live, with accept / complete / cancel; the history; today's figures.

The data comes from the same functions the JSON API serves (gateway.calls.queries), and the buttons go
through the same transitions (Calls.accept/complete/cancel), so a page and a watch can never disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from litestar import get, post
from litestar.response import Redirect, Template

from gateway.calls.model import rank
from gateway.calls.queries import STATES, call_detail, call_stats, list_calls
from gateway.errors import NotFound
from webui.pages.base import PAGE, Req, go, local_path, render

__all__ = ["call_action", "call_page", "calls_history", "calls_page"]


def _start_of_day() -> float:
    today = dt.datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
    return today.timestamp()


def _board(conn: Any) -> list[dict[str, Any]]:
    """Open and accepted calls: emergencies first, then urgent, then normal; newest first within each."""
    calls = list_calls(conn, ["open", "accepted"], limit=500)
    return sorted(calls, key=lambda c: (-rank(c["priority"]), c["state"] != "open", -c["created_at"]))


@get("/calls", opt=PAGE())
async def calls_page(request: Req) -> Template:
    gw = request.app.state.gateway
    fragment = request.query_params.get("fragment")
    if fragment == "stats":  # the live script swaps these parts in when a call changes
        stats = await gw.reader.call(lambda c: call_stats(c, _start_of_day()))
        return render(request, "calls_stats.html", stats=stats)
    board = await gw.reader.call(_board)
    if fragment == "board":
        return render(request, "calls_board.html", calls=board)
    stats = await gw.reader.call(lambda c: call_stats(c, _start_of_day()))
    return render(request, "calls.html", calls=board, stats=stats)


@get("/calls/history", opt=PAGE())
async def calls_history(request: Req) -> Template:
    gw = request.app.state.gateway
    q = request.query_params
    state = q.get("state") or None
    room = q.get("room") or None
    days = q.get("days") or "1"
    try:
        since = _start_of_day() - 86400 * (max(1, min(365, int(days))) - 1)
    except ValueError:
        since = _start_of_day()
    states = [state] if state in STATES else None
    calls = await gw.reader.call(lambda c: list_calls(c, states, None, room, since, 1000))
    stats = await gw.reader.call(lambda c: call_stats(c, since))
    filters = {"state": state or "", "room": room or "", "days": days}
    return render(request, "calls_history.html", calls=calls, stats=stats, filters=filters, states=STATES)


@get("/calls/{call_id:int}", opt=PAGE())
async def call_page(request: Req, call_id: int) -> Template:
    call = await request.app.state.gateway.reader.call(lambda c: call_detail(c, call_id))
    return render(request, "call.html", call=call)


@post("/calls/{call_id:int}/{action:str}", opt=PAGE())
async def call_action(request: Req, call_id: int, action: str) -> Redirect:
    """accept, complete or cancel from a form; errors (already taken, emergency) come back as a page."""
    calls = request.app.state.gateway.calls
    user = request.state.user
    form = await request.form()
    if action == "accept":
        await calls.accept(call_id, user.username)
    elif action == "complete":
        await calls.complete(call_id, user.username)
    elif action == "cancel":
        reason = str(form.get("reason") or "").strip() or None
        await calls.cancel(call_id, user.username, user.role == "admin", reason)
    else:
        raise NotFound(f"no action {action!r} on calls (accept, complete, cancel)")
    return go(local_path(form.get("back")))
