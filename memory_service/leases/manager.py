"""Lease rules: waiting, idempotent grants, renew, release, reads, and clean-up of grants nobody received.

Who holds a name is decided only inside one database transaction, by the database clock
(``memory_service.storage.leases_sql``). This module decides the rest: how long to wait and poll, and which grants
to release because the caller that asked for them is gone (cancelled, timed out, or its answer was lost to an
ambiguous commit). It knows no gRPC. What callers may send is checked in ``leases.rules``; when a Hold stream
renews and when its holder is told it lost the lease is decided in ``leases.hold``.

Fail closed: any database error or timeout is ``Unavailable`` and never a grant; a grant whose answer may not have
reached its caller is released in the background unless the caller gave a ``request_id`` to retry with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from memory_service.config.settings import Settings
from memory_service.errors import (
    WRITES_REFUSED,
    DatabaseUnavailable,
    DeadlineExceeded,
    InvalidArgument,
    LeaseLost,
    MemoryServiceError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from memory_service.leases.rules import (
    AcquireSpec,
    check_name,
    check_ttl,
    decode_page_token,
    encode_page_token,
    parse_lease_id,
)
from memory_service.leases.types import Acquired, Lease
from memory_service.metrics import Metrics
from memory_service.storage import leases_sql as sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_PAGE_SIZE = 100
OP_TIMEOUT = 5.0
"""Seconds one lease transaction may take (including waiting for its lock) before the call answers UNAVAILABLE."""
RETENTION = timedelta(days=1)
"""How long ended leases and answered request ids are kept for fenced writes and late retries."""
_POLL_MIN, _POLL_MAX = 0.01, 0.25
_DEADLINE_MARGIN = 0.1
_GAUGE_INTERVAL, _PURGE_INTERVAL = 10.0, 600.0
_MAX_ORPHANS = 100_000


def lock_key(namespace: str, name: str) -> int:
    """The advisory lock key of a name: a keyed blake2b, identical in every process and release."""
    digest = hashlib.blake2b(f"{namespace}\0{name}".encode(), digest_size=8, person=b"memsvc-lease").digest()
    return int.from_bytes(digest, "big", signed=True)


def owner_key(owner: str) -> int:
    """The advisory lock key that serialises one owner's grants so its quota count is exact."""
    digest = hashlib.blake2b(owner.encode(), digest_size=8, person=b"memsvc-owner").digest()
    return int.from_bytes(digest, "big", signed=True)


def _ambiguous(exc: BaseException) -> bool:
    """Whether a grant may have committed although its caller did not get the answer."""
    if isinstance(exc, WRITES_REFUSED):
        return False  # refused before anything was written
    return not isinstance(exc, MemoryServiceError) or isinstance(exc, Unavailable | DeadlineExceeded)


class LeaseManager:
    """The lease domain of one instance, plus the background work that keeps it tidy."""

    def __init__(self, db: Database, settings: Settings, metrics: Metrics) -> None:
        self._db = db
        self._settings = settings
        self._metrics = metrics
        self._orphans: dict[uuid.UUID, float] = {}
        """Grants to release because nobody may know of them, with the monotonic time they expire anyway."""
        self._orphan_added = asyncio.Event()
        self._holds: dict[uuid.UUID, Lease] = {}
        self._freed: dict[tuple[str, str], tuple[asyncio.Event, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._maintain()), asyncio.create_task(self._release_orphans())]

    async def close(self, timeout: float = 5.0) -> None:
        """Release the leases of this instance's Hold streams and pending orphans, within ``timeout``."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for lease_id in list(self._holds):
            self._orphans.setdefault(lease_id, float("inf"))
        self._holds.clear()
        with contextlib.suppress(TimeoutError, MemoryServiceError):
            async with asyncio.timeout(timeout):
                for lease_id in list(self._orphans):
                    await self._release_id(lease_id)
                    self._orphans.pop(lease_id, None)
        if self._orphans:
            log.warning("%d lease(s) left to expire at their TTL: the database did not answer", len(self._orphans))

    def begin_shutdown(self) -> None:
        """End every Hold stream of this instance now: release its lease and send LOST.

        Hold streams never end by themselves, so a server that calls this before draining calls does not wait out
        its grace period for them; their clients re-acquire through another instance.
        """
        self._stopping.set()

    async def _run(self, op: Callable[[Connection], Awaitable[T]], deadline: float | None = None) -> T:
        """One lease transaction on a pooled connection, bounded by OP_TIMEOUT and the caller's deadline."""
        budget = OP_TIMEOUT if deadline is None else min(OP_TIMEOUT, deadline - time.monotonic())
        if budget <= 0:
            raise DeadlineExceeded("the call's deadline passed before the lease transaction could start")
        try:
            # One timer bounds the whole operation, waiting for a connection included.
            async with asyncio.timeout(budget):
                return await self._db.run(op)
        except TimeoutError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the call's deadline passed during the lease transaction") from exc
            raise DatabaseUnavailable(f"the lease transaction did not finish within {budget:.1f}s") from exc

    # --- acquire ------------------------------------------------------------------------------------------------

    async def acquire(self, spec: AcquireSpec, *, owner: str, deadline: float | None = None) -> Acquired:
        """Grant the lease, or wait up to ``spec.wait`` for it; contention answers ``acquired=False``."""
        spec = spec.validated(self._settings)
        steps = self.acquire_steps(spec, owner=owner, lease_id=uuid.uuid4(), deadline=deadline)
        async with contextlib.aclosing(steps):
            async for step in steps:
                if step.final:
                    return step
        raise AssertionError("the acquire loop ended without an answer")

    async def acquire_steps(
        self, spec: AcquireSpec, *, owner: str, lease_id: uuid.UUID, deadline: float | None
    ) -> AsyncGenerator[Acquired, None]:
        """Yield a non-final step each time the name is found held, then the final answer."""
        guard.check_namespace(spec.namespace, "namespace")
        wait_until = time.monotonic() + spec.wait
        if deadline is not None:
            # Stop waiting a little before the caller's deadline, so it hears "not acquired" rather than a timeout.
            wait_until = min(wait_until, deadline - _DEADLINE_MARGIN)
        delay = _POLL_MIN
        while True:
            started = time.monotonic()
            result = await self._grant_once(spec, owner=owner, lease_id=lease_id, deadline=deadline)
            if result.outcome in (sql.Outcome.GRANTED, sql.Outcome.REPLAYED):
                yield Acquired(acquired=True, lease=result.lease, started=started)
                return
            if result.outcome is sql.Outcome.REPLAY_ENDED:
                raise LeaseLost(
                    f"request_id {spec.request_id!r} was granted earlier, but that grant has ended; "
                    "acquire again with a new request id"
                )
            if result.outcome is sql.Outcome.OVER_QUOTA:
                raise ResourceExhausted(
                    f"lease quota reached: this caller holds {result.live_count} leases "
                    f"(limit {self._settings.lease_quota}); release some first"
                )
            assert result.holder is not None
            left = wait_until - time.monotonic()
            if left <= 0:
                yield Acquired(acquired=False, holder=result.holder)
                return
            yield Acquired(acquired=False, holder=result.holder, final=False)
            # Jittered backoff, but wake as soon as the holder's TTL ends or this instance sees a release.
            pause = min(delay * random.uniform(0.5, 1.0), left, max(result.holder.remaining, 0.0) + 0.005)
            await self._sleep_until_freed((spec.namespace, spec.name), pause)
            delay = min(delay * 2, _POLL_MAX)

    async def _grant_once(
        self, spec: AcquireSpec, *, owner: str, lease_id: uuid.UUID, deadline: float | None
    ) -> sql.AcquireResult:
        assert spec.ttl is not None
        ttl = timedelta(seconds=spec.ttl)
        try:
            result = await self._run(
                lambda conn: sql.acquire(
                    conn,
                    namespace=spec.namespace,
                    name=spec.name,
                    lock_key=lock_key(spec.namespace, spec.name),
                    owner_key=owner_key(owner),
                    lease_id=lease_id,
                    holder=spec.holder,
                    owner=owner,
                    ttl=ttl,
                    quota=self._settings.lease_quota,
                    request_id=spec.request_id or None,
                ),
                deadline,
            )
        except BaseException as exc:
            # Cancelled or failed mid-commit: the grant may exist with nobody knowing it. Without a request id
            # to retry with, nobody ever will, so release it (a no-op if it never committed).
            if not spec.request_id and _ambiguous(exc):
                self.add_orphan(lease_id, spec.ttl)
            raise
        if result.outcome is sql.Outcome.GRANTED:
            self._metrics.leases_granted.inc()
            if deadline is not None and time.monotonic() >= deadline and not spec.request_id:
                self.add_orphan(lease_id, spec.ttl)
                raise DeadlineExceeded("the lease was granted after the call's deadline and has been released")
        return result

    async def _sleep_until_freed(self, key: tuple[str, str], pause: float) -> None:
        event, waiters = self._freed.get(key, (asyncio.Event(), 0))
        self._freed[key] = (event, waiters + 1)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await event.wait()
        finally:
            current = self._freed.get(key)
            if current is not None and current[0] is event:
                if current[1] <= 1:
                    del self._freed[key]
                else:
                    self._freed[key] = (event, current[1] - 1)

    def _wake(self, key: tuple[str, str]) -> None:
        entry = self._freed.pop(key, None)
        if entry is not None:
            entry[0].set()

    # --- renew, release, read -------------------------------------------------------------------------------------

    async def renew(self, lease_id: str, ttl: float | None = None, *, deadline: float | None = None) -> Lease:
        """Extend a live lease; a lease that has ended is never revived (LeaseLost)."""
        lid = parse_lease_id(lease_id)
        new_ttl = None if ttl is None else timedelta(seconds=check_ttl(self._settings, ttl))
        if not await self._granted(lid, deadline):
            result: Lease | str = "it passed to a newer holder (or never existed)"  # as for an unknown id
        else:
            result = await self._run(lambda conn: sql.renew(conn, lid, new_ttl), deadline)
        if isinstance(result, str):
            raise LeaseLost(
                f"lease {lease_id} cannot be renewed: {result}; stop work that relies on it and acquire again"
            )
        return result

    async def release(self, lease_id: str, *, deadline: float | None = None) -> bool:
        """End the named grant if it is live; False (not an error) when it had already ended."""
        lid = parse_lease_id(lease_id)
        if not await self._granted(lid, deadline):
            return False  # as for an unknown id
        freed = await self._run(lambda conn: sql.release(conn, lid), deadline)
        self._holds.pop(lid, None)
        if freed is not None:
            self._wake(freed)
        return freed is not None

    async def _granted(self, lease_id: uuid.UUID, deadline: float | None) -> bool:
        """Whether the call may renew or release this grant: a token granted some namespaces only touches leases in
        them; one outside them is answered as an unknown id, so its existence is not revealed."""
        if guard.every_namespace():
            return True
        namespace = await self._run(lambda conn: sql.namespace_of(conn, lease_id), deadline)
        return namespace is None or guard.allows_namespace(namespace)

    async def _release_id(self, lease_id: uuid.UUID) -> tuple[str, str] | None:
        return await self._run(lambda conn: sql.release(conn, lease_id))

    async def get(self, namespace: str, name: str) -> Lease:
        check_name("namespace", namespace)
        check_name("name", name)
        guard.check_namespace(namespace, "namespace")
        lease = await self._run(lambda conn: sql.get(conn, namespace, name))
        if lease is None:
            raise NotFound(f"no live lease on {namespace}/{name}")
        return lease

    async def list_page(self, namespace: str, page_size: int, page_token: str) -> tuple[list[Lease], str]:
        """One page of live leases in (namespace, name) order and the token of the next page ("" at the end)."""
        if namespace:
            check_name("namespace", namespace)
        guard.check_namespace(namespace or "*", "namespace")  # every namespace: only a token granted them all
        if page_size < 0:
            raise InvalidArgument("page_size", f"is expected to be positive (got {page_size})")
        limit = min(page_size or DEFAULT_PAGE_SIZE, self._settings.list_max_page_size)
        after = decode_page_token(page_token, listed=namespace)
        leases = await self._run(
            lambda conn: sql.list_live(conn, namespace=namespace or None, after=after, limit=limit + 1)
        )
        if len(leases) <= limit:
            return leases, ""
        last = leases[limit - 1]
        return leases[:limit], encode_page_token(last.namespace, last.name, listed=namespace)

    # --- what Hold streams (leases.hold) use -------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def stopping(self) -> asyncio.Event:
        """Set by ``begin_shutdown`` and ``close``: Hold streams release their leases and end with LOST."""
        return self._stopping

    def track_hold(self, lease: Lease) -> None:
        """Count a Hold stream's lease as this instance's, so ``close`` releases it."""
        self._holds[lease.lease_id] = lease

    def untrack_hold(self, lease_id: uuid.UUID) -> None:
        self._holds.pop(lease_id, None)

    # --- background work ------------------------------------------------------------------------------------------

    def add_orphan(self, lease_id: uuid.UUID, ttl: float) -> None:
        """Release this grant in the background: nobody may know of it. ``ttl`` bounds how long that is worth trying."""
        if len(self._orphans) >= _MAX_ORPHANS:
            return  # it still ends at its TTL
        self._orphans.setdefault(lease_id, time.monotonic() + ttl)
        self._orphan_added.set()

    async def _release_orphans(self) -> None:
        """Release grants nobody received, retrying while the database is away until they expire anyway."""
        delay = 0.1
        while True:
            await self._orphan_added.wait()
            self._orphan_added.clear()
            while self._orphans:
                for lease_id, expires in list(self._orphans.items()):
                    if time.monotonic() >= expires:
                        self._orphans.pop(lease_id, None)
                        continue
                    try:
                        freed = await self._release_id(lease_id)
                    except MemoryServiceError:
                        break
                    self._orphans.pop(lease_id, None)
                    if freed is not None:
                        log.info("released lease %s on %s/%s: its caller never received it", lease_id, *freed)
                        self._wake(freed)
                else:
                    delay = 0.1
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _maintain(self) -> None:
        """Keep the leases-held gauge current and purge rows that ended long ago."""
        last_purge = float("-inf")
        while True:
            try:
                self._metrics.leases_held.set(await self._run(sql.count_live))
                if time.monotonic() - last_purge >= _PURGE_INTERVAL:
                    leases, requests = await self._run(lambda conn: sql.purge(conn, RETENTION))
                    last_purge = time.monotonic()
                    if leases or requests:
                        log.info("purged %d ended lease(s) and %d answered request id(s)", leases, requests)
            except MemoryServiceError as exc:
                log.debug("lease maintenance skipped: %s", exc)
            await asyncio.sleep(_GAUGE_INTERVAL)
