"""Who is asking, and may they: an API token (`Authorization: Bearer <token>`) or a signed-in browser session.

Every handler names the roles it admits (`opt={"roles": ...}`, admin only if it says nothing) or says it is
public. A browser session proves itself with its cookie; anything that changes state must also carry the
session's CSRF token, as the `_csrf` form field (pages) or the `X-CSRF-Token` header (the pages' script
calling the JSON API). Pages (`opt={"page": True}`) send a browser without a session to the login page.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection, Request
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from gateway.models import User
from gateway.store.people import WebSession, lookup_session
from gateway.store.registry import lookup_token

__all__ = ["ADMIN", "ANY", "COOKIE", "STAFF", "LoginRequired", "guard", "roles"]

ANY = ("admin", "installer", "crew")
STAFF = ("admin", "installer")
ADMIN = ("admin",)
COOKIE = "bosun_session"
_SAFE = {"GET", "HEAD", "OPTIONS"}


class LoginRequired(NotAuthorizedException):
    """A page asked for without a session: the browser goes to the login page (webui.errors)."""


def roles(*allowed: str) -> dict[str, Any]:
    return {"roles": tuple(allowed)}


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """App-wide guard: a handler is public only if it says so; otherwise it needs a user with a listed role."""
    if handler.opt.get("public") or connection.scope["path"].startswith("/schema"):
        return  # the OpenAPI document is public documentation
    allowed: tuple[str, ...] = handler.opt.get("roles", ADMIN)
    header = connection.headers.get("authorization", "")
    gateway = connection.app.state.gateway
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException("an API token is required: Authorization: Bearer <token>")
        user: User | None = await gateway.reader.call(lambda c: lookup_token(c, token.strip()))
        if user is None:
            raise NotAuthorizedException("the API token is unknown or revoked")
    else:
        session = await _session(connection)
        if session is None:
            if handler.opt.get("page"):
                raise LoginRequired("sign in first")
            raise NotAuthorizedException("sign in, or give an API token: Authorization: Bearer <token>")
        if connection.scope.get("method", "GET") not in _SAFE:
            await _check_csrf(connection, session)
        connection.state.session = session
        user = session.user
    connection.state.user = user  # also for the error page's menu
    if user.role not in allowed:
        raise PermissionDeniedException(f"role {user.role} may not do this (needs {' or '.join(allowed)})")


async def _session(connection: ASGIConnection[Any, Any, Any, Any]) -> WebSession | None:
    token = connection.cookies.get(COOKIE)
    if not token:
        return None
    found: WebSession | None = await connection.app.state.gateway.reader.call(lambda c: lookup_session(c, token))
    return found


async def _check_csrf(connection: ASGIConnection[Any, Any, Any, Any], session: WebSession) -> None:
    sent = connection.headers.get("x-csrf-token")
    if sent is None and isinstance(connection, Request):
        form = await connection.form()  # parsed once; the handler reads the same parsed form
        value = form.get("_csrf")
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise PermissionDeniedException("the form's security token is missing or stale: reload the page and retry")


async def optional_session(connection: ASGIConnection[Any, Any, Any, Any]) -> WebSession | None:
    """The session on a public page (the login page shows who is signed in)."""
    return await _session(connection)
