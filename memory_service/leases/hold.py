"""The Hold stream: acquire, renew at about TTL/3, and end with RELEASED or LOST.

A Hold is a state machine over the lease manager's own operations (acquire steps, renew, release), with its own
timing: when to renew, when to retry, when to tell the holder it lost the lease, and what to do when the client
cancels or the server begins shutting down. It lives apart from ``manager.py`` so that timing reads in one place;
it uses the manager and the manager does not know it. Like the manager, it knows no gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from memory_service.errors import DeadlineExceeded, LeaseLost, Unavailable
from memory_service.leases.manager import LeaseManager
from memory_service.leases.rules import AcquireSpec
from memory_service.leases.types import Acquired, HoldCommand, HoldEvent, HoldEventKind, Lease


async def hold(
    manager: LeaseManager, spec: AcquireSpec, *, owner: str, commands: AsyncIterator[HoldCommand]
) -> AsyncGenerator[HoldEvent, None]:
    """Acquire, then keep renewing at about TTL/3 until released, lost, or the caller goes away."""
    spec = spec.validated(manager.settings)
    assert spec.ttl is not None
    release_requested = asyncio.Event()
    failures: list[Exception] = []
    reader = asyncio.create_task(_read_commands(commands, release_requested, failures))
    lease_id = uuid.uuid4()
    pending = True  # a grant may exist that this stream has not ended yet
    try:
        steps = manager.acquire_steps(spec, owner=owner, lease_id=lease_id, deadline=None)
        seen_token = None
        async with contextlib.aclosing(steps):
            async for step in steps:
                if step.final or release_requested.is_set() or manager.stopping.is_set():
                    break
                assert step.holder is not None
                if step.holder.fencing_token != seen_token:
                    seen_token = step.holder.fencing_token
                    yield HoldEvent(kind=HoldEventKind.WAITING, holder=step.holder)
        if not step.acquired or step.lease is None:
            pending = False
            reason = _not_acquired(step, cancelled=release_requested.is_set(), stopping=manager.stopping.is_set())
            yield HoldEvent(kind=HoldEventKind.NOT_ACQUIRED, holder=step.holder, reason=_refused(failures) or reason)
            if failures:
                raise failures[0]
            return
        lease_id = step.lease.lease_id  # a replayed request id may name an earlier grant
        manager.track_hold(step.lease)
        yield HoldEvent(kind=HoldEventKind.GRANTED, lease=step.lease)
        async for event in _keep(manager, step.lease, step.started, release_requested):
            # After LOST the grant may still be live (the database was unreachable): release it when possible.
            pending = event.kind is not HoldEventKind.RELEASED
            refused = event.kind is HoldEventKind.RELEASED and failures
            yield dataclasses.replace(event, reason=_refused(failures)) if refused else event
        if failures:
            raise failures[0]
    finally:
        reader.cancel()
        manager.untrack_hold(lease_id)
        if pending:
            manager.add_orphan(lease_id, spec.ttl)


async def _keep(
    manager: LeaseManager, lease: Lease, last_ok: float, release_requested: asyncio.Event
) -> AsyncGenerator[HoldEvent, None]:
    ttl = lease.ttl.total_seconds()
    retry = min(ttl / 10, 1.0)
    next_at = last_ok + ttl / 3
    while True:
        await _first_of(release_requested, manager.stopping, timeout=max(next_at - time.monotonic(), 0))
        if release_requested.is_set():
            yield await _release_for_hold(manager, lease)
            return
        if manager.stopping.is_set():
            released = await _release_for_hold(manager, lease)
            reason = "the server is shutting down; the lease was released: acquire again through another instance"
            yield HoldEvent(kind=HoldEventKind.LOST, lease=released.lease, reason=reason)
            return
        # Give up a little before the TTL the database counts, so the holder stops before a successor starts.
        give_up_at = last_ok + ttl - retry
        started = time.monotonic()
        try:
            lease = await manager.renew(str(lease.lease_id), deadline=give_up_at)
        except LeaseLost as exc:
            yield HoldEvent(kind=HoldEventKind.LOST, lease=lease, reason=str(exc))
            return
        except (Unavailable, DeadlineExceeded) as exc:
            if time.monotonic() + retry >= give_up_at:
                reason = f"the lease could not be renewed before its TTL ran out ({exc}); stop and acquire again"
                yield HoldEvent(kind=HoldEventKind.LOST, lease=lease, reason=reason)
                return
            next_at = time.monotonic() + retry
            continue
        last_ok = started
        next_at = last_ok + ttl / 3
        yield HoldEvent(kind=HoldEventKind.RENEWED, lease=lease)


async def _release_for_hold(manager: LeaseManager, lease: Lease) -> HoldEvent:
    try:
        released = await manager.release(str(lease.lease_id))
    except (Unavailable, DeadlineExceeded):
        manager.add_orphan(lease.lease_id, lease.ttl.total_seconds())
        reason = "the database did not answer; the lease is released in the background or ends at its TTL"
        return HoldEvent(kind=HoldEventKind.RELEASED, lease=lease, reason=reason)
    reason = "" if released else "the lease had already ended"
    return HoldEvent(kind=HoldEventKind.RELEASED, lease=lease, reason=reason)


async def _read_commands(
    commands: AsyncIterator[HoldCommand], release_requested: asyncio.Event, failures: list[Exception]
) -> None:
    """A release ends the hold; the client half-closing its side does not (the stream ending does)."""
    try:
        async for command in commands:
            if command is HoldCommand.RELEASE:
                break
        else:
            return
    except Exception as exc:
        failures.append(exc)
    release_requested.set()


async def _first_of(first: asyncio.Event, second: asyncio.Event, *, timeout: float) -> None:
    """Wait until either event is set or ``timeout`` passes."""
    waiters = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _refused(failures: list[Exception]) -> str:
    """Why a stream's lease ended when the client sent a message the stream cannot take ("" when it did not): the
    lease is not left held for a stream that is about to end with an error."""
    if not failures:
        return ""
    return f"released because the stream sent a message it cannot take ({failures[0]}); the call ends with that error"


def _not_acquired(step: Acquired, *, cancelled: bool, stopping: bool) -> str:
    if stopping:
        return "the server is shutting down: acquire through another instance"
    if cancelled or step.holder is None:
        return "the client asked to release before the lease was granted"
    return f"held by {step.holder.holder!r} (token {step.holder.fencing_token}) when the wait ended"
