"""Backup, restore and export timings per 100k rows: the commands an operator runs, as processes.

    python -m bench.backup --rows 100000

Loads ``rows`` memories with 384-dimension embeddings (binary COPY, the ingest floor) and an ivfflat index, then
times ``memory-service backup``, ``restore`` into an empty database, ``export`` with and without embeddings, and
``ingest`` of the export into an empty database through a server. The floor is COPY itself: the load's own time.
Each command's peak resident memory shows that export streams: it stays flat as the rows grow.
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
from bench.peak_memory import read_peak
from memory_service.storage import settings_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations

MODEL = "hash-ngram-v1"


def _command(dsn: str, *args: str, out: Path | None = None) -> tuple[float, float]:
    """Seconds the command took as a process of its own, and its own peak resident memory in MB."""
    started = time.perf_counter()
    env = {**os.environ, "DATABASE_URL": dsn}
    with open(out, "wb") if out else open(os.devnull, "wb") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "bench.peak_memory", "memory_service", *args],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        )
    return time.perf_counter() - started, read_peak(result.stderr) / 1024


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
        ["COPY into memory.memories (floor)", load, load * per, "", ""],
        _row("reindex --force (ivfflat build + calibration)", reindex, per),
        _row("backup", backup, per, sizes["backup"] / mb),
        _row("restore into an empty database", restore, per),
        _row("export (no embeddings)", export, per, sizes["text"] / mb),
        _row("export --include-embeddings", export_full, per, sizes["full"] / mb),
        _row("ingest of that export through a server", ingest, per),
    ]
    print_table([f"{rows} rows", "seconds", "s per 100k rows", "size", "peak RSS"], table)


def _row(name: str, measured: tuple[float, float], per: float, size_mb: float | None = None) -> list[object]:
    seconds, peak_mb = measured
    return [name, seconds, seconds * per, "" if size_mb is None else f"{size_mb:.0f} MB", f"{peak_mb:.0f} MB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()
