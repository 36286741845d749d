"""LeaseService over gRPC: converts messages, calls the lease manager, converts back.

Domain errors pass through to the interceptor, which maps them to status codes in one place.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from grpc import aio

from memory_service.api import lease_convert as convert
from memory_service.api import times
from memory_service.api.interceptor import current_principal
from memory_service.errors import InvalidArgument
from memory_service.leases.hold import hold
from memory_service.leases.manager import LeaseManager
from memory_service.leases.rules import owner_for, shows_lease_id
from memory_service.v1 import lease_pb2, lease_pb2_grpc


def _owner(holder: str) -> str:
    return owner_for(current_principal.get(), holder)


def _deadline(context: aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: LeaseManager) -> None:
        self._leases = leases

    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> lease_pb2.AcquireResponse:
        result = await self._leases.acquire(
            convert.spec_from_proto(request), owner=_owner(request.holder), deadline=_deadline(context)
        )
        response = lease_pb2.AcquireResponse(acquired=result.acquired)
        if result.lease is not None:
            response.lease.CopyFrom(convert.lease_to_proto(result.lease))
        if result.holder is not None:
            response.current_holder.CopyFrom(convert.holder_to_proto(result.holder))
        return response

    async def Renew(self, request: lease_pb2.RenewRequest, context: aio.ServicerContext) -> lease_pb2.RenewResponse:
        ttl = None
        if request.HasField("ttl"):
            ttl = times.duration("ttl", request.ttl).total_seconds()
        lease = await self._leases.renew(request.lease_id, ttl, deadline=_deadline(context))
        return lease_pb2.RenewResponse(lease=convert.lease_to_proto(lease))

    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> lease_pb2.ReleaseResponse:
        released = await self._leases.release(request.lease_id, deadline=_deadline(context))
        return lease_pb2.ReleaseResponse(released=released)

    async def Get(self, request: lease_pb2.GetLeaseRequest, context: aio.ServicerContext) -> lease_pb2.GetLeaseResponse:
        lease = await self._leases.get(request.namespace, request.name)
        show = shows_lease_id(lease, current_principal.get())
        return lease_pb2.GetLeaseResponse(lease=convert.lease_to_proto(lease, show_id=show))

    async def List(
        self, request: lease_pb2.ListLeasesRequest, context: aio.ServicerContext
    ) -> lease_pb2.ListLeasesResponse:
        leases, next_token = await self._leases.list_page(request.namespace, request.page_size, request.page_token)
        principal = current_principal.get()
        return lease_pb2.ListLeasesResponse(
            leases=[convert.lease_to_proto(lease, show_id=shows_lease_id(lease, principal)) for lease in leases],
            next_page_token=next_token,
        )

    async def Hold(
        self, request_iterator: AsyncIterator[lease_pb2.HoldRequest], context: aio.ServicerContext
    ) -> AsyncIterator[lease_pb2.HoldEvent]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("action") != "acquire":
            raise InvalidArgument("acquire", "the first message of a Hold stream must be an acquire")
        spec = convert.spec_from_proto(first.acquire, "acquire.")
        events = hold(
            self._leases, spec, owner=_owner(spec.holder), commands=convert.commands_from_proto(request_iterator)
        )
        try:
            async for event in events:
                yield convert.event_to_proto(event)
        except InvalidArgument as error:
            # The lease rules name AcquireRequest's fields; in a Hold stream they sit under ``acquire``.
            if error.field.partition(".")[0].partition("[")[0] in _ACQUIRE_FIELDS:
                raise InvalidArgument(f"acquire.{error.field}", error.message) from None
            raise


_ACQUIRE_FIELDS = frozenset(lease_pb2.AcquireRequest.DESCRIPTOR.fields_by_name)
