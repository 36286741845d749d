"""Lease benchmark: acquire + release cycles through gRPC, against the same transactions through plain asyncpg.

    python -m bench.leases --cycles 4000 --in-flight 4 16 64

The "sql" rows run the very functions the service runs (memory_service.storage.leases_sql.acquire / release: one
statement each, which takes the advisory lock) over an asyncpg pool configured as the service configures its own,
in this process. The "grpc" rows call a ``memory-service serve`` child process. The "grpc floor" rows make two
empty calls (Health.Check) per cycle: what the gRPC stack alone costs on this machine, with no database work.
Each worker cycles a name of its own, so the numbers measure the cost of a grant and a release, not contention.
The CPU columns are milliseconds of CPU per cycle spent by this process (the client) and by the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import ServerProcess, database_server, fresh_database, print_table
from memory_service.leases.manager import lock_key, owner_key
from memory_service.storage import leases_sql
from memory_service.storage.database import Database
from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import lease_pb2, lease_pb2_grpc

NAMESPACE = "bench"
TTL = timedelta(seconds=30)
Cycle = Callable[[str], Awaitable[None]]


async def sql_cycle(pool: asyncpg.Pool, name: str) -> None:
    """One acquire and one release, each one statement on a pooled connection, as the service runs them."""
    owner = "holder:" + name
    async with pool.acquire() as conn:
        result = await leases_sql.acquire(
            conn,
            namespace=NAMESPACE,
            name=name,
            lock_key=lock_key(NAMESPACE, name),
            owner_key=owner_key(owner),
            lease_id=uuid.uuid4(),
            holder=name,
            owner=owner,
            ttl=TTL,
            quota=1000,
            request_id=None,
        )
    assert result.lease is not None, result
    async with pool.acquire() as conn:
        await leases_sql.release(conn, result.lease.lease_id)


async def grpc_cycle(stub: lease_pb2_grpc.LeaseServiceStub, name: str) -> None:
    ttl = duration_pb2.Duration(seconds=int(TTL.total_seconds()))
    response = await stub.Acquire(lease_pb2.AcquireRequest(namespace=NAMESPACE, name=name, holder=name, ttl=ttl))
    assert response.acquired, response
    await stub.Release(lease_pb2.ReleaseRequest(lease_id=response.lease.lease_id))


async def floor_cycle(stub: health_pb2_grpc.HealthStub, name: str) -> None:
    await stub.Check(health_pb2.HealthCheckRequest())
    await stub.Check(health_pb2.HealthCheckRequest())


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(cycle: Cycle, *, in_flight: int, cycles: int, server_pid: int | None) -> tuple[float, list[object]]:
    """cycles/s, and the row [cycles/s, p50 ms, p99 ms, client CPU ms/cycle, server CPU ms/cycle]."""
    names = [f"worker-{i}" for i in range(in_flight)]
    for name in names:  # warm up connections and prepared statements
        await cycle(name)
    counter = iter(range(cycles))
    samples: list[float] = []

    async def worker(name: str) -> None:
        for _ in counter:
            started = time.perf_counter()
            await cycle(name)
            samples.append(time.perf_counter() - started)

    client_cpu, server_cpu = _cpu_seconds(None), _cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker(name) for name in names))
    elapsed = time.perf_counter() - started
    client_cpu = _cpu_seconds(None) - client_cpu
    server_cpu = _cpu_seconds(server_pid) - server_cpu if server_pid else 0.0
    samples.sort()
    return cycles / elapsed, [
        cycles / elapsed,
        1000 * samples[len(samples) // 2],
        1000 * samples[int(len(samples) * 0.99)],
        1000 * client_cpu / cycles,
        1000 * server_cpu / cycles if server_pid else "-",
    ]


async def run(args: argparse.Namespace) -> None:
    rows: list[list[object]] = []
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            await apply_migrations(dsn)
            db = await Database.connect(dsn, min_size=args.pool, max_size=args.pool)
            try:
                sql = {n: await measure(lambda name: sql_cycle(db.pool, name), in_flight=n, cycles=args.cycles,
                                        server_pid=None) for n in args.in_flight}  # fmt: skip
            finally:
                await db.close()
            pool = str(args.pool)
            grpc_rates: dict[int, float] = {}
            server = ServerProcess({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": pool, "DATABASE_POOL_MAX": pool})
            try:
                await asyncio.to_thread(server.wait_ready)
                pid = server.process.pid
                async with aio.insecure_channel(server.address) as channel:
                    leases = lease_pb2_grpc.LeaseServiceStub(channel)
                    health = health_pb2_grpc.HealthStub(channel)
                    for n in args.in_flight:
                        grpc_rate, grpc = await measure(
                            lambda name: grpc_cycle(leases, name), in_flight=n, cycles=args.cycles, server_pid=pid
                        )
                        _, floor = await measure(
                            lambda name: floor_cycle(health, name), in_flight=n, cycles=args.cycles, server_pid=pid
                        )
                        sql_rate, sql_row = sql[n]
                        grpc_rates[n] = grpc_rate
                        rows.append(["sql (asyncpg)", n, *sql_row, 1.0])
                        rows.append(["grpc", n, *grpc, grpc_rate / sql_rate])
                        rows.append(["grpc floor (2 empty calls)", n, *floor, "-"])
            finally:
                await asyncio.to_thread(server.stop)
            bare = ServerProcess({"DATABASE_URL": dsn, "FLOOR_POOL": pool}, command=("-m", "bench.floor"))
            try:
                await asyncio.to_thread(bare.wait_ready)
                async with aio.insecure_channel(bare.address) as channel:
                    leases = lease_pb2_grpc.LeaseServiceStub(channel)
                    for n in args.in_flight:
                        bare_rate, bare_row = await measure(
                            lambda name: grpc_cycle(leases, name), in_flight=n, cycles=args.cycles,
                            server_pid=bare.process.pid,
                        )  # fmt: skip
                        sql_rate, _ = sql[n]
                        service_rate = grpc_rates[n]
                        rows.append(["bare grpc.aio + same SQL", n, *bare_row, bare_rate / sql_rate])
                        rows.append([f"  service / bare at {n}", n, service_rate / bare_rate, "", "", "", "", ""])
            finally:
                await asyncio.to_thread(bare.stop)
    print_table(
        ["path", "in flight", "cycles/s", "p50 ms", "p99 ms", "client CPU ms", "server CPU ms", "grpc / sql"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=4000, help="acquire+release cycles per row")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[4, 16, 64], help="concurrent workers")
    parser.add_argument("--pool", type=int, default=8, help="database connections, for both paths")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
