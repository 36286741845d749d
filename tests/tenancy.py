"""Helpers of the tenant tests: tokens made through the real token store, and calls made with them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import grpc
import pytest

from memory_service.storage.database import Database
from memory_service.tenants.tokens import Tokens, TokenSpec
from memory_service.tenants.types import Permission, ScopeGrant
from memory_service.v1 import memory_pb2

READ_WRITE_ERASE = frozenset({Permission.READ, Permission.WRITE, Permission.ERASE})


async def create_token(
    dsn: str,
    name: str,
    scopes: Iterable[str],
    *,
    permissions: frozenset[Permission] = READ_WRITE_ERASE,
    leases: tuple[str, ...] = (),
    max_memories: int | None = None,
    rate: float | None = None,
    expires_in: timedelta | None = None,
) -> str:
    """A token in the database's tokens table, as `memory-service tokens create` makes it; returns the secret."""
    db = await Database.connect(dsn, min_size=1, max_size=1)
    try:
        spec = TokenSpec(
            name=name,
            scopes=tuple(ScopeGrant.parse(s) for s in scopes),
            permissions=permissions,
            lease_namespaces=leases,
            max_memories=max_memories,
            rate=rate,
            expires_in=expires_in,
        )
        return await Tokens(db).create(spec)
    finally:
        await db.close()


def bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


def memory(scope: int, scope_id: int, value: str, *, key: str = "", tags: Iterable[str] = ()) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=scope, scope_id=scope_id, value=value, key=key, tags=list(tags))


def scopes(*refs: tuple[int, int | None]) -> memory_pb2.MemoryFilter:
    return memory_pb2.MemoryFilter(
        scopes=[
            memory_pb2.ScopeRef(scope=s) if i is None else memory_pb2.ScopeRef(scope=s, scope_id=i) for s, i in refs
        ]
    )


async def refused(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call`` and return the error it ends with, which must have ``code``."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() is code, caught.value.details()
    return caught.value
