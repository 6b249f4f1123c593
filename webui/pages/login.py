"""Sign in, sign out, and a person's own account (password change)."""

from __future__ import annotations

from litestar import get, post
from litestar.datastructures import Cookie
from litestar.response import Redirect, Template

from gateway.store import people
from webui.auth import COOKIE, optional_session
from webui.pages.base import PAGE, Req, go, local_path, render

__all__ = ["account", "change_password", "login_form", "login_submit", "logout", "root"]


def _address(request: Req) -> str:
    return request.client.host if request.client else "unknown"


@get("/", opt={"public": True})
async def root(request: Req) -> Redirect:
    return go("/calls" if await optional_session(request) else "/login")


@get("/login", opt={"public": True})
async def login_form(request: Req) -> Template | Redirect:
    target = local_path(request.query_params.get("next"))
    if await optional_session(request):
        return go(target)
    return render(request, "login.html", next=target, error=None, username="")


@post("/login", opt={"public": True})
async def login_submit(request: Req) -> Template | Redirect:
    gw = request.app.state.gateway
    form = await request.form()
    username = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    target = local_path(form.get("next"))
    address = _address(request)
    limiter = request.app.state.login_limiter
    wait = limiter.retry_after(username, address)
    if wait:
        message = f"Too many failed sign-ins. Try again in {wait} seconds."
        page = render(request, "login.html", status_code=429, next=target, error=message, username=username)
        page.headers["Retry-After"] = str(wait)
        return page
    user = await gw.reader.call(lambda c: people.check_password(c, username, password)) if username else None
    if user is None:
        limiter.failed(username, address)
        error = "Wrong user name or password."
        return render(request, "login.html", status_code=401, next=target, error=error, username=username)
    limiter.succeeded(username)
    hours = gw.cfg.http.session_hours
    token, _ = await gw.writer.run(lambda c: people.start_session(c, user.username, hours, address))
    cookie = Cookie(
        key=COOKIE,
        value=token,
        max_age=int(hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return Redirect(target, status_code=303, cookies=[cookie])


@post("/logout", opt=PAGE())
async def logout(request: Req) -> Redirect:
    token = request.cookies.get(COOKIE, "")
    await request.app.state.gateway.writer.run(lambda c: people.end_session(c, token))
    return Redirect("/login", status_code=303, cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/")])


@get("/account", opt=PAGE())
async def account(request: Req) -> Template:
    return render(request, "account.html", message=None, error=None)


@post("/account/password", opt=PAGE())
async def change_password(request: Req) -> Template:
    gw = request.app.state.gateway
    user = request.state.user
    form = await request.form()
    old, new, again = (str(form.get(k) or "") for k in ("current", "new", "repeat"))
    error = None
    if new != again:
        error = "The new password and its repetition differ."
    elif len(new) < people.MIN_PASSWORD:
        error = f"Passwords need at least {people.MIN_PASSWORD} characters."
    elif await gw.reader.call(lambda c: people.check_password(c, user.username, old)) is None:
        error = "The current password is wrong."
    if error is not None:
        return render(request, "account.html", status_code=400, message=None, error=error)
    token = request.cookies.get(COOKIE)
    await gw.writer.run(lambda c: people.set_password(c, user.username, new, user.username, keep_token=token))
    return render(request, "account.html", message="Password changed; other sign-ins were ended.", error=None)
