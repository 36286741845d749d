"""History, Erase and Watch messages to domain values and back."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from memory_service.api import convert, times
from memory_service.history.feed import encode_cursor
from memory_service.history.types import Change, ChangeKind, EraseReceipt, Version
from memory_service.memories import validation
from memory_service.models import ScopeRef, WriteContext
from memory_service.v1 import memory_pb2

_KINDS = {
    ChangeKind.CREATED: memory_pb2.CHANGE_KIND_CREATED,
    ChangeKind.UPDATED: memory_pb2.CHANGE_KIND_UPDATED,
    ChangeKind.DELETED: memory_pb2.CHANGE_KIND_DELETED,
    ChangeKind.EXPIRED: memory_pb2.CHANGE_KIND_EXPIRED,
    ChangeKind.ERASED: memory_pb2.CHANGE_KIND_ERASED,
}

MAX_REQUEST_ID_LENGTH = 200


def write_context(principal: str | None, metadata: tuple[tuple[str, str | bytes], ...] | None) -> WriteContext:
    """Who is writing: the authenticated principal and the ``x-request-id`` metadata (trimmed to a sane length)."""
    request_id = None
    for key, value in metadata or ():
        if key == "x-request-id":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            request_id = text[:MAX_REQUEST_ID_LENGTH] or None
    return WriteContext(principal=principal, request_id=request_id)


def as_of(message: timestamp_pb2.Timestamp, field: str = "as_of") -> datetime:
    return times.timestamp(field, message)


def scope_from_proto(message: memory_pb2.ScopeRef, field: str = "scope") -> ScopeRef:
    return convert.scope_ref_from_proto(message, field)


def erase_target(
    request: memory_pb2.EraseRequest,
) -> tuple[ScopeRef | None, int | None, memory_pb2.MemoryFilter | None]:
    scope = scope_from_proto(request.scope) if request.HasField("scope") else None
    target = request.WhichOneof("target")
    if target == "id":
        return scope, validation.check_id("id", request.id), None
    if target == "filter":
        return scope, None, request.filter
    return scope, None, None


def version_to_proto(version: Version) -> memory_pb2.MemoryVersion:
    message = memory_pb2.MemoryVersion(
        memory_id=version.memory.id,
        version=version.version,
        kind=_KINDS[version.kind],
        memory=convert.memory_to_proto(version.memory),
        principal=version.context.principal or "",
        request_id=version.context.request_id or "",
    )
    message.changed_at.CopyFrom(convert.memory_to_proto(version.memory).updated_at)
    if version.context.fencing_token is not None:
        message.fencing_token = version.context.fencing_token
    return message


def receipt_to_proto(receipt: EraseReceipt) -> memory_pb2.EraseResponse:
    message = memory_pb2.EraseResponse(
        memory_ids=list(receipt.memory_ids),
        memories=len(receipt.memory_ids),
        versions=receipt.versions,
        cached_embeddings=receipt.cached_embeddings,
    )
    message.erased_at.FromDatetime(receipt.erased_at)
    return message


def change_to_proto(change: Change) -> memory_pb2.Change:
    message = memory_pb2.Change(
        memory_id=change.memory_id,
        scope=convert.scope_to_proto(change.scope),
        scope_id=change.scope_id,
        kind=_KINDS[change.kind],
        version=change.version,
        cursor=encode_cursor(change.seq),
    )
    message.changed_at.FromDatetime(change.changed_at)
    if change.memory is not None:
        message.memory.CopyFrom(convert.memory_to_proto(change.memory))
    return message
