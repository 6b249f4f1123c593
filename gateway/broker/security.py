"""Our amqtt auth and ACL plugins, and the Gatekeeper that decides for both.

Devices log in with the registry's credentials (username = device id = MQTT client id); integrations with
their own account; anonymous clients only if `[mqtt] allow_anonymous` and then only within the anonymous_*
patterns. The decision per (principal, filter) is a pure function (gateway.acl); the broker subclass calls
the Gatekeeper directly on the hot path, and the plugins make the same rules work in a stock amqtt broker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from gateway import acl, passwords
from gateway.accounts import Accounts
from gateway.config import MqttSection
from gateway.metrics import Metrics
from gateway.models import Principal

__all__ = ["BosunAuthPlugin", "BosunTopicPlugin", "Gatekeeper", "principal_of"]

log = logging.getLogger(__name__)


def principal_of(session: Session) -> Principal | None:
    return getattr(session, "bosun_principal", None)


class Gatekeeper:
    def __init__(self, cfg: MqttSection, accounts: Accounts, metrics: Metrics) -> None:
        self._cfg = cfg
        self._accounts = accounts
        self._metrics = metrics
        self._root = cfg.root
        self._anonymous = Principal(
            "anonymous",
            "anonymous",
            read=tuple(cfg.anonymous_subscribe),
            write=tuple(cfg.anonymous_publish),
            deny=tuple(cfg.anonymous_deny),
        )
        if cfg.allow_anonymous and "#" in (*cfg.anonymous_publish, *cfg.anonymous_subscribe):
            log.warning("anonymous clients may use '#': for development only, never on a vessel")

    def _refuse(self, reason: str, session: Session) -> bool:
        self._metrics.auth_failures.labels(reason).inc()
        log.warning("refused MQTT client %r from %s: %s", session.client_id, session.remote_address, reason)
        return False

    async def authenticate(self, session: Session) -> bool:
        """Decide a CONNECT; on success the session carries its principal for every later ACL check."""
        username = session.username
        if username:
            account = self._accounts.get(username)
            password = session.password or ""
            if account is None:
                # spend the same time as a real check so unknown names cannot be told from wrong passwords
                passwords.verify("sha256$00$00", password)
                return self._refuse("unknown_user", session)
            if account.secret_hash.startswith("$argon2"):
                ok = await asyncio.to_thread(passwords.verify, account.secret_hash, password)
            else:
                ok = passwords.verify(account.secret_hash, password)
            if not ok:
                return self._refuse("bad_password", session)
            principal = account.principal
            if principal.kind == "device":
                assert principal.device is not None
                if principal.device.disabled:
                    return self._refuse("device_disabled", session)
                if session.client_id != principal.name:
                    return self._refuse("client_id_mismatch", session)
        else:
            if not self._cfg.allow_anonymous:
                return self._refuse("anonymous", session)
            principal = self._anonymous
        # a client id naming a device is that device's alone: anything else would take over its session
        if principal.kind != "device" and self._accounts.device(session.client_id or "") is not None:
            return self._refuse("client_id_taken", session)
        if session.will_flag and session.will_topic and not acl.may_publish(principal, session.will_topic, self._root):
            return self._refuse("will_not_allowed", session)
        session.bosun_principal = principal
        return True

    def allowed(self, session: Session, topic: str, action: Action) -> bool:
        principal = principal_of(session)
        if principal is None:
            return False
        if action == Action.PUBLISH:
            ok = acl.may_publish(principal, topic, self._root)
        elif action == Action.SUBSCRIBE:
            ok = acl.may_subscribe(principal, topic, self._root)
        else:
            ok = acl.may_receive(principal, topic, self._root)
        if not ok and action != Action.RECEIVE:
            self._metrics.drops.labels(f"acl_{action.value}").inc()
            log.warning("ACL refused %s %s on %r", principal.name, action.value, topic)
        return ok


class BosunAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin delegating to the Gatekeeper handed in through the plugin config."""

    @dataclass
    class Config:
        gate: Any = field(default=None)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._gate: Gatekeeper = self.config.gate

    async def authenticate(self, *, session: Session) -> bool | None:
        return await self._gate.authenticate(session)


class BosunTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin delegating to the Gatekeeper (publish, subscribe and receive checks)."""

    @dataclass
    class Config:
        gate: Any = field(default=None)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._gate: Gatekeeper = self.config.gate

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        return self._gate.allowed(session, topic, action)
