"""Backup, restore and export timings per 100k rows: the commands an operator runs, as processes.

    python -m bench.backup --rows 100000

Loads ``rows`` memories with 384-dimension embeddings (binary COPY, the ingest floor) and an ivfflat index, then
times ``memory-service backup``, ``restore`` into an empty database, ``export`` with and without embeddings, and
``ingest`` of the export into an empty database through a server. The floor is COPY itself: the load's own time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.datasets import clustered, copy_into_memories, records
from bench.harness import ServerProcess, database_server, fresh_database, print_table
from memory_service.storage import settings_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations

MODEL = "hash-ngram-v1"


def _command(dsn: str, *args: str, out: Path | None = None) -> float:
    started = time.perf_counter()
    env = {**os.environ, "DATABASE_URL": dsn}
    with open(out, "wb") if out else open(os.devnull, "wb") as handle:
        subprocess.run(
            [sys.executable, "-m", "memory_service", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    return time.perf_counter() - started


async def run(rows: int) -> None:
    with database_server() as server_dsn, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        async with (
            fresh_database(server_dsn) as source,
            fresh_database(server_dsn) as target,
            fresh_database(server_dsn) as ingested,
        ):
            await apply_migrations(source)
            corpus = clustered(rows, seed=3)
            conn = await asyncpg.connect(source)
            try:
                await init_connection(conn)
                async with conn.transaction():
                    await settings_sql.bind_embedding_model(conn, MODEL, 384)
                started = time.perf_counter()
                await copy_into_memories(conn, records(corpus, model=MODEL))
                load = time.perf_counter() - started
            finally:
                await conn.close()
            reindex = await asyncio.to_thread(_command, source, "reindex", "--force")
            backup_file = work / "memories.backup"
            backup = await asyncio.to_thread(_command, source, "backup", str(backup_file))
            sizes = {"backup": backup_file.stat().st_size}
            restore = await asyncio.to_thread(_command, target, "restore", str(backup_file))
            export = await asyncio.to_thread(_command, source, "export", out=work / "text.jsonl")
            full_file = work / "full.jsonl"
            export_full = await asyncio.to_thread(_command, source, "export", "--include-embeddings", out=full_file)
            sizes["text"] = (work / "text.jsonl").stat().st_size
            sizes["full"] = full_file.stat().st_size
            server = ServerProcess({"DATABASE_URL": ingested})
            try:
                server.wait_ready()
                ingest = await asyncio.to_thread(
                    _command, ingested, "ingest", "-q", str(full_file), "--address", server.address
                )
            finally:
                server.stop()
    per = 100_000 / rows
    mb = 1e6
    table = [
        ["COPY into memory.memories (floor)", load, load * per, ""],
        ["reindex --force (ivfflat build + calibration)", reindex, reindex * per, ""],
        ["backup", backup, backup * per, f"{sizes['backup'] / mb:.0f} MB"],
        ["restore into an empty database", restore, restore * per, ""],
        ["export (no embeddings)", export, export * per, f"{sizes['text'] / mb:.0f} MB"],
        ["export --include-embeddings", export_full, export_full * per, f"{sizes['full'] / mb:.0f} MB"],
        ["ingest of that export through a server", ingest, ingest * per, ""],
    ]
    print_table([f"{rows} rows", "seconds", "s per 100k rows", "size"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()
