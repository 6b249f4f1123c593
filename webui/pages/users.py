"""Users, managed by admins: add one, change a role, disable or enable, reset a password.

The store functions (gateway.store.people, registry.add_user) check the rules and write the audit rows; this
page only shows their refusals (a short password, the last enabled admin) next to the form that caused them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from litestar import get, post
from litestar.response import Redirect, Template

from gateway.errors import Conflict, NotFound, RegistryError
from gateway.models import ROLES
from gateway.store import people, registry
from webui.auth import ADMIN, COOKIE
from webui.pages.base import PAGE, Req, go, render

__all__ = ["user_add", "user_change", "users_page"]

_DONE = {
    "added": "User {user} added.",
    "role": "{user} now has the role {role}.",
    "disabled": "{user} is disabled and signed out everywhere.",
    "enabled": "{user} is enabled again.",
    "password": "{user}'s password was reset; their sessions were ended.",
}


def _list(conn: Any) -> list[dict[str, Any]]:
    """people.list_users, with the last sign-in from the audit log too (a session row goes at sign-out)."""
    users: list[dict[str, Any]] = people.list_users(conn)
    logins = dict(conn.execute("SELECT target, max(ts) FROM audit_log WHERE action = 'user.login' GROUP BY target"))
    for user in users:
        seen = [t for t in (user["last_login"], logins.get(user["username"])) if t is not None]
        user["last_login"] = max(seen) if seen else None
    return users


async def _page(request: Req, status: int = 200, error: str | None = None, **form: Any) -> Template:
    users = await request.app.state.gateway.reader.call(_list)
    q = request.query_params
    done = _DONE.get(q.get("done") or "")
    message = done.format(user=q.get("user", ""), role=q.get("role", "")) if done and status == 200 else None
    return render(
        request,
        "users.html",
        status_code=status,
        users=users,
        roles=ROLES,
        error=error,
        message=message,
        form={"username": "", "role": "crew", **form},
        min_password=people.MIN_PASSWORD,
    )


def _status(exc: RegistryError) -> int:
    return 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400


def _done(what: str, **extra: str) -> Redirect:
    return go(f"/users?{urlencode({'done': what, **extra})}")


@get("/users", opt=PAGE(*ADMIN))
async def users_page(request: Req) -> Template:
    return await _page(request)


@post("/users", opt=PAGE(*ADMIN))
async def user_add(request: Req) -> Template | Redirect:
    gw = request.app.state.gateway
    form = await request.form()
    username, role = (str(form.get(k) or "").strip() for k in ("username", "role"))
    password, repeat = (str(form.get(k) or "") for k in ("password", "repeat"))
    actor = request.state.user.username
    if password != repeat:
        return await _page(request, 400, "The password and its repetition differ.", username=username, role=role)
    try:
        await gw.writer.run(lambda c: registry.add_user(c, username, role, password, actor))
    except RegistryError as exc:
        return await _page(request, _status(exc), str(exc), username=username, role=role)
    return _done("added", user=username)


@post("/users/{username:str}/{what:str}", opt=PAGE(*ADMIN))
async def user_change(request: Req, username: str, what: str) -> Template | Redirect:
    """`role` (form field role), `disabled` (form field disabled: 1 or 0) or `password` (password, repeat)."""
    gw = request.app.state.gateway
    form = await request.form()
    actor = request.state.user.username
    try:
        if what == "role":
            role = str(form.get("role") or "")
            await gw.writer.run(lambda c: people.update_user(c, username, {"role": role}, actor))
            return _done("role", user=username, role=role)
        if what == "disabled":
            disabled = form.get("disabled") == "1"
            await gw.writer.run(lambda c: people.update_user(c, username, {"disabled": disabled}, actor))
            return _done("disabled" if disabled else "enabled", user=username)
        if what == "password":
            new, repeat = (str(form.get(k) or "") for k in ("password", "repeat"))
            if new != repeat:
                return await _page(request, 400, f"{username}: the new password and its repetition differ.")
            keep = request.cookies.get(COOKIE) if username == actor else None  # resetting one's own: stay in
            await gw.writer.run(lambda c: people.set_password(c, username, new, actor, keep_token=keep))
            return _done("password", user=username)
    except RegistryError as exc:
        return await _page(request, _status(exc), str(exc))
    return await _page(request, 404, f"no change {what!r} for users (role, disabled, password)")
