"""``backup`` under write load and ``restore`` (every acknowledged row back, searches answering the same, the checks
a restore makes), and ``export`` then ``ingest`` into another database round-tripping every field."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import pytest
from google.protobuf import struct_pb2

from bench.peak_memory import read_peak
from memory_service.cli.main import main
from memory_service.storage import dump
from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, create_database, drop_database, start_server, stop_server, test_env
from tests.test_index_care import load

COLUMNS = (
    "scope::text, scope_id, agent_id, memory_type::text, key, value, importance, tags, metadata::text, "
    "content_hash, embedding_model, expires_at, embedding::text"
)


@pytest.fixture
async def spare_databases(server_dsn: str) -> AsyncIterator[list[str]]:
    dsns = [await create_database(server_dsn) for _ in range(3)]
    yield dsns
    for dsn in dsns:
        await drop_database(server_dsn, dsn)


async def _cli(*argv: str, dsn: str, **env: str) -> int:
    return await asyncio.to_thread(main, list(argv), {"DATABASE_URL": dsn, **env})


async def _rows(dsn: str) -> dict[tuple[str, int, str], tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT {COLUMNS} FROM memory.memories")
    finally:
        await conn.close()
    # The latest storable expiry reads back as a naive datetime.max when the driver wrote it ('infinity'), as the
    # service itself reads it (storage.memories_sql._aware): the same instant either way.
    return {(r[0], r[1], r[4]): tuple(_aware(v) for v in r) for r in rows}


def _aware(value: Any) -> Any:
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


async def _searches(server: RunningServer) -> list[list[tuple[int, float]]]:
    answers = []
    for query, mode, scope in (
        ("write load memory 17", memory_pb2.SEARCH_MODE_HYBRID, None),
        ("memory 3", memory_pb2.SEARCH_MODE_TEXT, None),
        ("load 42", memory_pb2.SEARCH_MODE_VECTOR, None),
        ("write load", memory_pb2.SEARCH_MODE_HYBRID, memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=2)),
    ):
        request = memory_pb2.SearchRequest(query=query, mode=mode, top_k=10)
        if scope is not None:
            request.filter.scopes.append(scope)
        response = await server.memory.Search(request)
        answers.append([(hit.memory.id, round(hit.score, 9)) for hit in response.hits])
    return answers


async def test_backup_under_write_load_then_restore(
    database_url: str, spare_databases: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    under_load, quiet, mismatched = spare_databases
    server = await start_server(test_env(database_url))
    acked: list[tuple[str, int, str]] = []
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            memory = memory_pb2.MemoryInput(
                scope=memory_pb2.SCOPE_AGENT, scope_id=i % 3, key=f"k{i}", value=f"write load memory {i}", tags=["t"]
            )
            await server.memory.Store(memory_pb2.StoreRequest(memory=memory))
            acked.append(("agent", i % 3, f"k{i}"))
            i += 1

    writer = asyncio.create_task(write())
    try:
        while len(acked) < 100:
            await asyncio.sleep(0.05)
        before = list(acked)
        file = tmp_path / "under-load.backup"
        assert await _cli("backup", str(file), dsn=database_url) == 0
        written_during = len(acked) - len(before)
        stop.set()
        await writer

        assert await _cli("restore", str(file), dsn=under_load) == 0
        restored = await _rows(under_load)
        assert set(before) <= set(restored)  # every row acknowledged before the backup began
        assert set(restored) <= set(acked)  # and nothing that was never written
        with file.open("rb") as stream:
            header = dump.BackupHeader.read(stream)
        assert header.memories == len(restored) and header.model == "hash-ngram-v1" and header.dimension == 384
        assert written_during > 0  # the writes went on while pg_dump ran

        # A database holding data is refused unless told; --force replaces it.
        capsys.readouterr()
        assert await _cli("restore", str(file), dsn=under_load) == 2
        assert "refusing to restore into a database that already holds" in capsys.readouterr().err
        assert await _cli("restore", "--force", str(file), dsn=under_load) == 0
        assert await _rows(under_load) == restored

        # Another model configured than the backup is bound to: refused before anything is touched.
        assert await _cli("restore", str(file), dsn=mismatched, EMBEDDING_DIM="256") == 2
        assert "bound to hash-ngram-v1 (384 dimensions)" in capsys.readouterr().err
        assert not await _rows_exist(mismatched)

        # Quiet now: a second backup restored elsewhere answers every search exactly as the original does.
        quiet_file = tmp_path / "quiet.backup"
        await server.server.runtime.text_stats.refresh()  # BM25's statistics as a fresh start computes them
        assert await _cli("backup", str(quiet_file), dsn=database_url) == 0
        assert await _cli("restore", str(quiet_file), dsn=quiet) == 0
        assert await _rows(quiet) == await _rows(database_url)
        assert await _access(quiet) == await _access(database_url)  # grants, revokes and policies as they were
        copy = await start_server(test_env(quiet))
        try:
            assert await _searches(copy) == await _searches(server)
        finally:
            await stop_server(copy)
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await stop_server(server)


async def test_restore_by_another_user_owns_what_the_old_owner_had(
    database_url: str, empty_database_url: str, server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backup taken as the superuser, restored by an ordinary user: row-level security is FORCEd, so without its
    own maintenance policies the new owner would see no rows; it gets them, and the default privileges, while the
    calls roles keep their grants. Without membership in the calls roles, restore says what to do in one line."""
    await load(database_url, 50, seed=8)
    file = tmp_path / "owner.backup"
    assert await _cli("backup", str(file), dsn=database_url) == 0
    user = "restorer_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(server_dsn)
    target = await asyncpg.connect(empty_database_url)
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{user}'")
        name = urlsplit(empty_database_url).path.lstrip("/")
        await admin.execute(f'ALTER DATABASE "{name}" OWNER TO {user}')
        await target.execute("CREATE EXTENSION vector")  # a superuser's step for an owner that is not one
        parts = urlsplit(empty_database_url)
        as_user = urlunsplit(parts._replace(netloc=f"{user}:{user}@{parts.netloc.rpartition('@')[2]}"))
        capsys.readouterr()
        assert await _cli("restore", str(file), dsn=as_user) == 2
        assert "have a superuser create them" in capsys.readouterr().err
        await admin.execute(f"GRANT memory_calls, memory_calls_kinds TO {user}")
        assert await _cli("restore", str(file), dsn=as_user) == 0
        assert len(await _rows(as_user)) == 50
        roles = await target.fetch(
            "SELECT polroles::regrole[]::text[] AS roles FROM pg_policy WHERE polname = 'maintenance'"
        )
        assert len(roles) == 5 and all(r["roles"] == [user] for r in roles)
        assert (
            await target.fetchval("SELECT count(*) FROM pg_default_acl WHERE defaclrole::regrole::text = $1", user) == 2
        )
        assert await target.fetchval("SELECT has_table_privilege('memory_calls', 'memory.memories', 'INSERT')")
        assert not await target.fetchval("SELECT has_table_privilege('memory_calls', 'memory.scope_usage', 'UPDATE')")
    finally:
        await target.close()
        await drop_database(server_dsn, empty_database_url)
        await admin.execute(f"DROP ROLE IF EXISTS {user}")
        await admin.close()


async def _access(dsn: str) -> list[tuple[Any, ...]]:
    """Who may do what in the schema: each relation's and function's privileges, each policy and its roles."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            # An ACL left at its default reads NULL, one granted and revoked back reads the owner's entry: the same.
            "SELECT 'rel', relname, coalesce(relacl, acldefault(CASE relkind WHEN 'S' THEN 's' ELSE 'r' END::\"char\", "
            "relowner))::text[], relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relnamespace = 'memory'::regnamespace AND relkind IN ('r', 'S') "
            "UNION ALL SELECT 'fn', proname, coalesce(proacl, acldefault('f'::\"char\", proowner))::text[], false, "
            "false FROM pg_proc "
            "WHERE pronamespace = 'memory'::regnamespace "
            "UNION ALL SELECT 'policy', polrelid::regclass::text || '.' || polname, polroles::regrole[]::text[], "
            "false, false FROM pg_policy WHERE polrelid::regclass::text LIKE 'memory.%' "
            "UNION ALL SELECT 'default', defaclobjtype::text, defaclacl::text[], false, false FROM pg_default_acl "
            "WHERE defaclnamespace = 'memory'::regnamespace ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    return [tuple(sorted(v) if isinstance(v, list) else v for v in row) for row in rows]


async def _holds(dsn: str, condition: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval(f"SELECT {condition}"))
    finally:
        await conn.close()


async def _rows_exist(dsn: str) -> bool:
    return await _holds(dsn, "to_regclass('memory.memories') IS NOT NULL")


async def test_restore_refuses_a_backup_of_a_newer_schema(database_url: str, tmp_path: Path) -> None:
    file = tmp_path / "good.backup"
    assert await _cli("backup", str(file), dsn=database_url) == 0
    newer = _tampered(file, "newer.backup", lambda h: h["migrations"].append("9999_from_the_future.sql"))
    assert await _cli("restore", str(newer), dsn=database_url) == 2


def _tampered(file: Path, name: str, change: Any) -> Path:
    """A copy of the backup whose header line ``change`` edited; the archive after it as it was."""
    line, _, archive = file.read_bytes().partition(b"\n")
    header = json.loads(line.split(b" ", 2)[2])
    change(header)
    copy = file.with_name(name)
    copy.write_bytes(b"MEMORY-SERVICE-BACKUP 1 " + json.dumps(header).encode() + b"\n" + archive)
    return copy


async def _schema_exists(dsn: str) -> bool:
    return await _holds(dsn, "to_regnamespace('memory') IS NOT NULL")


async def test_a_restore_whose_checks_fail_leaves_the_target_as_it_was(
    database_url: str, spare_databases: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks against the header run before the restore commits: a header that does not match what the archive
    restores (a row count, a migration, a model) fails it and the target keeps what it held, nothing at all or
    (``--force``) the data it had; so does an archive cut short. A retry with the good file then works."""
    await load(database_url, 12, seed=5)
    conn = await asyncpg.connect(database_url)
    try:  # a row longer than the restore reads at once, holding what ends a COPY's rows in its text format
        await conn.execute(
            "UPDATE memory.memories SET value = $1 WHERE id = (SELECT min(id) FROM memory.memories)",
            "x" * 1_500_000 + "\n\\.\n\t\\.",
        )
    finally:
        await conn.close()
    file = tmp_path / "good.backup"
    assert await _cli("backup", str(file), dsn=database_url) == 0
    changes = {
        "count": lambda h: h.update(memories=h["memories"] + 1),
        "migration": lambda h: h["migrations"].pop(),
        "model": lambda h: h.update(model="another-model"),
        "dimension": lambda h: h.update(dimension=256),
    }
    damaged = "the archive does not match the backup's header (migrations, model): the file is damaged"
    bad = {kind: (_tampered(file, f"{kind}.backup", change), damaged) for kind, change in changes.items()}
    bad["count"] = (bad["count"][0], "the backup's header counts 13 memories but its archive holds 12")
    # Cut inside the memories' rows: some COPY, then pg_restore fails. Its header is one of a backup made before
    # the archive's digest was recorded, which would refuse the file before pg_restore ever started.
    legacy = _tampered(file, "legacy.backup", lambda h: [h.pop("archive_sha256"), h.pop("archive_bytes")])
    legacy_at = legacy.read_bytes().index(b"\n") + 1
    truncated = tmp_path / "truncated.backup"
    truncated.write_bytes(legacy.read_bytes()[: legacy_at + (legacy.stat().st_size - legacy_at) // 2])
    target, replaced = spare_databases[:2]
    for kind, (tampered, message) in bad.items():
        capsys.readouterr()
        assert await _cli("restore", "--any-model", str(tampered), dsn=target) == 2, kind
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (kind, err)
        assert not await _schema_exists(target), kind  # nothing of the failed restore stayed
    capsys.readouterr()
    assert await _cli("restore", str(truncated), dsn=target) == 2
    assert "pg_restore failed (exit 1)" in capsys.readouterr().err
    assert not await _schema_exists(target)
    # The archive's own SQL failing (its columns name public.vector, installed elsewhere here) rolls back as well.
    elsewhere = spare_databases[2]
    conn = await asyncpg.connect(elsewhere)
    try:
        await conn.execute("CREATE SCHEMA elsewhere; CREATE EXTENSION vector SCHEMA elsewhere")
    finally:
        await conn.close()
    capsys.readouterr()
    assert await _cli("restore", str(file), dsn=elsewhere) == 2
    err = capsys.readouterr().err
    assert 'the archive\'s SQL failed: type "public.vector" does not exist' in err and err.count("\n") == 1, err
    assert not await _schema_exists(elsewhere)

    assert await _cli("restore", str(file), dsn=target) == 0
    original = await _rows(database_url)
    assert await _rows(target) == original and len(original) == 12

    # --force into a database holding data: a failed restore leaves its data and access as they were.
    assert await _cli("restore", str(file), dsn=replaced) == 0
    access = await _access(replaced)
    for kind, (tampered, message) in bad.items():
        capsys.readouterr()
        assert await _cli("restore", "--force", "--any-model", str(tampered), dsn=replaced) == 2, kind
        assert message in capsys.readouterr().err, kind
        assert await _rows(replaced) == original, kind
    assert await _cli("restore", "--force", str(truncated), dsn=replaced) == 2
    assert await _rows(replaced) == original and await _access(replaced) == access
    assert await _cli("restore", "--force", str(file), dsn=replaced) == 0
    assert await _rows(replaced) == original


async def test_a_backup_cut_short_or_changed_anywhere_is_refused_before_anything_is_restored(
    database_url: str, spare_databases: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pg_restore reads a custom archive by its offsets and never reached the last third of a small backup: a file
    cut there restored "completely" with exit 0. The header records the archive's SHA-256 and size, checked first;
    a backup made before they were recorded still restores."""
    await load(database_url, 12, seed=6)
    file = tmp_path / "good.backup"
    assert await _cli("backup", str(file), dsn=database_url) == 0
    whole = file.read_bytes()
    header = json.loads(whole.partition(b"\n")[0].split(b" ", 2)[2])
    archive_at = whole.index(b"\n") + 1
    assert header["archive_bytes"] == len(whole) - archive_at and len(header["archive_sha256"]) == 64
    tail_cut = tmp_path / "tail-cut.backup"
    tail_cut.write_bytes(whole[: len(whole) - (len(whole) - archive_at) // 3])
    flipped = tmp_path / "flipped.backup"
    middle = archive_at + (len(whole) - archive_at) // 2
    flipped.write_bytes(whole[:middle] + bytes([whole[middle] ^ 1]) + whole[middle + 1 :])
    target = spare_databases[0]
    for bad in (tail_cut, flipped):
        capsys.readouterr()
        assert await _cli("restore", str(bad), dsn=target) == 2, bad.name
        err = capsys.readouterr().err
        assert "the file is truncated or damaged; nothing was restored" in err and err.count("\n") == 1, err
        assert not await _schema_exists(target), bad.name
    legacy = _tampered(file, "legacy.backup", lambda h: [h.pop("archive_sha256"), h.pop("archive_bytes")])
    assert await _cli("restore", str(legacy), dsn=target) == 0
    assert await _rows(target) == await _rows(database_url)


def _export(dsn: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``export`` as its own process; its own peak memory (KiB), its stderr and the lines it wrote."""
    with out.open("wb") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "bench.peak_memory", "memory_service", "export", *args],
            env={**os.environ, "DATABASE_URL": dsn},
            cwd=Path(__file__).resolve().parent.parent,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return {"peak_kb": read_peak(result.stderr), "stderr": result.stderr, "lines": out.read_text().splitlines()}


async def test_export_then_ingest_round_trips_every_field(
    server: RunningServer, database_url: str, spare_databases: list[str], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    expiry = datetime.now(UTC) + timedelta(days=3, microseconds=123456)
    for i in range(40):
        metadata = struct_pb2.Struct()
        metadata.update({"source": f"doc-{i}", "nested": {"page": i, "ok": i % 2 == 0}, "list": ["a", i]})
        memory = memory_pb2.MemoryInput(
            scope=(memory_pb2.SCOPE_AGENT, memory_pb2.SCOPE_PROJECT, memory_pb2.SCOPE_GLOBAL)[i % 3],
            scope_id=(7, 11, 0)[i % 3],
            memory_type=(memory_pb2.MEMORY_TYPE_FACT, memory_pb2.MEMORY_TYPE_DECISION)[i % 2],
            key=f"key-{i}" if i % 4 else "",
            value=f'memory number {i} with ünïcode and "quotes"',
            importance=float(rng.random()),
            tags=[f"tag{i % 5}", "all"],
            metadata=metadata,
            embedding=rng.normal(size=384).astype(np.float32).tolist() if i % 2 else [],
        )
        if i % 2:
            memory.agent_id = 100 + i
        if i % 3 == 0:
            memory.expires_at.FromDatetime(expiry)
        await server.memory.Store(memory_pb2.StoreRequest(memory=memory))
    expired = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=7, value="gone soon")
    expired.ttl.FromMilliseconds(1)
    await server.memory.Store(memory_pb2.StoreRequest(memory=expired))
    await asyncio.sleep(0.05)

    exported = await asyncio.to_thread(_export, database_url, tmp_path / "all.jsonl", "--include-embeddings")
    assert len(exported["lines"]) == 40 and "exported 40 memories" in exported["stderr"]
    assert all("gone soon" not in line for line in exported["lines"])  # expired memories are not exported

    target = spare_databases[0]
    copy = await start_server(test_env(target))
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "memory_service", "ingest", str(tmp_path / "all.jsonl"), "--address", copy.address],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    finally:
        await stop_server(copy)
    original = await _rows(database_url)
    original = {k: v for k, v in original.items() if v[5] != "gone soon"}
    copied = await _rows(target)
    assert copied.keys() == original.keys()
    names = [c.strip().split("::")[0] for c in COLUMNS.split(",")]
    for identity, row in original.items():
        for name, want, got in zip(names, row, copied[identity], strict=True):
            assert got == want, (identity, name)  # keys, values, metadata, tags, importance, expiry, embeddings

    agent = await asyncio.to_thread(_export, database_url, tmp_path / "agent7.jsonl", "--scope", "agent:7")
    entries = [json.loads(line) for line in agent["lines"]]
    assert entries and all(e["scope"] == "agent" and e["scope_id"] == 7 for e in entries)
    assert all("embedding" not in e for e in entries)


async def test_export_streams_in_constant_memory(database_url: str, server_dsn: str, tmp_path: Path) -> None:
    """Ten times the rows, about the same peak memory: rows are written as the cursor hands them over. The peak is
    the export's own (bench.peak_memory): the rusage a parent reads would count the test runner's memory too."""
    small, large = await create_database(server_dsn), await create_database(server_dsn)
    try:
        for dsn, rows in ((small, 1000), (large, 10_000)):
            await apply_migrations(dsn)
            await load(dsn, rows, seed=rows)
        few = await asyncio.to_thread(_export, small, tmp_path / "few.jsonl", "--include-embeddings")
        many = await asyncio.to_thread(_export, large, tmp_path / "many.jsonl", "--include-embeddings")
        assert len(few["lines"]) == 1000 and len(many["lines"]) == 10_000
        size_many = (tmp_path / "many.jsonl").stat().st_size
        # Held in memory, the 10,000 rows would add about their file size (87 MB) to the peak (an export that
        # collected them before writing grew by 26 MB); streamed, the peak grows by under 1 MB.
        assert many["peak_kb"] - few["peak_kb"] < size_many / 1024 / 16, (few["peak_kb"], many["peak_kb"], size_many)
    finally:
        await drop_database(server_dsn, small)
        await drop_database(server_dsn, large)
