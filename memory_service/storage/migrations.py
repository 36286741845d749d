"""Applies migrations/NNNN_*.sql in order, once each, even with several instances starting together.

The runner itself creates the schema ``memory`` and its bookkeeping table ``memory.schema_migrations`` before it
reads them (``_apply_locked``); the numbered files create everything inside the schema and may assume it exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

import asyncpg

from memory_service.errors import MigrationError, StartupError

log = logging.getLogger(__name__)

# Any constant works as long as nothing else in the database uses it; its bytes spell "memsvcmg".
MIGRATION_LOCK_KEY = 0x6D656D7376636D67
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The installed copy (wheel) or the repository's migrations/ (editable install, tests)."""
    packaged = Path(__file__).resolve().parents[1] / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    files = sorted(p for p in directory.glob("*.sql") if _NAME.match(p.name))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return [Migration(p.name, p.read_text()) for p in files]


async def apply_migrations(dsn: str, *, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied by this call.

    Runs on a dedicated connection (not the pool) holding a session advisory lock for the whole run, so a second
    instance waits and then finds nothing to do. Each file runs in its own transaction.
    """
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            return await _apply_locked(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _apply_locked(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(
        """
        CREATE SCHEMA IF NOT EXISTS memory;
        CREATE TABLE IF NOT EXISTS memory.schema_migrations (
            name text PRIMARY KEY,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        """
    )
    applied = {
        r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM memory.schema_migrations")
    }
    known = {m.name for m in migrations}
    for name in sorted(set(applied) - known):
        log.warning("database has migration %s that this build does not know; is an older build running?", name)
    done: list[str] = []
    for migration in migrations:
        recorded = applied.get(migration.name)
        if recorded is not None:
            if recorded != migration.checksum:
                raise MigrationError(
                    f"migration {migration.name} was changed after it was applied "
                    f"(recorded checksum {recorded[:12]}, file now {migration.checksum[:12]}); "
                    "applied migrations are immutable: restore the file and add a new migration instead"
                )
            continue
        log.info("applying migration %s", migration.name)
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO memory.schema_migrations (name, checksum) VALUES ($1, $2)",
                    migration.name,
                    migration.checksum,
                )
        except asyncpg.UndefinedFileError as exc:
            raise _missing_extension(exc) from exc
        except asyncpg.FeatureNotSupportedError as exc:
            raise _missing_extension(exc) from exc
        except asyncpg.InsufficientPrivilegeError as exc:
            raise StartupError(
                f"migration {migration.name} needs more privileges than the database user has ({exc}); "
                "run `memory-service migrate` once as a superuser or the database owner"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
        done.append(migration.name)
    return done


def _missing_extension(exc: Exception) -> StartupError:
    return StartupError(
        f"the PostgreSQL server lacks an extension memory-service needs ({exc}); install pgvector "
        "(for example the postgresql-16-pgvector package or the pgvector/pgvector Docker image) "
        "or unset DATABASE_URL to use the embedded PostgreSQL"
    )
