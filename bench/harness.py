"""What every benchmark needs: a database, a server process, timers and a table printer.

The database is BENCH_DATABASE_URL's server when set, otherwise an embedded PostgreSQL in a temporary
directory. The server runs as its own process, as in production, so the client's Python does not share its GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
from grpc import aio

from bench.datasets import load_for_index
from memory_service.storage.database import init_connection
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.storage.migrations import apply_migrations

_PORT_LINE = re.compile(r"serving gRPC on [^:]+:(\d+)")


def server_processes(env: dict[str, str]) -> int:
    """How many processes the service started with ``env`` runs: ``SERVER_PROCESSES``, or as its settings default,
    one per core."""
    return int(env.get("SERVER_PROCESSES") or os.cpu_count() or 1)


def spread_channels(address: str, count: int) -> list[aio.Channel]:
    """``count`` channels with a TCP connection each. gRPC channels to one address share one connection unless told
    otherwise (its global subchannel pool), and one connection reaches one of the ``SERVER_PROCESSES`` processes
    (SO_REUSEPORT spreads connections, not calls): a throughput test must use several, as several clients would."""
    return [aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


@contextlib.contextmanager
def database_server() -> Iterator[str]:
    """DSN of a PostgreSQL server's maintenance database."""
    if os.environ.get("BENCH_DATABASE_URL"):
        yield os.environ["BENCH_DATABASE_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="ms-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp))
        embedded.start()
        try:
            yield embedded.dsn
        finally:
            embedded.stop(force=True)


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    name = "bench_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(server_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(server_dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@contextlib.asynccontextmanager
async def loaded_for_index(rows: list[tuple[object, ...]]) -> AsyncIterator[asyncpg.Connection]:
    """A connection (with the service's codecs: vectors decode to numpy arrays) to a new migrated database that
    ``rows`` were copied into as the index benchmarks start (``bench.datasets.load_for_index``); the database is
    dropped afterwards."""
    with database_server() as server:
        async with fresh_database(server) as dsn:
            await apply_migrations(dsn)
            conn = await asyncpg.connect(dsn)
            try:
                await init_connection(conn)
                await load_for_index(conn, rows)
                yield conn
            finally:
                await conn.close()


def reindex(env: dict[str, str]) -> tuple[str, float]:
    """``memory-service reindex --force`` (build and calibrate the vector index) as its own process: what it said
    and how long it took. A running server picks the new index up at its next refresh (a Stats call refreshes)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "reindex", "--force"],
        env={**os.environ, "LOG_LEVEL": "WARNING", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip(), time.perf_counter() - started


class ServerProcess:
    """``memory-service serve`` (or ``command``) on a free loopback port; ``address`` is known once it logs that it
    serves."""

    def __init__(self, env: dict[str, str], command: Sequence[str] = ("-m", "memory_service", "serve")) -> None:
        full_env = {
            **os.environ,
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": "0",
            "METRICS_PORT": "off",
            # INFO carries the port line; after start-up the service logs little at INFO.
            "LOG_LEVEL": "INFO",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, *command],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0
        self.serving = 0
        """Processes that have logged that they serve (each of ``SERVER_PROCESSES`` logs it)."""
        self._ready = threading.Event()
        self._log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.append(line)
            if (match := _PORT_LINE.search(line)) is not None:
                self.port = int(match.group(1))
                self.serving += 1
                self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0, *, processes: int = 1) -> None:
        """Until ``processes`` server processes serve: the first starts alone, the others after it, and a client
        that connects before they listen reaches the first one only."""
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not start:\n" + "".join(self._log[-20:]))
        deadline = time.monotonic() + timeout
        while self.serving < processes:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.serving} of {processes} processes serve:\n" + "".join(self._log[-20:]))
            time.sleep(0.1)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line the process logged containing ``text``, once it has."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self._log):
                if text in line:
                    return line.strip()
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"no {text!r} in the log:\n" + "".join(self._log[-20:]))
            time.sleep(0.2)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory of the process (Linux), MB: now (``VmRSS``) or at its peak (``VmHWM``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.process.stderr is not None:
            self.process.stderr.close()


def percentile_ms(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


async def latencies(*calls: Callable[[int], Awaitable[object]], count: int) -> list[list[float]]:
    """One caller, one call at a time: seconds per call, for each of ``calls``.

    The calls alternate, so every path sees the same machine: on a shared two-core host, timing one path after the
    other mostly measures what else was running at the time. Each round starts one path later (a, b, c; b, c, a;
    ...): a path always run first, or always right after the same other one, is timed in a state of the machine's
    caches and schedulers that the others never see (a fixed order put 0.4 ms on the first of four gRPC paths whose
    p50s agree to 0.07 ms when rotated)."""
    samples: list[list[float]] = [[] for _ in calls]
    order = list(zip(calls, samples, strict=True))
    for i in range(count):
        shift = i % len(order)
        for call, bucket in order[shift:] + order[:shift]:
            started = time.perf_counter()
            await call(i)
            bucket.append(time.perf_counter() - started)
    return samples


async def throughput(call: Callable[[int], Awaitable[object]], *, in_flight: int, total: int) -> float:
    """Calls per second with ``in_flight`` callers sharing ``total`` calls."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return total / (time.perf_counter() - started)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, so the output pastes straight into docs/benchmarks.md."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)
