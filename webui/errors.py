"""Errors: JSON `{"status_code": ..., "message": ...}` for the API and for the pages' script; an HTML page for a
browser on a page; a page without a session sends the browser to the login page. Our exceptions map to HTTP
statuses here."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.response import Redirect

from gateway.errors import Conflict, Forbidden, NotFound, RegistryError, StoreError
from webui.auth import LoginRequired

__all__ = ["handlers"]

log = logging.getLogger(__name__)
_TITLES = {400: "That did not work", 401: "Sign in", 403: "Not allowed", 404: "Not found", 409: "Already changed"}


def _wants_page(request: Request[Any, Any, Any]) -> bool:
    """A browser on a page (not the API, not the pages' own script asking for JSON)."""
    handler = request.scope.get("route_handler")
    on_page = bool(handler is not None and handler.opt.get("page"))
    return on_page and "application/json" not in request.headers.get("accept", "")


def _reply(request: Request[Any, Any, Any], status: int, message: str, extra: dict[str, Any] | None = None) -> Any:
    if _wants_page(request):
        from webui.pages.base import render

        referer = request.headers.get("referer", "")
        back = referer if referer.startswith(str(request.base_url)) else "/calls"
        title = _TITLES.get(status, "Something went wrong")
        page = render(request, "error.html", status_code=status, status=status, title=title, message=message, back=back)
        return page
    return Response({"status_code": status, "message": message, **(extra or {})}, status_code=status)


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Any:
    if isinstance(exc, LoginRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return Redirect(f"/login?next={quote(target)}", status_code=303)
    extra = {"errors": exc.extra} if isinstance(exc, ValidationException) and exc.extra else None
    return _reply(request, exc.status_code, exc.detail, extra)


def _registry(request: Request[Any, Any, Any], exc: RegistryError) -> Any:
    statuses = ((NotFound, 404), (Conflict, 409), (Forbidden, 403))
    status = next((code for kind, code in statuses if isinstance(exc, kind)), 400)
    return _reply(request, status, str(exc))


def _store(request: Request[Any, Any, Any], exc: StoreError) -> Any:
    log.error("store error: %s", exc)
    return _reply(request, 503, f"the database refused the request: {exc}")


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Any:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _reply(request, 500, "internal error; see the gateway log")


handlers: dict[Any, Any] = {
    HTTPException: _http,
    RegistryError: _registry,
    StoreError: _store,
    Exception: _internal,
}
