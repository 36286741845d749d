"""LeaseService over gRPC: converts messages, calls the lease manager, converts back.

Domain errors pass through to the interceptor, which maps them to status codes in one place.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from google.protobuf import duration_pb2
from grpc import aio

from memory_service.api import times
from memory_service.api.interceptor import current_principal
from memory_service.errors import InvalidArgument
from memory_service.lease_hold import HoldCommand, HoldEvent, HoldEventKind
from memory_service.lease_validation import AcquireSpec
from memory_service.leases import Holder, Lease, LeaseManager
from memory_service.runtime import Runtime
from memory_service.v1 import lease_pb2, lease_pb2_grpc

_EVENT_KINDS = {
    HoldEventKind.GRANTED: lease_pb2.HoldEvent.KIND_GRANTED,
    HoldEventKind.RENEWED: lease_pb2.HoldEvent.KIND_RENEWED,
    HoldEventKind.WAITING: lease_pb2.HoldEvent.KIND_WAITING,
    HoldEventKind.LOST: lease_pb2.HoldEvent.KIND_LOST,
    HoldEventKind.RELEASED: lease_pb2.HoldEvent.KIND_RELEASED,
    HoldEventKind.NOT_ACQUIRED: lease_pb2.HoldEvent.KIND_NOT_ACQUIRED,
}


def _seconds(request: lease_pb2.AcquireRequest, name: str, field: str) -> float | None:
    """A Duration field of ``request`` in seconds; None when unset."""
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    duration: duration_pb2.Duration = getattr(request, name)
    seconds = times.duration(field, duration).total_seconds()
    if seconds < 0:
        raise InvalidArgument(field, f"is expected to be positive (got {seconds:g}s)")
    return seconds


def _spec(request: lease_pb2.AcquireRequest, prefix: str = "") -> AcquireSpec:
    return AcquireSpec(
        namespace=request.namespace,
        name=request.name,
        ttl=_seconds(request, "ttl", prefix + "ttl"),
        wait=_seconds(request, "wait", prefix + "wait") or 0.0,
        request_id=request.request_id,
        holder=request.holder,
    )


def _owner(holder: str) -> str:
    """Quotas are charged to the authenticated caller, or to the holder's description when auth is off."""
    principal = current_principal.get()
    return principal if principal is not None else "holder:" + (holder or "anonymous")


def _deadline(context: aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _lease(lease: Lease, *, show_id: bool = True) -> lease_pb2.Lease:
    message = lease_pb2.Lease(
        namespace=lease.namespace,
        name=lease.name,
        lease_id=str(lease.lease_id) if show_id else "",
        holder=lease.holder,
        fencing_token=lease.fencing_token,
    )
    message.acquired_at.FromDatetime(lease.acquired_at)
    message.renewed_at.FromDatetime(lease.renewed_at)
    message.expires_at.FromDatetime(lease.expires_at)
    message.ttl.FromTimedelta(lease.ttl)
    return message


def _holder(holder: Holder) -> lease_pb2.LeaseHolder:
    message = lease_pb2.LeaseHolder(holder=holder.holder, fencing_token=holder.fencing_token)
    message.expires_at.FromDatetime(holder.expires_at)
    return message


def _event(event: HoldEvent) -> lease_pb2.HoldEvent:
    message = lease_pb2.HoldEvent(kind=_EVENT_KINDS[event.kind], reason=event.reason)
    if event.lease is not None:
        message.lease.CopyFrom(_lease(event.lease))
    if event.holder is not None:
        message.current_holder.CopyFrom(_holder(event.holder))
    return message


async def _commands(requests: AsyncIterator[lease_pb2.HoldRequest]) -> AsyncIterator[HoldCommand]:
    async for request in requests:
        if request.WhichOneof("action") == "release" and request.release:
            yield HoldCommand.RELEASE
        else:
            raise InvalidArgument("action", "only the first message of a Hold stream may acquire; later ones release")


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def _leases(self) -> LeaseManager:
        return self._runtime.leases

    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> lease_pb2.AcquireResponse:
        result = await self._leases.acquire(_spec(request), owner=_owner(request.holder), deadline=_deadline(context))
        response = lease_pb2.AcquireResponse(acquired=result.acquired)
        if result.lease is not None:
            response.lease.CopyFrom(_lease(result.lease))
        if result.holder is not None:
            response.current_holder.CopyFrom(_holder(result.holder))
        return response

    async def Renew(self, request: lease_pb2.RenewRequest, context: aio.ServicerContext) -> lease_pb2.RenewResponse:
        ttl = None
        if request.HasField("ttl"):
            ttl = times.duration("ttl", request.ttl).total_seconds()
        lease = await self._leases.renew(request.lease_id, ttl, deadline=_deadline(context))
        return lease_pb2.RenewResponse(lease=_lease(lease))

    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> lease_pb2.ReleaseResponse:
        released = await self._leases.release(request.lease_id, deadline=_deadline(context))
        return lease_pb2.ReleaseResponse(released=released)

    async def Get(self, request: lease_pb2.GetLeaseRequest, context: aio.ServicerContext) -> lease_pb2.GetLeaseResponse:
        lease = await self._leases.get(request.namespace, request.name)
        show = LeaseManager.shows_lease_id(lease, current_principal.get())
        return lease_pb2.GetLeaseResponse(lease=_lease(lease, show_id=show))

    async def List(
        self, request: lease_pb2.ListLeasesRequest, context: aio.ServicerContext
    ) -> lease_pb2.ListLeasesResponse:
        leases, next_token = await self._leases.list_page(request.namespace, request.page_size, request.page_token)
        principal = current_principal.get()
        return lease_pb2.ListLeasesResponse(
            leases=[_lease(lease, show_id=LeaseManager.shows_lease_id(lease, principal)) for lease in leases],
            next_page_token=next_token,
        )

    async def Hold(
        self, request_iterator: AsyncIterator[lease_pb2.HoldRequest], context: aio.ServicerContext
    ) -> AsyncIterator[lease_pb2.HoldEvent]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("action") != "acquire":
            raise InvalidArgument("acquire", "the first message of a Hold stream must be an acquire")
        spec = _spec(first.acquire, "acquire.")
        events = self._leases.hold(spec, owner=_owner(spec.holder), commands=_commands(request_iterator))
        async for event in events:
            yield _event(event)
