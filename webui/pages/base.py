"""What every page shares: the Jinja engine, the navigation by role, and `render`.

Pages are server-rendered and work without JavaScript; /static/app.js only makes them live (SSE) and turns
form posts into in-place updates. Templates autoescape: a device named `<b>` shows as text.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import jinja2
from litestar import Request
from litestar.contrib.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.template import TemplateConfig

__all__ = ["NAV", "PAGE", "Req", "go", "local_path", "render", "template_config"]

HERE = Path(__file__).resolve().parent.parent
Req = Request[Any, Any, Any]

ANY = ("admin", "installer", "crew")
STAFF = ("admin", "installer")
ADMIN = ("admin",)


def PAGE(*allowed: str) -> dict[str, Any]:
    """Route options of a page admitting these roles (any role if none is named)."""
    return {"roles": allowed or ANY, "page": True}


# (path, label, roles): the menu shows what the role may open; the guard refuses the rest anyway
NAV: list[tuple[str, str, tuple[str, ...]]] = [
    ("/calls", "Calls", ANY),
    ("/dashboard", "Dashboard", ANY),
    ("/devices", "Devices", ANY),
    ("/traffic", "Traffic", STAFF),
    ("/settings", "Settings", STAFF),
    ("/provisioning", "Provisioning", STAFF),
    ("/security", "Security", STAFF),
    ("/audit", "Audit", ADMIN),
    ("/users", "Users", ADMIN),
    ("/account", "Account", ANY),
]


def _age(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int((now or time.time()) - ts))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _clock(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _environment() -> jinja2.Environment:
    # auto_reload off: otherwise every render stats the template file (PITFALLS, Litestar)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        auto_reload=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["clock"] = _clock
    return env


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(_environment()))


def render(request: Req, name: str, status_code: int = 200, **context: Any) -> Template:
    """A page with the signed-in user, their menu and the CSRF token every form carries."""
    session = getattr(request.state, "session", None)
    user = getattr(request.state, "user", None)
    gw = request.app.state.gateway
    menu = [(path, label) for path, label, allowed in NAV if user is not None and user.role in allowed]
    return Template(
        template_name=name,
        status_code=status_code,
        context={
            "user": user,
            "csrf": session.csrf if session is not None else "",
            "menu": menu,
            "path": request.url.path,
            "site": gw.cfg.gateway.site,
            "gateway_id": gw.gateway_id,
            "now": time.time(),
            **context,
        },
        headers={"Cache-Control": "no-store"},
    )


def local_path(value: Any, default: str = "/calls") -> str:
    """A path on this gateway (no `//host`, scheme or backslash), else `default`: no open redirect."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def go(path: str) -> Redirect:
    """Post/redirect/get: after a form, the browser lands on a page it can reload safely."""
    return Redirect(path, status_code=303)
