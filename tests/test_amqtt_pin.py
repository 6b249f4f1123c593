"""Fails loudly if the pinned amqtt internals that gateway/broker subclasses have changed.

gateway/broker/server.py keeps amqtt's listeners and lifecycle and takes over each accepted connection. It
overrides `_create_server_instance` (TCP/TLS listeners serve our protocol), `ws_connected`, `start` and
`shutdown`, and reads the private `_servers` map and amqtt's `Server` fields (`conn_count`, `max_connections`,
`instance`). An upgrade must re-check every one; these names and signatures are the contract.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import uvicorn
from amqtt.broker import Broker, Server

from gateway.broker.server import broker_config
from gateway.config import MqttSection

OVERRIDDEN = {
    "_create_server_instance": ["self", "listener_name", "listener_type", "address", "port", "ssl_context"],
    "ws_connected": ["self", "websocket", "listener_name"],
    "start": ["self"],
    "shutdown": ["self"],
}


def test_pinned_versions() -> None:
    assert version("amqtt") == "0.12.1", "amqtt changed: re-check every override in gateway/broker/server.py"
    assert version("uvicorn") == "0.54.0", "uvicorn changed: re-check gateway/webserver.py capture_signals"


def test_overridden_broker_methods_keep_their_signatures() -> None:
    for name, params in OVERRIDDEN.items():
        method = getattr(Broker, name)
        assert list(inspect.signature(method).parameters) == params, name


def test_listeners_hand_connections_to_the_methods_we_override() -> None:
    source = inspect.getsource(Broker._create_server_instance)
    assert "partial(self.ws_connected, listener_name=listener_name)" in source
    start = inspect.getsource(Broker._start_listeners)
    assert "await self._create_server_instance(listener_name, listener.type, address, port, ssl_context)" in start
    assert "self._servers[listener_name] = Server(" in start


def test_server_fields_we_read_exist() -> None:
    server = Server("x", None, 3)  # type: ignore[arg-type]
    assert server.conn_count == 0 and server.max_connections == 3 and server.instance is None
    assert callable(server.acquire_connection) and callable(server.release_connection)
    assert "self._servers" in inspect.getsource(Broker.__init__)
    assert hasattr(uvicorn.Server, "capture_signals")


async def test_an_empty_plugins_map_loads_no_plugin() -> None:
    """Without a `plugins` key amqtt loads its event/packet loggers and $SYS plugin (Tasks per packet)."""
    broker = Broker(broker_config(MqttSection(bind="127.0.0.1", port=0)))
    assert broker.plugins_manager._plugins == []
