"""``MemoryClient.hold``: a lease kept over the Hold stream for exactly the length of an ``async with`` block.

    async with client.hold("nightly-sync", ttl=30, wait=60) as lease:
        await client.bulk_store(rows, fence=lease.fence)   # refused with ABORTED once someone else holds it
        if lease.lost.is_set(): ...                          # or await lease.lost.wait() beside the work

The server renews the lease while the stream lives. ``lost`` is set when the lease can no longer be trusted: the
server said LOST (taken over, expired, its database unreachable past the TTL, shutting down) or the stream broke
(the server or the network went away: its lease lapses after the TTL, so the work must stop). A broken stream is
not resumed: the lease it held may already belong to someone else, and a new grant has a new fencing token.
Leaving the block releases the lease (a release message, and cancelling the stream if that cannot be sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import grpc
from grpc import aio

from memory_service.v1 import lease_pb2, lease_pb2_grpc, memory_pb2

_Kind = lease_pb2.HoldEvent


class NotAcquired(Exception):
    """The wait ended without a grant; ``current_holder`` is who holds the name (when the server said)."""

    def __init__(self, namespace: str, name: str, holder: lease_pb2.LeaseHolder, reason: str) -> None:
        who = f" (held by {holder.holder!r})" if holder.holder else ""
        super().__init__(f"lease {namespace}/{name} not acquired{who}" + (f": {reason}" if reason else ""))
        self.current_holder = holder
        self.reason = reason


class HeldLease:
    """An async context manager: entered once GRANTED, raises ``NotAcquired`` when the wait ends without a grant.

    ``lease`` is the current lease (updated on each renewal), ``fencing_token`` and ``fence`` name this grant for
    fenced writes, ``lost`` is set when the lease is lost and ``reason`` says why.
    """

    def __init__(self, stub: lease_pb2_grpc.LeaseServiceStub, request: lease_pb2.AcquireRequest, *, timeout: float):
        self._stub = stub
        self._request = request
        self._timeout = timeout
        self.lease = lease_pb2.Lease()
        self.lost = asyncio.Event()
        self.reason = ""
        self._call: aio.StreamStreamCall | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._leaving = False

    @property
    def fencing_token(self) -> int:
        return int(self.lease.fencing_token)

    @property
    def fence(self) -> memory_pb2.Fence:
        """This grant as the fence of a Store or BulkStore."""
        return memory_pb2.Fence(namespace=self.lease.namespace, name=self.lease.name, fencing_token=self.fencing_token)

    async def __aenter__(self) -> HeldLease:
        if self._call is not None:
            raise RuntimeError("a HeldLease is entered once; call hold() again for another grant")
        call = self._call = self._stub.Hold()
        try:
            async with asyncio.timeout(self._timeout + self._request.wait.ToNanoseconds() / 1e9):
                await call.write(lease_pb2.HoldRequest(acquire=self._request))
                while True:
                    event = await call.read()
                    if event is aio.EOF:
                        raise NotAcquired(self._request.namespace, self._request.name, lease_pb2.LeaseHolder(), "")
                    if event.kind == _Kind.KIND_GRANTED:
                        self.lease = event.lease
                        break
                    if event.kind in (_Kind.KIND_NOT_ACQUIRED, _Kind.KIND_LOST):
                        raise NotAcquired(
                            self._request.namespace, self._request.name, event.current_holder, event.reason
                        )
        except BaseException:
            call.cancel()
            raise
        self._watcher = asyncio.create_task(self._watch(call))
        return self

    async def _watch(self, call: aio.StreamStreamCall) -> None:
        released = False
        try:
            while (event := await call.read()) is not aio.EOF:
                if event.kind == _Kind.KIND_RENEWED:
                    self.lease = event.lease
                elif event.kind == _Kind.KIND_RELEASED:
                    released = True
                    return
                elif event.kind == _Kind.KIND_LOST:
                    self.reason = event.reason or "lost"
                    return
            self.reason = "the server ended the stream"
        except grpc.RpcError as error:
            self.reason = f"the stream broke ({error.code().name}: {error.details()})"
        finally:
            if not released and not self._leaving:
                self.reason = self.reason or "the stream ended"
                self.lost.set()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        call, watcher = self._call, self._watcher
        assert call is not None and watcher is not None
        self._leaving = True  # what the stream does from here on is our release, not a loss
        try:
            if not self.lost.is_set() and not call.done():
                # Best effort: if the release cannot be sent, cancelling the stream below releases it too.
                with contextlib.suppress(grpc.RpcError, TimeoutError, aio.UsageError, asyncio.InvalidStateError):
                    async with asyncio.timeout(self._timeout):
                        await call.write(lease_pb2.HoldRequest(release=True))
                        await asyncio.shield(watcher)
        finally:
            call.cancel()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
