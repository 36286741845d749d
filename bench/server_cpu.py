"""The server's own CPU time per call, Get and unfiltered VECTOR: a per-call cost the wall clock's noise does not hide.

    python -m bench.server_cpu --rows 20000 --index hnsw --calls 2000 --rounds 2
    python -m bench.server_cpu --dsn DSN --baseline /tmp/main-checkout   # this tree against another, alternately

Loads the ``hard`` corpus and builds the index as ``bench.overhead`` does (or measures ``--dsn`` as it is), starts one
server process with the index check held off (``INDEX_CHECK_INTERVAL=1h``, so no calibration runs meanwhile), and
for each call kind sends ``--calls`` calls one at a time after 200 untimed ones, reading the server's user + system
CPU time from ``/proc/PID/stat`` before and after. Every search request names the ``probes`` of the first answer
(or ``--probes``: a warm setting rather than a cold build's), so a search costs the same throughout.

CPU time per call still moves with what else the machine runs (shared caches and cores), by a third from one
minute to the next on a busy machine. So servers compared are measured in the same run, alternately, in blocks of
100 calls: ``--baseline`` adds the service of another checkout (its directory first on ``PYTHONPATH``), ``--floor``
the bare floor (``bench.floor`` on uvloop, the service's event loop): the least grpc.aio and asyncpg cost of the
same calls. The last column is each server's CPU while idle (background loops), per second.

``--profile SECONDS`` then records this tree's server under VECTOR calls with py-spy (``--native`` for native
frames too) into a raw collapsed-stack file; ``--cprofile FILE`` runs it under cProfile instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpc import aio

from bench.harness import ServerProcess, print_table
from bench.overhead import prepare
from bench.scale import service_env
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
BLOCK = 100
_TICKS = os.sysconf("SC_CLK_TCK")
Call = Callable[[int], Awaitable[object]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Target:
    """One server under measurement, with a stub of its own and its CPU time summed over the timed calls."""

    def __init__(self, name: str, server: ServerProcess) -> None:
        self.name = name
        self.server = server
        self.channel: aio.Channel | None = None
        self.stub: Any = None
        self.probes = 0
        self.plan = ""
        self.cpu: dict[str, float] = {}
        self.idle_ms_per_s = 0.0

    async def start(self, first: memory_pb2.SearchRequest) -> None:
        await asyncio.to_thread(self.server.wait_ready)
        self.channel = aio.insecure_channel(self.server.address)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)
        answer = await self.stub.Search(first)
        self.probes, self.plan = answer.probes, answer.plan

    async def timed(self, kind: str, call: Call, start: int) -> None:
        before = cpu_seconds(self.server.process.pid)
        for i in range(start, start + BLOCK):
            await call(i)
        self.cpu[kind] = self.cpu.get(kind, 0.0) + cpu_seconds(self.server.process.pid) - before

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await asyncio.to_thread(self.server.stop)


def calls(target: Target, vectors: Any, ids: list[int]) -> dict[str, Call]:
    def get(i: int) -> Awaitable[object]:
        return target.stub.Get(memory_pb2.GetRequest(id=ids[i % len(ids)]))  # type: ignore[no-any-return]

    def search(i: int) -> Awaitable[object]:
        request = memory_pb2.SearchRequest(
            mode=memory_pb2.SEARCH_MODE_VECTOR,
            top_k=K,
            query_embedding=vectors[i % len(vectors)].tolist(),
            probes=target.probes or None,
        )
        return target.stub.Search(request)  # type: ignore[no-any-return]

    return {"Get": get, "VECTOR": search}


def servers(dsn: str, args: argparse.Namespace) -> list[Target]:
    env = service_env(dsn, args.index, INDEX_CHECK_INTERVAL="1h")
    here = ("-m", "memory_service", "serve")
    if args.cprofile:
        # The service under cProfile: it writes the profile when it stops (SIGTERM, drained as always).
        script = "import cProfile; from memory_service.cli.main import main; cProfile.run('main([\"serve\"])', {!r})"
        here = ("-c", script.format(args.cprofile))
    targets = [Target("this tree", ServerProcess(env, here))]
    if args.baseline:
        path = os.pathsep.join([str(Path(args.baseline).resolve()), os.environ.get("PYTHONPATH", "")])
        # -P: no current directory ahead of PYTHONPATH, which would import this tree's package instead.
        baseline = ServerProcess({**env, "PYTHONPATH": path}, ("-P", "-m", "memory_service", "serve"))
        targets.append(Target(f"baseline {args.baseline}", baseline))
    if args.floor:
        floor = ("-c", "import uvloop; from bench.floor import serve; uvloop.run(serve())")
        targets.append(Target("floor (uvloop)", ServerProcess(env, floor)))
    return targets


async def measure(dsn: str, args: argparse.Namespace, vectors: Any, ids: list[int]) -> list[list[object]]:
    targets = servers(dsn, args)
    try:
        # With --probes the first answer already runs at it, so the plan the table shows is the one timed.
        first = memory_pb2.SearchRequest(
            mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=K, query_embedding=vectors[0].tolist(), probes=args.probes or None
        )
        for target in targets:
            await target.start(first)
        for target in targets[1:]:
            # Every server scans at the same setting: a call's CPU grows with how long it waits for PostgreSQL (the
            # process's caches go cold meanwhile), so a floor at its default ef_search would look cheaper than it is.
            target.probes = targets[0].probes
        for kind in ("Get", "VECTOR"):
            by_target = [calls(t, vectors, ids)[kind] for t in targets]
            for call in by_target:
                for i in range(200):
                    await call(i)
            for block in range(args.calls // BLOCK):
                # Alternate the servers block by block, and which goes first, so they share the machine's moods.
                order = list(zip(targets, by_target, strict=True))
                for target, call in order if block % 2 == 0 else reversed(order):
                    await target.timed(kind, call, block * BLOCK)
        for target in targets:
            before = cpu_seconds(target.server.process.pid)
            await asyncio.sleep(3)
            target.idle_ms_per_s = (cpu_seconds(target.server.process.pid) - before) * 1000 / 3
        if args.profile:
            await profile(targets[0], calls(targets[0], vectors, ids)["VECTOR"], args)
        count = (args.calls // BLOCK) * BLOCK
        return [
            [
                t.name,
                f"{t.cpu['Get'] * 1000 / count:.3f}",
                f"{t.cpu['VECTOR'] * 1000 / count:.3f}",
                f"{t.plan} {t.probes or ''}".strip(),
                f"{t.idle_ms_per_s:.1f}",
            ]
            for t in targets
        ]
    finally:
        for target in targets:
            await target.close()


async def profile(target: Target, search: Call, args: argparse.Namespace) -> None:
    """py-spy on the server while searches run one at a time; idle samples left out (py-spy's default)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--pid", str(target.server.process.pid), "--duration", str(args.profile)]
    # Native frames need the target stopped while its stack is read; Python-only sampling need not stop it.
    command += ["--rate", "250", "--native" if args.native else "--nonblocking"]
    command += ["--format", "raw", "--output", args.profile_out]
    spy = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    i = 0
    while spy.returncode is None:
        await search(i)
        i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(spy.wait(), 0.0001)
    _, err = await spy.communicate()
    print(f"py-spy over {i} searches: {err.decode().strip()[-300:]} -> {args.profile_out}")


async def run(args: argparse.Namespace) -> None:
    async with contextlib.AsyncExitStack() as stack:
        prepared = await prepare(stack, args)
        table_rows = prepared.table_rows
        load = os.getloadavg()[0]
        rows = await measure(prepared.dsn, args, prepared.vectors, prepared.ids)
    loads = f"{load:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"\n{table_rows} rows of hard, VECTOR_INDEX={args.index}, load average {loads}\n")
    headers = ["server", "Get ms CPU a call", "VECTOR ms CPU a call", "VECTOR plan", "idle ms CPU a second"]
    print_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--index", default="hnsw", choices=("ivfflat", "hnsw"))
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per kind and server")
    parser.add_argument("--dsn", help="measure on this database as it is (loaded and indexed) instead of a new one")
    parser.add_argument("--baseline", help="also measure the service of this checkout (a directory), alternately")
    parser.add_argument("--floor", action="store_true", help="also measure bench.floor on uvloop, alternately")
    parser.add_argument(
        "--probes", type=int, default=0, help="ef_search (or probes) every request names (default: the first answer's)"
    )
    parser.add_argument("--profile", type=int, default=0, help="then py-spy this tree's server for this many seconds")
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--profile-out", default="/tmp/server-profile.txt")
    parser.add_argument("--cprofile", help="run this tree's service under cProfile, writing its stats to this file")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
