"""The Litestar app, assembled in one factory around a running Gateway."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.static_files import create_static_files_router

from gateway import __version__
from gateway.webapp import App
from webui.auth import guard
from webui.errors import handlers
from webui.limits import LoginLimiter
from webui.pages import pages
from webui.pages.base import HERE, template_config
from webui.pages.provisioning import security_pages
from webui.routes.calls import CallController, RoomController, get_duty, put_duty
from webui.routes.data import list_events, list_traffic
from webui.routes.devices import DeviceController, read_command
from webui.routes.live import live
from webui.routes.provisioning import ProvisioningController, ca_certificate, provision, revoke_device
from webui.routes.security import SecurityController, set_device_profile
from webui.routes.system import healthz, metrics
from webui.routes.traffic_stream import traffic_stream
from webui.routes.uplink import uplink_status

__all__ = ["create_app"]


def create_app(gateway: Any) -> App:
    return App(
        route_handlers=[
            healthz,
            metrics,
            DeviceController,
            read_command,
            list_events,
            list_traffic,
            traffic_stream,
            live,
            CallController,
            RoomController,
            get_duty,
            put_duty,
            ProvisioningController,
            provision,
            ca_certificate,
            revoke_device,
            SecurityController,
            set_device_profile,
            uplink_status,
            pages(),
            security_pages(),  # provisioning and security pages (webui/pages/provisioning.py)
            # the UI's own CSS, script and icon: nothing is fetched from outside the gateway
            create_static_files_router("/static", [HERE / "static"], opt={"public": True}, include_in_schema=False),
        ],
        template_config=template_config(),
        guards=[guard],
        exception_handlers=handlers,
        state=State({"gateway": gateway, "login_limiter": LoginLimiter()}),
        # offline appliance: the schema as JSON only, no UI whose assets come from a CDN
        openapi_config=OpenAPIConfig(
            title="Bosun gateway API",
            version=__version__,
            path="/schema",
            render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])],
        ),
        logging_config=None,
        debug=False,
    )
