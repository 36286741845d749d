"""Every field an INVALID_ARGUMENT names is a real path of the request message that was sent.

Bad input is driven through every RPC of both services, generated from the request descriptors: starting from a
valid request, each field reachable from it (nested messages, repeated elements, oneof members) is set, one at a
time, to values of its type that a check could refuse. Each INVALID_ARGUMENT's ``google.rpc.BadRequest`` field
paths (and the path that starts its message) must resolve against the request's descriptor, repeated indexes and
map keys included; BulkStore's per-item rejections must resolve against ``BulkItem``. No bad input may answer
UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import google.rpc.error_details_pb2 as error_details_pb2  # noqa: PLR0402
import google.rpc.status_pb2 as status_pb2  # noqa: PLR0402
import grpc
import pytest
from google.protobuf import descriptor, message, struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, code_of

_STEP = re.compile(r'(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?:(?P<index>\d+)|"(?P<key>[^"]*)")\])?')
_LEAF_MESSAGES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.Struct"}
MAX_DEPTH = 3


def resolves(root: descriptor.Descriptor, path: str) -> bool:
    """Whether ``path`` (``a.b[2].c``, ``m["key"]``) names a field of ``root``. A oneof's name is not a path (a
    client cannot set it): a choice none of whose members is set names every member, one violation each."""
    if not path:
        return False
    current: descriptor.Descriptor | None = root
    steps = path.split(".")
    for position, step in enumerate(steps):
        match = _STEP.fullmatch(step)
        if match is None or current is None:
            return False
        name, index, key = match["name"], match["index"], match["key"]
        field = current.fields_by_name.get(name)
        last = position == len(steps) - 1
        if field is None:
            return False
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        repeated = field.is_repeated
        if index is not None and (not repeated or is_map):
            return False
        if key is not None and not is_map:
            return False
        if is_map:
            value = field.message_type.fields_by_name["value"]
            current = value.message_type if key is not None else None
            if key is None and not last:
                return False
        else:
            current = field.message_type
        if not last and current is None:
            return False
    return True


def test_the_resolver_accepts_real_paths_and_refuses_others() -> None:
    erase = memory_pb2.EraseRequest.DESCRIPTOR
    assert resolves(erase, "scope.scope") and resolves(erase, "filter.scopes[3].scope_id")
    assert resolves(erase, "id") and resolves(memory_pb2.StoreRequest.DESCRIPTOR, "memory.tags[0]")
    assert not resolves(erase, "target") and not resolves(lease_pb2.HoldRequest.DESCRIPTOR, "action")  # oneofs
    assert not resolves(erase, "scope.scopes[0].scope")  # what Erase once named
    assert not resolves(erase, "scope[0].scope") and not resolves(erase, "filter.scopes.scope[0]")
    assert not resolves(lease_pb2.HoldRequest.DESCRIPTOR, "namespace")
    assert resolves(lease_pb2.HoldRequest.DESCRIPTOR, "acquire.namespace")
    assert not resolves(erase, "") and not resolves(erase, "request")
    struct = struct_pb2.Struct.DESCRIPTOR  # no request of this API has a map field; Struct's ``fields`` is one
    assert resolves(struct, 'fields["a"].string_value') and resolves(struct, "fields")
    assert not resolves(struct, "fields[0]") and not resolves(struct, 'fields["a"].nothing')
    assert not resolves(memory_pb2.StoreRequest.DESCRIPTOR, 'memory.tags["a"]')


def _bad_scalars(field: FieldDescriptor) -> list[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_ENUM:
        return [0, 99, -1]
    if kind == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    if kind == FieldDescriptor.TYPE_STRING:
        return ["", "   ", "nul\x00inside", "x" * 70_000, "not a name!", "bm90IGEgdG9rZW4", "h1:1:99999999999999"]
    if kind == FieldDescriptor.TYPE_BYTES:
        return [b"", b"\x00" * 10]
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return [math.nan, math.inf, -1.0, 0.0, 2.0, 1e30]
    unsigned = kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32)
    wide = kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_FIXED64,
    )
    values = [0, 2**31 - 1] + ([2**62] if wide else [])
    return values if unsigned else [*values, -1]


def _bad_leaf_messages(name: str) -> list[dict[str, Any]]:
    if name == "google.protobuf.Timestamp":
        return [{"seconds": 2**62}, {"seconds": -(2**40)}, {"nanos": -1}, {"seconds": 253_402_300_799, "nanos": 0}]
    if name == "google.protobuf.Duration":
        return [{"seconds": -5}, {"seconds": 2**62}, {"seconds": 5, "nanos": -1}, {}, {"seconds": 10**7}]
    return [{"fields": {"n": {"number_value": math.nan}}}, {"fields": {"": {"string_value": "\x00"}}}]


def mutations(base: message.Message, depth: int = 0) -> Iterator[message.Message]:
    """Copies of ``base`` with one field (at any depth up to MAX_DEPTH) set to a value a check could refuse."""
    for field in base.DESCRIPTOR.fields:
        repeated = field.is_repeated
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            continue  # no request of this API has a map field
        if nested is not None and nested.full_name in _LEAF_MESSAGES:
            for value in _bad_leaf_messages(nested.full_name):
                copy = type(base)()
                copy.CopyFrom(base)
                target = getattr(copy, field.name)
                if repeated:
                    target.add().MergeFrom(type(target.add())(**value))
                else:
                    target.Clear()
                    target.MergeFrom(type(target)(**value))
                yield copy
        elif nested is not None:
            if depth >= MAX_DEPTH:
                continue
            if repeated:
                elements = list(getattr(base, field.name))
                templates = elements[:1] or [getattr(base, field.name).add()]
                # Too many elements, then each element's own bad values.
                copy = type(base)()
                copy.CopyFrom(base)
                for _ in range(130):
                    getattr(copy, field.name).add().CopyFrom(templates[0])
                yield copy
                for inner in mutations(templates[0], depth + 1):
                    copy = type(base)()
                    copy.CopyFrom(base)
                    getattr(copy, field.name).add().CopyFrom(inner)
                    yield copy
            else:
                copy = type(base)()
                copy.CopyFrom(base)
                getattr(copy, field.name).SetInParent()
                yield copy
                for inner in mutations(getattr(base, field.name), depth + 1):
                    copy = type(base)()
                    copy.CopyFrom(base)
                    getattr(copy, field.name).CopyFrom(inner)
                    yield copy
        else:
            for value in _bad_scalars(field):
                copy = type(base)()
                copy.CopyFrom(base)
                if repeated:
                    getattr(copy, field.name).extend([value] * (130 if value in ("", 0) else 1))
                else:
                    try:
                        setattr(copy, field.name, value)
                    except (ValueError, TypeError):
                        continue  # not representable on the wire
                yield copy


def _memory() -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=3, value="field paths")


def _acquire() -> lease_pb2.AcquireRequest:
    acquire = lease_pb2.AcquireRequest(namespace="paths", name=f"n-{uuid.uuid4().hex[:8]}")
    acquire.ttl.FromSeconds(5)
    return acquire


def _violations(trailers: tuple[tuple[str, str | bytes], ...]) -> list[str]:
    """The BadRequest field paths in a call's ``grpc-status-details-bin`` trailer, decoded as a client would."""
    fields: list[str] = []
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    fields.extend(v.field for v in bad.field_violations)
    return fields


class Collected:
    def __init__(self) -> None:
        self.paths: dict[str, set[tuple[str, str]]] = {}
        """RPC -> (path, root message name) pairs seen."""
        self.failures: list[str] = []

    def check(self, rpc: str, root: descriptor.Descriptor, error: grpc.RpcError, request: message.Message) -> None:
        trailers = tuple(error.trailing_metadata() or ())  # type: ignore[attr-defined]
        self.check_status(rpc, root, code_of(error), error.details(), trailers, request)  # type: ignore[attr-defined]

    def check_status(
        self,
        rpc: str,
        root: descriptor.Descriptor,
        code: grpc.StatusCode,
        details: str | None,
        trailers: tuple[tuple[str, str | bytes], ...],
        request: message.Message,
    ) -> None:
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            self.failures.append(f"{rpc}: {code.name} {details!r} for {request}")
        if code is not grpc.StatusCode.INVALID_ARGUMENT:
            return
        fields = _violations(trailers)
        if not fields:
            self.failures.append(f"{rpc}: INVALID_ARGUMENT without BadRequest details: {details!r}")
        for field in fields:
            self.record(rpc, root, field)
            if not (details or "").startswith(f"{field}: "):
                self.failures.append(f"{rpc}: message {details!r} does not start with {field!r}")

    def record(self, rpc: str, root: descriptor.Descriptor, field: str) -> None:
        self.paths.setdefault(rpc, set()).add((field, root.name))
        if not resolves(root, field):
            self.failures.append(f"{rpc}: {field!r} is not a field path of {root.full_name}")


async def _unary(collected: Collected, rpc: str, call: Any, request: message.Message) -> None:
    try:
        await call(request, timeout=20)
    except grpc.RpcError as error:
        collected.check(rpc, request.DESCRIPTOR, error, request)


async def _watch(collected: Collected, server: RunningServer, request: memory_pb2.WatchRequest) -> None:
    call = server.memory.Watch(request, timeout=0.5)
    try:
        await call.read()
    except grpc.RpcError as error:
        if code_of(error) is not grpc.StatusCode.DEADLINE_EXCEEDED:
            collected.check("Watch", request.DESCRIPTOR, error, request)
    finally:
        call.cancel()


async def _bulk(collected: Collected, server: RunningServer, request: memory_pb2.BulkStoreRequest) -> None:
    try:
        async for ack in server.memory.BulkStore(iter([request]), timeout=20):
            for rejection in ack.rejections:
                collected.record("BulkStore item", memory_pb2.BulkItem.DESCRIPTOR, rejection.field)
                if not rejection.field:
                    collected.failures.append(f"BulkStore: a rejection without a field: {rejection}")
    except grpc.RpcError as error:
        collected.check("BulkStore", request.DESCRIPTOR, error, request)


async def _hold(collected: Collected, server: RunningServer, request: lease_pb2.HoldRequest) -> None:
    call = server.leases.Hold(timeout=20)
    try:
        await call.write(request)
        first = await call.read()
        if first is not grpc.aio.EOF and first.kind == lease_pb2.HoldEvent.KIND_GRANTED:
            # A second acquire is bad input too; the server may end the call before the write completes.
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.write(lease_pb2.HoldRequest(acquire=_acquire()))
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.RpcError:
        pass
    finally:
        code = await call.code()
        if code is not grpc.StatusCode.CANCELLED:
            trailers = tuple(await call.trailing_metadata() or ())
            collected.check_status("Hold", request.DESCRIPTOR, code, await call.details(), trailers, request)
        call.cancel()


@pytest.mark.timeout(600)
async def test_every_invalid_argument_names_a_real_field_of_its_request(server: RunningServer) -> None:
    stored = await server.memory.Store(memory_pb2.StoreRequest(memory=_memory()))
    memory = server.memory
    leases = server.leases
    unary: list[tuple[str, Any, message.Message]] = [
        ("Store", memory.Store, memory_pb2.StoreRequest(memory=_memory())),
        ("Get", memory.Get, memory_pb2.GetRequest(id=stored.id)),
        ("Delete", memory.Delete, memory_pb2.DeleteRequest(id=10**9)),
        ("List", memory.List, memory_pb2.ListRequest(filter={"scopes": [{"scope": memory_pb2.SCOPE_AGENT}]})),
        ("Search", memory.Search, memory_pb2.SearchRequest(query="field", filter={"tags": ["t"]})),
        ("Embed", memory.Embed, memory_pb2.EmbedRequest(texts=["field"])),
        ("Stats", memory.Stats, memory_pb2.StatsRequest()),
        ("History", memory.History, memory_pb2.HistoryRequest(id=stored.id)),
        (
            "Erase",
            memory.Erase,
            memory_pb2.EraseRequest(scope={"scope": memory_pb2.SCOPE_AGENT, "scope_id": 999}, id=10**9),
        ),
        ("Acquire", leases.Acquire, _acquire()),
        ("Renew", leases.Renew, lease_pb2.RenewRequest(lease_id=str(uuid.uuid4()))),
        ("Release", leases.Release, lease_pb2.ReleaseRequest(lease_id=str(uuid.uuid4()))),
        ("GetLease", leases.Get, lease_pb2.GetLeaseRequest(namespace="paths", name="n")),
        ("ListLeases", leases.List, lease_pb2.ListLeasesRequest(namespace="paths")),
    ]
    collected = Collected()
    for rpc, call, base in unary:
        for request in [base, *mutations(base)]:
            await _unary(collected, rpc, call, request)
    watch = memory_pb2.WatchRequest(filter={"scopes": [{"scope": memory_pb2.SCOPE_AGENT}]})
    for request in [watch, *mutations(watch)]:
        await _watch(collected, server, request)
    item = memory_pb2.BulkItem(sequence=1, memory=_memory())
    bulk = memory_pb2.BulkStoreRequest(items=[item])
    for request in [bulk, *mutations(bulk)]:
        await _bulk(collected, server, request)
    for bad_item in mutations(item):  # alone in its request, so its own checks reject it
        await _bulk(collected, server, memory_pb2.BulkStoreRequest(items=[bad_item]))
    hold = lease_pb2.HoldRequest(acquire=_acquire())
    for request in [hold, *mutations(hold)]:
        await _hold(collected, server, request)

    assert not collected.failures, "\n".join(collected.failures[:40])
    # Every RPC that takes input refused some of it, so each was checked, not skipped.
    refused = set(collected.paths)
    assert refused >= {rpc for rpc, _, base in unary if base.DESCRIPTOR.fields} | {
        "Watch",
        "BulkStore",
        "BulkStore item",
        "Hold",
    }, refused
    assert ("scope.scope", "EraseRequest") in collected.paths["Erase"]
    assert any(path.startswith("acquire.") for path, _ in collected.paths["Hold"])
