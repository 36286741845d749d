"""Where the CPU of a loaded machine goes per VECTOR call: the servers, PostgreSQL and the client, by configuration.

    python -m bench.cpu_split --rows 100000 --configs 'SERVER_PROCESSES=1' 'SERVER_PROCESSES=2'
    python -m bench.cpu_split --dsn DSN --configs 'SERVER_PROCESSES=2' 'SERVER_PROCESSES=2 SEARCH_RECALL_SAMPLE=0'

Calls/s at 16 in flight (each caller its own connection, as in ``bench.peers``) on two cores tell little by themselves:
the client, the server processes and PostgreSQL share them, and a cost anywhere lowers the rate. This run splits the
CPU time the machine spent during the timed calls by process (``/proc/PID/stat`` of every process: PostgreSQL's
backends and background workers, the service's processes, this client, the rest), per call. Each configuration
(environment variables for ``memory-service serve``, space-separated) gets a fresh server, its own warm-up and
``--total`` timed calls, every request at one ef_search (``--probes``) so that a recalibration meanwhile changes
nothing; the configurations take turns for ``--rounds`` rounds, since one run to the next moves by 5-10%.
Background work a configuration enables (index care, recall checks, text index follow-up) is counted where it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from bench.harness import ServerProcess, print_table, server_processes, spread_channels, throughput
from bench.overhead import prepare
from bench.scale import service_env
from bench.server_cpu import cpu_seconds
from memory_service.v1 import memory_pb2, memory_pb2_grpc

IN_FLIGHT = 16
GROUPS = ("service", "postgres", "client", "other")


def cpu_by_group() -> dict[str, float]:
    """CPU seconds every process on the machine has used so far, summed by group (a process that ended since is
    missing from both ends of a difference only if it both started and ended between them)."""
    totals = dict.fromkeys(GROUPS, 0.0)
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            used = cpu_seconds(int(entry.name))
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(entry.name) == me:
            totals["client"] += used
        elif b"postgres" in command:
            totals["postgres"] += used
        elif b"memory_service" in command:
            totals["service"] += used
        else:
            totals["other"] += used
    return totals


def parse_config(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


async def measure(dsn: str, config: str, requests: list[Any], args: argparse.Namespace) -> list[object]:
    env = service_env(dsn, args.index, **parse_config(config))
    server = ServerProcess(env)
    channels = []
    try:
        await asyncio.to_thread(server.wait_ready, processes=server_processes(env))
        await asyncio.sleep(args.settle)  # start-up work (text index load, first index check) out of the window
        channels = spread_channels(server.address, IN_FLIGHT)
        stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in channels]

        async def call(i: int) -> object:
            return await stubs[i % IN_FLIGHT].Search(requests[i % len(requests)])

        await throughput(call, in_flight=IN_FLIGHT, total=1000)
        before, started = cpu_by_group(), time.perf_counter()
        rate = await throughput(call, in_flight=IN_FLIGHT, total=args.total)
        after, wall = cpu_by_group(), time.perf_counter() - started
        per_call = [(after[g] - before[g]) / args.total * 1000 for g in GROUPS]
        idle = (os.cpu_count() or 1) * wall / args.total * 1000 - sum(per_call)
        return [config, rate, *per_call, sum(per_call), max(idle, 0.0)]
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.to_thread(server.stop)


async def run(args: argparse.Namespace) -> None:
    async with contextlib.AsyncExitStack() as stack:
        prepared = await prepare(stack, args)
        requests = [
            memory_pb2.SearchRequest(
                mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=10, query_embedding=v.tolist(), probes=args.probes
            )
            for v in prepared.vectors
        ]
        rows = []
        for round_ in range(args.rounds):
            for config in args.configs:
                row = await measure(prepared.dsn, config, requests, args)
                print(f"round {round_ + 1}: {config}: {row[1]:.0f} calls/s", flush=True)
                rows.append(row)
    print(
        f"\n{prepared.table_rows} rows of hard, unfiltered VECTOR at ef_search/probes {args.probes}, "
        f"{IN_FLIGHT} in flight, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}\n"
    )
    print_table(
        [
            "configuration",
            "calls/s",
            "service ms CPU a call",
            "PostgreSQL",
            "client",
            "other",
            "all",
            "idle ms a call",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--index", default="hnsw", choices=("ivfflat", "hnsw"))
    parser.add_argument("--dsn", help="measure on this database as it is (loaded and indexed) instead of a new one")
    parser.add_argument("--configs", nargs="+", default=["SERVER_PROCESSES=1", "SERVER_PROCESSES=2"])
    parser.add_argument("--probes", type=int, default=32, help="ef_search (or probes) every request names")
    parser.add_argument("--total", type=int, default=6000, help="timed calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between start-up and the warm-up")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
