"""The in-memory cache of MQTT accounts, reloaded whenever the registry changes (API or CLI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.models import Device
from gateway.store.reader import Reader
from gateway.store.registry import Account, load_accounts, registry_version

__all__ = ["Accounts"]

log = logging.getLogger(__name__)


class Accounts:
    def __init__(self, reader: Reader, poll_s: float = 1.0) -> None:
        self._reader = reader
        self._poll_s = poll_s
        self.version = -1
        self.accounts: dict[str, Account] = {}
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self._refreshing: asyncio.Future[None] | None = None

    def get(self, username: str) -> Account | None:
        return self.accounts.get(username)

    def device(self, device_id: str) -> Device | None:
        account = self.accounts.get(device_id)
        if account is None:
            return None
        return account.principal.device

    def on_change(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    async def reload(self) -> None:
        self.version, self.accounts = await self._reader.call(load_accounts)
        for listener in self._listeners:
            await listener()

    async def refresh(self) -> None:
        """Reload now if the registry changed (called after in-process writes, so they apply at once)."""
        if await self._reader.call(registry_version) != self.version:
            await self.reload()

    async def refresh_shared(self) -> None:
        """`refresh`, with callers that arrive while one is running waiting for it instead of starting another
        (a connect storm of unknown names costs one registry-version query at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh())
        try:
            await asyncio.shield(self._refreshing)
        except Exception:
            log.exception("registry reload failed; keeping the previous accounts")

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._watch(), name="bosun-accounts")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("registry reload failed; keeping the previous accounts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
