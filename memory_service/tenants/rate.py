"""Calls per second per token (``--rate``), on this instance: a token bucket per token name.

A limit per instance needs no coordination and costs no round trip; behind a load balancer spreading a token's calls
over N instances, its calls may reach N times the rate (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from memory_service.errors import QuotaExceeded


class RateLimiter:
    """Each token may burst up to one second's worth of calls (at least one), then ``rate`` calls per second."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """Token name -> (tokens left, when last refilled)."""

    def take(self, name: str, rate: float) -> None:
        """Spend one call of ``name``'s budget; QuotaExceeded when there is none left."""
        now = self._clock()
        capacity = max(rate, 1.0)
        left, at = self._buckets.get(name, (capacity, now))
        left = min(capacity, left + (now - at) * rate)
        if left < 1.0:
            self._buckets[name] = (left, now)
            raise QuotaExceeded(subject=f"token:{name}", quota="rate", description=f"at most {rate:g} calls per second")
        self._buckets[name] = (left - 1.0, now)
