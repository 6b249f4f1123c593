"""Failed sign-ins are limited per user name and per client address (sliding window, in memory).

In memory on purpose: a restart clears it, which is harmless (argon2 already makes each guess slow) and
keeps a lock-out from outliving a reboot of the appliance.
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["LoginLimiter"]


class LoginLimiter:
    def __init__(self, per_user: int = 5, per_address: int = 20, window_s: float = 300.0) -> None:
        self._limits = {"user": per_user, "address": per_address}
        self._window = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self._window:
            times.popleft()
        return times

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until another attempt is allowed for this user and address (0: allowed now)."""
        now = time.monotonic()
        wait = 0.0
        for kind, value in (("user", username.lower()), ("address", address)):
            times = self._recent((kind, value), now)
            if len(times) >= self._limits[kind]:
                wait = max(wait, times[0] + self._window - now)
        if len(self._failures) > 10_000:  # forget idle keys so a scan of names cannot grow memory
            self._failures = {k: v for k, v in self._failures.items() if v}
        return int(wait) + 1 if wait else 0

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        for key in (("user", username.lower()), ("address", address)):
            self._recent(key, now).append(now)

    def succeeded(self, username: str) -> None:
        self._failures.pop(("user", username.lower()), None)
