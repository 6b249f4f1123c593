"""Fails loudly if the pinned amqtt internals that gateway/broker subclasses have changed.

gateway/broker/server.py overrides private methods of amqtt 0.12.1 and reads private fields. An upgrade
must re-check every override; these signatures and names are the contract.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import uvicorn
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import IncomingApplicationMessage, Session

OVERRIDDEN = {
    "_initialize_client_session": ["self", "reader", "writer", "remote_address", "remote_port"],
    "_topic_filtering": ["self", "session", "topic", "action"],
    "_handle_message_delivery": ["self", "client_session", "handler", "wait_deliver"],
    "_handle_disconnect": ["self", "client_session", "handler", "disconnect_waiter"],
    "_client_message_loop": ["self", "client_session", "handler"],
    "_cleanup_session": ["self", "client_id"],
    "_stop_handler": ["self", "handler"],
    "_publish_retained_messages_for_subscription": ["self", "subscription", "session"],
    "_broadcast_message": ["self", "session", "topic", "data", "force_qos"],
    "_get_handler": ["self", "session"],
}


def test_pinned_versions() -> None:
    assert version("amqtt") == "0.12.1", "amqtt changed: re-check every override in gateway/broker/server.py"
    assert version("uvicorn") == "0.54.0", "uvicorn changed: re-check gateway/webserver.py capture_signals"


def test_overridden_broker_methods_keep_their_signatures() -> None:
    for name, params in OVERRIDDEN.items():
        method = getattr(Broker, name)
        assert list(inspect.signature(method).parameters) == params, name


def test_private_fields_we_read_exist() -> None:
    source = inspect.getsource(Broker.__init__)
    for field in ("self._servers", "self._sessions", "self._subscriptions", "self._retained_messages"):
        assert field in source, field
    handler = inspect.getsource(BrokerProtocolHandler)
    assert "cls(plugins_manager, loop=loop)" in handler  # the handler class is fixed: we swap __class__ after
    assert "__slots__" in inspect.getsource(IncomingApplicationMessage)
    assert list(inspect.signature(BrokerProtocolHandler.handle_publish).parameters) == ["self", "publish_packet"]
    flow = BrokerProtocolHandler._handle_qos1_message_flow
    assert list(inspect.signature(flow).parameters) == ["self", "app_message"]
    assert "delivered_message_queue.put(app_message)" in inspect.getsource(flow)
    assert hasattr(Session(), "delivered_message_queue")
    assert hasattr(uvicorn.Server, "capture_signals")
