"""Background loops each instance runs: a jittered period, and a failure never ends the loop."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from memory_service.errors import WRITES_REFUSED, MemoryServiceError
from memory_service.metrics import Metrics

log = logging.getLogger(__name__)


async def every(
    interval: float, name: str, work: Callable[[], Awaitable[object]], metrics: Metrics | None = None
) -> None:
    """Run ``work`` forever with jittered pauses; a failure is logged and retried next round, never fatal.

    ``name`` (one of ``metrics.BACKGROUND_TASKS``) labels the rounds in ``memory_background_runs_total`` and the
    time of the last good one in ``memory_background_last_success_timestamp_seconds``."""
    label = name.replace("_", " ")
    while True:
        await asyncio.sleep(interval * (0.8 + 0.4 * random.random()))
        outcome = "error"
        try:
            await work()
            outcome = "ok"
        except WRITES_REFUSED as exc:
            log.debug("%s skipped: %s", name, exc)  # the episode is logged once, where it began
        except MemoryServiceError as exc:
            log.warning("%s failed: %s", label, exc)
        except Exception:
            log.exception("%s failed unexpectedly", label)
        if metrics is not None:
            metrics.background_runs.labels(name, outcome).inc()
            if outcome == "ok":
                metrics.background_success.labels(name).set(time.time())
