"""Lease messages <-> lease domain values: requests to ``AcquireSpec`` and Hold commands, leases and events back."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import duration_pb2

from memory_service.api import times
from memory_service.errors import InvalidArgument
from memory_service.leases.rules import AcquireSpec
from memory_service.leases.types import HoldCommand, Holder, HoldEvent, HoldEventKind, Lease
from memory_service.v1 import lease_pb2

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


def spec_from_proto(request: lease_pb2.AcquireRequest, prefix: str = "") -> AcquireSpec:
    return AcquireSpec(
        namespace=request.namespace,
        name=request.name,
        ttl=_seconds(request, "ttl", prefix + "ttl"),
        wait=_seconds(request, "wait", prefix + "wait") or 0.0,
        request_id=request.request_id,
        holder=request.holder,
    )


def lease_to_proto(lease: Lease, *, show_id: bool = True) -> lease_pb2.Lease:
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


def holder_to_proto(holder: Holder) -> lease_pb2.LeaseHolder:
    message = lease_pb2.LeaseHolder(holder=holder.holder, fencing_token=holder.fencing_token)
    message.expires_at.FromDatetime(holder.expires_at)
    return message


def event_to_proto(event: HoldEvent) -> lease_pb2.HoldEvent:
    message = lease_pb2.HoldEvent(kind=_EVENT_KINDS[event.kind], reason=event.reason)
    if event.lease is not None:
        message.lease.CopyFrom(lease_to_proto(event.lease))
    if event.holder is not None:
        message.current_holder.CopyFrom(holder_to_proto(event.holder))
    return message


async def commands_from_proto(requests: AsyncIterator[lease_pb2.HoldRequest]) -> AsyncIterator[HoldCommand]:
    async for request in requests:
        action = request.WhichOneof("action")
        if action == "release" and request.release:
            yield HoldCommand.RELEASE
        elif action == "acquire":
            raise InvalidArgument("acquire", "only the first message of a Hold stream may acquire; later ones release")
        else:
            raise InvalidArgument("release", "must be true: a later message of a Hold stream releases the lease")
