"""``backup`` under write load and ``restore`` (every acknowledged row back, searches answering the same, the checks
a restore makes), and ``export`` then ``ingest`` into another database round-tripping every field."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from google.protobuf import struct_pb2

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
        copy = await start_server(test_env(quiet))
        try:
            assert await _searches(copy) == await _searches(server)
        finally:
            await stop_server(copy)
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await stop_server(server)


async def _rows_exist(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT to_regclass('memory.memories') IS NOT NULL"))
    finally:
        await conn.close()


async def test_restore_refuses_a_backup_of_a_newer_schema(database_url: str, tmp_path: Path) -> None:
    file = tmp_path / "newer.backup"
    assert await _cli("backup", str(file), dsn=database_url) == 0
    data = file.read_bytes()
    line, _, archive = data.partition(b"\n")
    header = json.loads(line.split(b" ", 2)[2])
    header["migrations"].append("9999_from_the_future.sql")
    file.write_bytes(b"MEMORY-SERVICE-BACKUP 1 " + json.dumps(header).encode() + b"\n" + archive)
    assert await _cli("restore", str(file), dsn=database_url) == 2


def _export(dsn: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``export`` as its own process; its peak memory (KB) and stderr with the lines."""
    with out.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "memory_service", "export", *args],
            env={**os.environ, "DATABASE_URL": dsn},
            stdout=handle,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its rusage
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return {"peak_kb": usage.ru_maxrss, "stderr": stderr, "lines": out.read_text().splitlines()}


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
    """Ten times the rows, about the same peak memory: rows are written as the cursor hands them over."""
    small, large = await create_database(server_dsn), await create_database(server_dsn)
    try:
        for dsn, rows in ((small, 1000), (large, 10_000)):
            await apply_migrations(dsn)
            await load(dsn, rows, seed=rows)
        few = await asyncio.to_thread(_export, small, tmp_path / "few.jsonl", "--include-embeddings")
        many = await asyncio.to_thread(_export, large, tmp_path / "many.jsonl", "--include-embeddings")
        assert len(few["lines"]) == 1000 and len(many["lines"]) == 10_000
        size_many = (tmp_path / "many.jsonl").stat().st_size
        # Held in memory, the 10,000 rows would add their file size (tens of MB) to the peak; streamed, the peak
        # grows by far less than that.
        assert many["peak_kb"] - few["peak_kb"] < size_many / 1024 / 4, (few["peak_kb"], many["peak_kb"], size_many)
    finally:
        await drop_database(server_dsn, small)
        await drop_database(server_dsn, large)
