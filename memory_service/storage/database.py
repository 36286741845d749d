"""The asyncpg pool, its codecs, and the translation of driver errors into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import asyncpg
import numpy as np
import numpy.typing as npt
from pgvector import Vector
from pgvector.asyncpg import register_vector

from memory_service.config.env import redact_url
from memory_service.errors import (
    WRITES_REFUSED,
    DatabaseConflict,
    DatabaseReadOnly,
    DatabaseResourcesExhausted,
    DatabaseUnavailable,
    DeadlineExceeded,
    GenerationChanged,
    Internal,
    MemoryServiceError,
    PermissionDenied,
    StartupError,
    one_line,
)
from memory_service.storage.access import QUOTA_SQLSTATE, access_settings, quota_exceeded
from memory_service.storage.probe import WriteRefusals
from memory_service.storage.session import (
    PooledConnection,
    access_for_transaction,
    begin_statement,
    reset_connection,
    use_access,
    use_session_settings,
)
from memory_service.tenants.types import current as current_access

log = logging.getLogger(__name__)
T = TypeVar("T")

Connection = asyncpg.Connection
"""A pooled connection, named here so that domain modules can annotate callbacks without importing the driver."""

# The one table from driver exceptions to domain errors, looked up along each exception's MRO (the nearest class
# wins). Storage modules that expect a specific error (a unique violation they can name) catch it themselves first.
DRIVER_ERRORS: dict[type[BaseException], type[MemoryServiceError]] = {
    # The database could not be reached or dropped us: retryable, and a write may or may not have committed.
    asyncpg.PostgresConnectionError: DatabaseUnavailable,
    asyncpg.CannotConnectNowError: DatabaseUnavailable,
    asyncpg.TooManyConnectionsError: DatabaseUnavailable,
    asyncpg.AdminShutdownError: DatabaseUnavailable,
    asyncpg.CrashShutdownError: DatabaseUnavailable,
    asyncpg.ConnectionFailureError: DatabaseUnavailable,
    # asyncpg raises InterfaceError (not only for misuse) on a connection that was closed under it.
    asyncpg.InterfaceError: DatabaseUnavailable,
    # A pooled connection whose backend was killed while idle fails its next use with this.
    asyncpg.InternalClientError: DatabaseUnavailable,
    ConnectionError: DatabaseUnavailable,
    OSError: DatabaseUnavailable,
    TimeoutError: DatabaseUnavailable,
    # PostgreSQL rolled the transaction back to keep it consistent: nothing was written; re-read and retry.
    asyncpg.SerializationError: DatabaseConflict,
    asyncpg.DeadlockDetectedError: DatabaseConflict,
    # A schema change gave up waiting for its lock (lock_timeout): nothing was changed; retry.
    asyncpg.LockNotAvailableError: DatabaseConflict,
    # A statement prepared before a schema change (binding the embedding column's type), run in a transaction:
    # asyncpg drops its statement cache, so the retry succeeds.
    asyncpg.InvalidCachedStatementError: DatabaseUnavailable,
    # The deadline or statement_timeout cancelled the query.
    asyncpg.QueryCanceledError: DeadlineExceeded,
    # Up, but refusing writes: a read-only transaction (default_transaction_read_only, a standby), or out of disk,
    # memory or another resource (SQLSTATE class 53; too many connections is mapped above as unavailable).
    asyncpg.ReadOnlySQLTransactionError: DatabaseReadOnly,
    asyncpg.InsufficientResourcesError: DatabaseResourcesExhausted,
    # The service handed the driver a value it cannot encode: a bug here, not the client's or the database's.
    asyncpg.DataError: Internal,
    # Row-level security refused a row the service's own checks let through (or a grant is missing).
    asyncpg.InsufficientPrivilegeError: PermissionDenied,
}

_MESSAGES: dict[type[MemoryServiceError], str] = {
    DatabaseUnavailable: "database unavailable: {name}",
    DatabaseConflict: "the transaction conflicted with another and was rolled back ({name}); retry",
    DeadlineExceeded: "the query was cancelled: its deadline or statement_timeout passed",
    DatabaseReadOnly: "the database refuses writes: {exc} (it is read-only); nothing was written, retry later",
    DatabaseResourcesExhausted: (
        "the database is out of resources and refused the work ({name}: {exc}); nothing was written, retry after an "
        "operator has freed them"
    ),
    Internal: "the database driver refused a value the service sent ({name}): {exc}",
    PermissionDenied: "the database refused the call's access ({name})",
}


GENERATION_CHANGED = "MSG01"
"""The SQLSTATE of ``memory.embedding_generation_is`` (migrations/0012_embedding_generations.sql)."""


def driver_error(exc: BaseException) -> MemoryServiceError | None:
    """The domain error for a driver exception, or None when it is not one the table knows (it propagates as is)."""
    if getattr(exc, "sqlstate", None) == GENERATION_CHANGED:
        return GenerationChanged(str(exc))
    if getattr(exc, "sqlstate", None) == QUOTA_SQLSTATE:
        return quota_exceeded(current_access())
    for cls in type(exc).__mro__:
        target = DRIVER_ERRORS.get(cls)
        if target is not None:
            return target(_MESSAGES[target].format(name=type(exc).__name__, exc=exc))
    return None


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Raise the domain counterpart (``DRIVER_ERRORS``) of a driver exception, chained to it."""
    try:
        yield
    except Exception as exc:
        translated = driver_error(exc)
        if translated is None:
            raise
        if isinstance(translated, Internal):
            log.error("database driver misused: %s", exc, exc_info=exc)
        raise translated from exc


async def check_reachable(dsn: str, *, named_by: str, timeout: float = 10.0) -> None:
    """Open and close one connection, so that start-up reports a database it cannot use as one line.

    Covers what the pool and the migration runner would otherwise raise as tracebacks: a refused or unresolvable
    host, a timeout, a wrong password, a missing database, a DSN the driver cannot parse.
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = one_line(str(exc)) or type(exc).__name__
        raise StartupError(f"cannot connect to the database {named_by} ({redact_url(dsn)}): {reason}") from exc
    await conn.close()


_HEADER = struct.Struct(">HH")


def _decode_vector(data: bytes) -> npt.NDArray[np.float32]:
    return Vector.from_binary(data).to_numpy()


def _encode_vector(value: Vector | npt.NDArray[np.floating[Any]] | list[float]) -> bytes:
    """pgvector's binary format: dimension and a reserved word (uint16 each), then big-endian float32s.

    One-dimensional numpy arrays, what the service writes, are packed directly: through pgvector's ``Vector``
    each costs several microseconds more, which shows in bulk ingest."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return _HEADER.pack(value.shape[0], 0) + value.astype(">f4", copy=False).tobytes()
    vector = value if isinstance(value, Vector) else Vector(value)
    encoded: bytes = vector.to_binary()
    return encoded


def _decode_json(text: str) -> Any:
    """``json.loads``, without its parser for the empty object most memories' metadata is (every row a search or
    a page returns decodes one)."""
    return {} if text == "{}" else json.loads(text)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Binary pgvector codecs (vectors decode to numpy arrays) and JSON codecs on every pooled connection."""
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = 'vector'"
    )
    await register_vector(conn, schema=schema or "public")
    await conn.set_type_codec(
        "vector", schema=schema or "public", encoder=_encode_vector, decoder=_decode_vector, format="binary"
    )
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=_decode_json, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=_decode_json, schema="pg_catalog")


class Database:
    """One pool per DSN. Hands out connections and transactions with driver errors translated.

    Per-query settings go two ways. ``settings_connection(settings)`` gives a connection outside a transaction
    whose session settings are exactly ``settings`` among those the service sets (``SET`` sent only when they
    change; searches, one round trip per statement). ``transaction(settings=...)`` sends ``BEGIN`` and one
    ``SET LOCAL`` per setting in a single simple query (``begin_statement``): they end with the transaction.
    """

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.on_wait: Callable[[float], None] | None = None
        """Told how long each acquire waited for a connection, in seconds (the pool-wait metric)."""
        self.refusals = WriteRefusals()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """``translate_errors``, noting a refused write in ``refusals``."""
        try:
            with translate_errors():
                yield
        except WRITES_REFUSED as exc:
            self.refusals.refused(exc)
            raise

    @property
    def refusing(self) -> bool:
        """Whether the database refused a write and no write probe has succeeded since."""
        return self.refusals.active

    async def writes_resumed(self) -> None:
        """End a refusal episode: a write probe succeeded. Pooled connections opened during the episode may carry
        its read-only default (a session's defaults are read when it starts), so they are replaced."""
        if self.refusals.active:
            self.refusals.ended()
            await self.pool.expire_connections()

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        timeout: float = 30.0,
        on_query: Callable[[Any], None] | None = None,
    ) -> Database:
        """A pool of ``max_size`` connections; ``on_query`` (tracing) hears of every statement they run."""
        init = init_connection
        if on_query is not None:

            async def init(conn: asyncpg.Connection) -> None:
                await init_connection(conn)
                conn.add_query_logger(on_query)

        with translate_errors():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=init,
                reset=reset_connection,
                connection_class=PooledConnection,
                timeout=timeout,
                command_timeout=None,
                # Idle connections are recycled so a restarted database is rejoined without manual action.
                max_inactive_connection_lifetime=300.0,
            )
        return cls(pool, dsn)

    async def close(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except (TimeoutError, asyncpg.InterfaceError):
            self.pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self, *, timeout: float | None = 10.0) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection running with the call's access; ``timeout=None`` leaves bounding the wait to the
        caller's own timer."""
        with self._translated():
            async with self._acquire(timeout) as conn:
                await use_access(conn, access_settings(current_access()))
                yield conn

    async def run(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``op`` on a pooled connection outside a transaction (each of its statements commits on its own).

        No acquire timeout of its own: the caller bounds the whole call, waiting for a connection included, with
        one ``asyncio.timeout``, which costs no task per call as ``pool.acquire(timeout=...)`` would.
        """
        async with self.connection(timeout=None) as conn:
            return await op(conn)

    @contextlib.asynccontextmanager
    async def _acquire(self, timeout: float | None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, waiting at most ``timeout`` for one.

        ``pool.acquire(timeout=...)`` runs each acquire in a task of its own; a timer around a plain acquire
        bounds the wait the same way without a task per call."""
        waited = time.perf_counter()
        async with asyncio.timeout(timeout):
            conn = await self.pool.acquire()
        if self.on_wait is not None:
            self.on_wait(time.perf_counter() - waited)
        try:
            yield conn
        finally:
            await self.pool.release(conn)

    @contextlib.asynccontextmanager
    async def settings_connection(self, settings: Mapping[str, str]) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection outside a transaction whose session settings are ``settings`` (and the call's access).

        Each statement commits (and takes its snapshot) on its own; nothing is sent unless the connection's
        settings differ, since each pooled connection remembers what it was given. A caller that depends on a
        setting must name it: settings it leaves out are reset only if a previous caller had set them."""
        with self._translated():
            async with self._acquire(10.0) as conn:
                await use_session_settings(conn, {**settings, **access_settings(current_access())})
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        isolation: str = "read_committed",
        readonly: bool = False,
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a transaction running with the call's access, with ``settings`` applied for this
        transaction only."""
        with self._translated():
            async with self._acquire(10.0) as conn:
                local = await access_for_transaction(conn, access_settings(current_access()))
                if not settings and not local:
                    async with conn.transaction(isolation=isolation, readonly=readonly):
                        yield conn
                    return
                # BEGIN and every SET LOCAL travel in one round trip.
                begin = begin_statement({**(settings or {}), **local}, readonly=readonly, isolation=isolation)
                await conn.execute(begin)
                try:
                    yield conn
                except BaseException:
                    if not conn.is_closed():
                        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                            await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")

    async def expire_connections(self) -> None:
        """Replace every pooled connection as it is next released (dropping their prepared statements)."""
        await self.pool.expire_connections()

    def pool_size(self) -> int:
        return int(self.pool.get_size())

    def pool_idle(self) -> int:
        return int(self.pool.get_idle_size())

    def pool_busy(self) -> bool:
        """Every connection the pool may open is checked out: one more caller would wait."""
        return self.pool_size() - self.pool_idle() >= int(self.pool.get_max_size())
