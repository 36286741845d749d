"""Tokens in PostgreSQL: create, list and revoke them, and resolve the secret a call presents to its ``Access``.

Every instance reads the same table, so a change needs no restart; a resolved grant is cached for at most
``CACHE_SECONDS``, so a revoke or an expiry takes effect within that time on every instance. Only the SHA-256 of a
secret is stored: secrets are 256 random bits, so a lookup by their hash is safe and costs one index probe per token
per ``CACHE_SECONDS``. The tokens of AUTH_TOKENS are compared in constant time and keep full access.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from memory_service.errors import InvalidArgument, Unauthenticated
from memory_service.metrics import Metrics
from memory_service.storage import tokens_sql
from memory_service.storage.database import Database
from memory_service.tenants.types import EVERY_SCOPE, FULL_ACCESS, TOKEN_NAME, Access, Permission, ScopeGrant

CACHE_SECONDS = 5.0
"""The longest a resolved grant (or the absence of one) is used without reading the table again."""

CACHE_ENTRIES = 10_000
"""Resolved secrets kept; beyond it the oldest go, so a stream of made-up secrets cannot grow the cache."""

SECRET_PREFIX = "mst_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSpec:
    """What ``tokens create`` asks for."""

    name: str
    scopes: tuple[ScopeGrant, ...]
    permissions: frozenset[Permission]
    lease_namespaces: tuple[str, ...] = ()
    max_memories: int | None = None
    rate: float | None = None
    expires_in: timedelta | None = None


def check_spec(spec: TokenSpec) -> None:
    """Raise InvalidArgument naming the flag that is wrong."""
    if not TOKEN_NAME.match(spec.name):
        raise InvalidArgument("name", "must be 1-63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    if Permission.ADMIN in spec.permissions:
        if spec.scopes not in ((), EVERY_SCOPE):
            raise InvalidArgument("--scope", "--admin grants every scope: give no --scope (or only *)")
    elif not spec.scopes:
        raise InvalidArgument("--scope", "give at least one: SCOPE:ID, SCOPE:* or *")
    for namespace in spec.lease_namespaces:
        if not namespace or len(namespace) > 200:
            raise InvalidArgument("--lease", "a namespace is 1 to 200 characters")
    if spec.max_memories is not None and spec.max_memories < 0:
        raise InvalidArgument("--max-memories", "must not be negative")
    if spec.rate is not None and not spec.rate > 0:
        raise InvalidArgument("--rate", "must be a positive number of calls per second")
    if spec.expires_in is not None and spec.expires_in <= timedelta(0):
        raise InvalidArgument("--expires", "must be a positive duration")


def granted_scopes(spec: TokenSpec) -> tuple[ScopeGrant, ...]:
    """What a token's scopes are: an admin's are every scope, whatever else was asked."""
    return EVERY_SCOPE if Permission.ADMIN in spec.permissions else spec.scopes


def access_from_row(row: Any) -> Access:
    permissions = frozenset(Permission(p) for p in row["permissions"])
    # Tokens made before --admin meant every scope carry the scope their command asked for; they mean every one.
    scopes = EVERY_SCOPE if Permission.ADMIN in permissions else tuple(ScopeGrant.parse(s) for s in row["scopes"])
    return Access(
        principal=row["name"],
        scopes=scopes,
        permissions=permissions,
        lease_namespaces=tuple(row["lease_namespaces"]),
        max_memories=row["max_memories"],
        rate=row["rate"],
    )


def token_report(row: Any) -> dict[str, Any]:
    """One line of ``tokens list``: never the secret, nor its hash."""

    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "name": row["name"],
        "scopes": list(row["scopes"]),
        "permissions": list(row["permissions"]),
        "lease_namespaces": list(row["lease_namespaces"]),
        "max_memories": row["max_memories"],
        "rate": row["rate"],
        "created": when(row["created_at"]),
        "expires": when(row["expires_at"]),
        "revoked": when(row["revoked_at"]),
        "last_used": when(row["last_used_at"]),
    }


class Tokens:
    """Resolves presented secrets; manages the table for the ``tokens`` command."""

    def __init__(
        self,
        db: Database,
        static_tokens: Sequence[str] = (),
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._static = [t.encode() for t in static_tokens]
        self._clock = clock
        self._cache: dict[bytes, tuple[float, Access | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Access | None]] = {}
        self._table_used = False
        self._table_checked_at = -CACHE_SECONDS

    async def create(self, spec: TokenSpec) -> str:
        """Store the token and return its secret, which exists nowhere else from then on."""
        check_spec(spec)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        async with self._db.connection() as conn:
            created = await tokens_sql.create(
                conn,
                name=spec.name,
                secret_sha256=hashlib.sha256(secret.encode()).digest(),
                scopes=[str(s) for s in sorted(set(granted_scopes(spec)))],
                permissions=sorted(p.value for p in spec.permissions),
                lease_namespaces=sorted(set(spec.lease_namespaces)),
                max_memories=spec.max_memories,
                rate=spec.rate,
                expires_in=spec.expires_in,
            )
        if not created:
            raise InvalidArgument("name", f"a token named {spec.name!r} exists (revoked names stay taken)")
        return secret

    async def list(self) -> list[dict[str, Any]]:
        async with self._db.connection() as conn:
            return [token_report(row) for row in await tokens_sql.list_all(conn)]

    async def revoke(self, name: str) -> bool:
        async with self._db.connection() as conn:
            return await tokens_sql.revoke(conn, name)

    async def resolve(self, presented: bytes) -> Access:
        """The access of a call that presented ``presented`` (b"" for none); UNAUTHENTICATED when auth is on and
        the secret is no live token's."""
        matched = b""
        for token in self._static:  # every one, so timing does not reveal which matched
            if hmac.compare_digest(presented, token):
                matched = token
        if matched:
            return dataclasses.replace(FULL_ACCESS, principal="token:" + hashlib.sha256(matched).hexdigest()[:12])
        if presented:
            access = await self._lookup(hashlib.sha256(presented).digest())
            if access is not None:
                return access
        if self._static or await self._table_in_use():
            raise Unauthenticated()
        return FULL_ACCESS

    async def _table_in_use(self) -> bool:
        """Whether any token was ever created; once true it stays so (re-read every CACHE_SECONDS until then)."""
        now = self._clock()
        if not self._table_used and now - self._table_checked_at >= CACHE_SECONDS:
            async with self._db.connection() as conn:
                self._table_used = await tokens_sql.any_exist(conn)
            self._table_checked_at = now
        return self._table_used

    async def _lookup(self, digest: bytes) -> Access | None:
        cached = self._cache.get(digest)
        if cached is not None and self._clock() - cached[0] < CACHE_SECONDS:
            return cached[1]
        pending = self._pending.get(digest)
        if pending is not None:  # calls arriving together share one query
            return await asyncio.shield(pending)
        future: asyncio.Future[Access | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            async with self._db.connection() as conn:
                row = await tokens_sql.lookup(conn, digest)
            access = None
            if row is not None:
                access = access_from_row(row)
                if row["memories"] is not None and self._metrics is not None:
                    self._metrics.token_memories.labels(row["name"]).set(row["memories"])
            self._remember(digest, access)
            future.set_result(access)
            return access
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so a future nobody else awaited logs nothing
            raise
        finally:
            del self._pending[digest]

    def quota_grants(self, within: float = 60.0) -> set[ScopeGrant]:
        """The scopes of the tokens with a memory quota this instance resolved in the last ``within`` seconds: the
        scopes whose counts its writes sum."""
        now = self._clock()
        return {
            grant
            for resolved_at, access in list(self._cache.values())
            if access is not None and access.max_memories is not None and now - resolved_at < within
            for grant in access.scopes
        }

    def _remember(self, digest: bytes, access: Access | None) -> None:
        self._cache.pop(digest, None)
        while len(self._cache) >= CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = (self._clock(), access)
        if access is not None:
            self._table_used = True
