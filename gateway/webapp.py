"""Litestar as the gateway serves it: without the plugins for pydantic and attrs models, which no handler uses.

Litestar adds them whenever the packages are installed, and pydantic is (amqtt's command line needs typer, which
needs pydantic): its plugins import it at start, about 11 MB of the gateway's resident memory for nothing.
litestar is pinned (pyproject.toml); tests/test_webapp.py fails if this override stops taking effect.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.plugins import PluginProtocol
from litestar.plugins.core import MsgspecDIPlugin

__all__ = ["App"]


class App(Litestar):
    @staticmethod
    def _get_default_plugins(plugins: list[PluginProtocol]) -> list[PluginProtocol]:
        # litestar's own list minus the optional ones: handlers take and return msgspec structs and plain types
        plugins.append(MsgspecDIPlugin())
        return plugins
