"""Background loops each instance runs: a jittered period, and a failure never ends the loop."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from memory_service.errors import WRITES_REFUSED, MemoryServiceError

log = logging.getLogger(__name__)


async def every(interval: float, name: str, work: Callable[[], Awaitable[object]]) -> None:
    """Run ``work`` forever with jittered pauses; a failure is logged and retried next round, never fatal."""
    while True:
        await asyncio.sleep(interval * (0.8 + 0.4 * random.random()))
        try:
            await work()
        except WRITES_REFUSED as exc:
            log.debug("%s skipped: %s", name, exc)  # the episode is logged once, where it began
        except MemoryServiceError as exc:
            log.warning("%s failed: %s", name, exc)
        except Exception:
            log.exception("%s failed unexpectedly", name)
