"""API authentication and roles: `Authorization: Bearer <token>`; every handler names the roles it admits."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from gateway.models import User
from gateway.store.registry import lookup_token

__all__ = ["ADMIN", "ANY", "STAFF", "guard", "roles"]

ANY = ("admin", "installer", "crew")
STAFF = ("admin", "installer")
ADMIN = ("admin",)


def roles(*allowed: str) -> dict[str, Any]:
    return {"roles": tuple(allowed)}


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """App-wide guard: a handler is public only if it says so; otherwise it needs a token with a listed role."""
    if handler.opt.get("public") or connection.scope["path"].startswith("/schema"):
        return  # the OpenAPI document is public documentation
    allowed: tuple[str, ...] = handler.opt.get("roles", ADMIN)
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthorizedException("an API token is required: Authorization: Bearer <token>")
    gateway = connection.app.state.gateway
    user: User | None = await gateway.reader.call(lambda c: lookup_token(c, token.strip()))
    if user is None:
        raise NotAuthorizedException("the API token is unknown or revoked")
    if user.role not in allowed:
        raise PermissionDeniedException(f"role {user.role} may not do this (needs {' or '.join(allowed)})")
    connection.state.user = user
