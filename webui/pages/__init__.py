"""The crew web UI: server-rendered pages (Jinja) over the same data as the JSON API."""

from __future__ import annotations

from typing import Any

from litestar import Router

from webui.pages.audit import audit_page
from webui.pages.calls import call_action, call_page, calls_history, calls_page
from webui.pages.dashboard import dashboard_page
from webui.pages.devices import device_action, device_page, devices_command, devices_page
from webui.pages.login import account, change_password, login_form, login_submit, logout, root
from webui.pages.settings import duty_save, room_add, room_change, settings_page
from webui.pages.traffic import traffic_page
from webui.pages.users import user_add, user_change, users_page

__all__ = ["PAGES", "pages"]

PAGES: list[Any] = [
    root,
    login_form,
    login_submit,
    logout,
    account,
    change_password,
    calls_page,
    calls_history,
    call_page,
    call_action,
    traffic_page,
    settings_page,
    room_add,
    room_change,
    duty_save,
    audit_page,
    users_page,
    user_add,
    user_change,
    dashboard_page,
    devices_page,
    devices_command,
    device_page,
    device_action,
]


def pages() -> Router:
    """Every page, kept out of the OpenAPI document (it describes the JSON API)."""
    return Router(path="/", route_handlers=PAGES, include_in_schema=False)
