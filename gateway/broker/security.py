"""The Gatekeeper: who may connect, and what a connected principal may publish, subscribe to and receive.

Devices log in with the registry's credentials (username = device id = MQTT client id); integrations with
their own account; anonymous clients only if `[mqtt] allow_anonymous` and then only within the anonymous_*
patterns. The decision per (principal, topic) is a pure function (gateway.acl); the broker calls it on the
hot path with a per-session cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway import acl, passwords
from gateway.accounts import Accounts
from gateway.config import MqttSection
from gateway.metrics import Metrics
from gateway.models import Principal
from gateway.trust import Trust

__all__ = ["PUBLISH", "RECEIVE", "SUBSCRIBE", "Gatekeeper"]

log = logging.getLogger(__name__)

PUBLISH, SUBSCRIBE, RECEIVE = "publish", "subscribe", "receive"


class Gatekeeper:
    def __init__(self, cfg: MqttSection, accounts: Accounts, metrics: Metrics, trust: Trust | None = None) -> None:
        self._cfg = cfg
        self._accounts = accounts
        self._trust = trust  # issued and revoked certificates, security profiles (gateway.trust)
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

    @property
    def anonymous(self) -> Principal:
        return self._anonymous

    def principal(self, username: str | None) -> Principal | None:
        """The principal a username stands for now (None once its account is gone)."""
        if not username:
            return self._anonymous if self._cfg.allow_anonymous else None
        account = self._accounts.get(username)
        return None if account is None else account.principal

    def _refuse(self, reason: str, client_id: str, remote: str) -> Principal | None:
        self._metrics.auth_failures.labels(reason).inc()
        log.warning("refused MQTT client %r from %s: %s", client_id, remote, reason)
        return None

    async def authenticate(
        self,
        client_id: str,
        username: str | None,
        password: str | None,
        will_topic: str | None,
        remote: str,
        certificate: dict[str, Any] | None = None,
    ) -> Principal | None:
        """Decide a CONNECT: the principal every later ACL check uses, or None (refused, counted, logged).

        `certificate` is the client certificate the TLS listener verified against the gateway's CA: it must be
        one we issued and did not revoke, and its device id must be the client id (and the username, if any);
        then it is the credential and no password is needed.
        """
        cert_device, refusal = (None, None)
        if certificate and self._trust is not None:
            cert_device, refusal = self._trust.certificate_device(certificate)
        if refusal is not None:
            return self._refuse(refusal, client_id, remote)
        if cert_device is not None:
            if client_id != cert_device:
                return self._refuse("certificate_client_id_mismatch", client_id, remote)
            if username and username != cert_device:
                return self._refuse("certificate_username_mismatch", client_id, remote)
            account = self._accounts.get(cert_device)
            if account is None or account.principal.device is None:
                return self._refuse("unknown_user", client_id, remote)  # revoked or deleted
            principal = account.principal
            assert principal.device is not None
            if principal.device.disabled:
                return self._refuse("device_disabled", client_id, remote)
        elif username:
            account = self._accounts.get(username)
            if account is None:
                # maybe just added by the CLI or another process: look once (one version query, shared by a
                # connect storm) instead of refusing until the next poll
                await self._accounts.refresh_shared()
                account = self._accounts.get(username)
            password = password or ""
            if account is None:
                # spend the same time as a real check so unknown names cannot be told from wrong passwords
                passwords.verify("sha256$00$00", password)
                return self._refuse("unknown_user", client_id, remote)
            if account.secret_hash.startswith("$argon2"):
                ok = await asyncio.to_thread(passwords.verify, account.secret_hash, password)
            else:
                ok = passwords.verify(account.secret_hash, password)
            if not ok:
                return self._refuse("bad_password", client_id, remote)
            principal = account.principal
            if principal.kind == "device":
                assert principal.device is not None
                if principal.device.disabled:
                    return self._refuse("device_disabled", client_id, remote)
                if client_id != principal.name:
                    return self._refuse("client_id_mismatch", client_id, remote)
                if self._trust is not None and self._trust.certificate_required(principal):
                    return self._refuse("certificate_required", client_id, remote)
        else:
            if not self._cfg.allow_anonymous:
                return self._refuse("anonymous", client_id, remote)
            principal = self._anonymous
        # a client id naming a device is that device's alone: anything else would take over its session
        if principal.kind != "device" and self._accounts.device(client_id) is not None:
            return self._refuse("client_id_taken", client_id, remote)
        if will_topic is not None and not acl.may_publish(principal, will_topic, self._root):
            return self._refuse("will_not_allowed", client_id, remote)
        return principal

    def within_limits(self, principal: Principal | None, qos: int, retain: bool) -> bool:
        """A PUBLISH's QoS and retain flag within the device's security profile (counted when not)."""
        trust = self._trust
        if trust is None or not trust.profiled or trust.within_limits(principal, qos, retain):
            return True
        self._metrics.drops.labels("profile_limits").inc()
        log.warning(
            "profile refused %s a QoS %d%s publish",
            principal.name if principal else "?",
            qos,
            " retained" if retain else "",
        )
        return False

    def max_qos(self, principal: Principal | None) -> int:
        return 2 if self._trust is None else self._trust.max_qos(principal)

    def allows(self, principal: Principal | None, topic: str, action: str) -> bool:
        if principal is None:
            return False
        if action == PUBLISH:
            ok = acl.may_publish(principal, topic, self._root)
            if ok and self._trust is not None:
                ok = self._trust.action_allowed(principal, topic, self._root)  # the device's security profile
        elif action == SUBSCRIBE:
            ok = acl.may_subscribe(principal, topic, self._root)
        else:
            ok = acl.may_receive(principal, topic, self._root)
        if not ok and action != RECEIVE:
            self._metrics.drops.labels(f"acl_{action}").inc()
            log.warning("ACL refused %s %s on %r", principal.name, action, topic)
        return ok
