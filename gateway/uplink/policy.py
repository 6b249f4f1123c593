"""Pure uplink decisions: retry delays, Retry-After, the sending window, the bandwidth pacer, the offline runway."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

__all__ = ["Pacer", "backoff", "in_window", "retry_after", "runway_s"]

BACKOFF_BASE_S = 0.5


def backoff(attempt: int, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (a uniform draw in [0, min(cap, base * 2**attempt)]): gateways that
    lost the same link do not come back in lockstep. `attempt` counts failures in a row, from 1."""
    ceiling = min(cap_s, BACKOFF_BASE_S * 2 ** min(max(attempt, 1), 32))
    return (rng or random).uniform(0, ceiling)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 section 10.2.3: delay-seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def in_window(window: str, hour: int, minute: int) -> bool:
    """Whether local time hour:minute is inside "HH:MM-HH:MM" (may wrap midnight); an empty window is always."""
    if not window:
        return True
    start, _, end = window.partition("-")
    a = int(start[:2]) * 60 + int(start[3:])
    b = int(end[:2]) * 60 + int(end[3:])
    t = hour * 60 + minute
    if a == b:
        return True
    return a <= t < b if a < b else t >= a or t < b


@dataclass
class Pacer:
    """Bandwidth cap: after sending n bytes at `rate` bytes/s, the next send waits until the link has had time
    for them (a batch is never split, so a cap smaller than one batch still sends, just less often)."""

    rate: int
    _free_at: float = 0.0

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to wait before sending `nbytes` now; records the send."""
        if self.rate <= 0:
            return 0.0
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        return start - now


def runway_s(budget: int, used: int, reclaimable: int, inflow_bytes_per_s: float) -> float | None:
    """Seconds until telemetry not yet at HQ would start being evicted: the free budget (plus what retention
    may delete first: synced measurements) over the rate the database grows; None when it is not growing."""
    if inflow_bytes_per_s <= 0:
        return None
    return max(0.0, (budget - used + reclaimable) / inflow_bytes_per_s)
