"""The gRPC health status follows the database: NOT_SERVING while PostgreSQL cannot be reached, SERVING again
when it answers, so a load balancer takes the instance out and puts it back without a restart.

A database that answers but refuses writes (read-only, out of disk) leaves the status SERVING: reads still work,
and every instance shares the database, so NOT_SERVING would take reads away everywhere without sending a single
write somewhere that could take it. Such an episode shows instead in Stats (``writes_refused``), in the
``memory_db_writes_refused`` gauge and in one log line at each end; while it lasts the monitor probes with a small
write every interval, to learn when it is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Probe(Protocol):
    """Tells whether the database answers (``storage.probe.DatabaseProbe``, wired in by the server)."""

    last_error: str

    async def check(self) -> bool: ...

    async def check_writes(self) -> bool: ...

    async def close(self) -> None: ...


class Writes(Protocol):
    """The database's write-refusal episodes (``storage.database.Database``)."""

    @property
    def refusing(self) -> bool: ...

    async def writes_resumed(self) -> None: ...


class HealthMonitor:
    """Probes the database every ``interval`` seconds and sets every service's status from the answer."""

    def __init__(
        self,
        servicer: HealthServicer,
        probe: Probe,
        services: Iterable[str],
        interval: float,
        *,
        writes: Writes | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._servicer = servicer
        self._on_change = on_change
        self._probe = probe
        self._writes = writes
        self._services = tuple(services)
        self._interval = interval
        self.serving = True  # the server starts SERVING only after it reached the database

    async def set_all(self, serving: bool) -> None:
        self.serving = serving
        if self._on_change is not None:
            self._on_change(serving)
        for name in self._services:
            await self._servicer.set(name, SERVING if serving else NOT_SERVING)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                reachable = await self._probe.check()
                if reachable != self.serving:
                    if reachable:
                        log.info("PostgreSQL answers again: health SERVING")
                    else:
                        log.warning("PostgreSQL cannot be reached (%s): health NOT_SERVING", self._probe.last_error)
                    await self.set_all(reachable)
                writes = self._writes
                if reachable and writes is not None and writes.refusing and await self._probe.check_writes():
                    await writes.writes_resumed()
        finally:
            await self._probe.close()
