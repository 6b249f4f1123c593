"""Every API error is JSON: {"status_code": ..., "message": ...}; our exceptions map to HTTP statuses here."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from gateway.errors import Conflict, Forbidden, NotFound, RegistryError, StoreError

__all__ = ["handlers"]

log = logging.getLogger(__name__)


def _json(status: int, message: str, extra: dict[str, Any] | None = None) -> Response[dict[str, Any]]:
    return Response({"status_code": status, "message": message, **(extra or {})}, status_code=status)


def _http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    extra = {"errors": exc.extra} if isinstance(exc, ValidationException) and exc.extra else None
    return _json(exc.status_code, exc.detail, extra)


def _registry(_: Request[Any, Any, Any], exc: RegistryError) -> Response[dict[str, Any]]:
    statuses = ((NotFound, 404), (Conflict, 409), (Forbidden, 403))
    status = next((code for kind, code in statuses if isinstance(exc, kind)), 400)
    return _json(status, str(exc))


def _store(_: Request[Any, Any, Any], exc: StoreError) -> Response[dict[str, Any]]:
    log.error("store error: %s", exc)
    return _json(503, f"the database refused the request: {exc}")


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(500, "internal error; see the gateway log")


handlers: dict[Any, Any] = {
    HTTPException: _http,
    RegistryError: _registry,
    StoreError: _store,
    Exception: _internal,
}
