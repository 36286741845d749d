"""What the call log and tracing add to each call: Get by id through gRPC, with each observation on and off.

    python -m bench.call_overhead --calls 3000

Starts in-process servers on one database, each configured differently, and calls them in turn (a, b, c, d, a,
...) from one client, one call at a time, so every variant sees the same machine:

* **plain**: text logs, no slow-call log, no tracing (the default);
* **slow-call log**: ``SLOW_CALL_SECONDS`` set high enough that no call is logged (what every call pays to be timed);
* **json access log**: ``LOG_FORMAT=json``, one access line per call (written to /dev/null here);
* **tracing**: ``OTEL_EXPORTER_OTLP_ENDPOINT`` at a local receiver that accepts and drops the spans.

The floor is the plain server; the table shows each variant's median and p99, and its median less the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import sys
import tempfile
import threading
from typing import Any

from grpc import aio

from bench.harness import database_server, fresh_database, latencies, percentile_ms, print_table
from memory_service.app.server import MemoryServer
from memory_service.config.settings import Settings
from memory_service.observability import logs
from memory_service.v1 import memory_pb2, memory_pb2_grpc


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _env(dsn: str, data_dir: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "off",
        "DATABASE_POOL_MIN": "2",
        "DATABASE_POOL_MAX": "4",
        "MEMORY_SERVICE_DATA_DIR": data_dir,
        **extra,
    }


async def run(calls: int) -> None:
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    variants = {
        "plain": {},
        "slow-call log": {"SLOW_CALL_SECONDS": "3600"},
        "json access log": {"LOG_FORMAT": "json"},
        "tracing": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}"},
    }
    with database_server() as server_dsn, tempfile.TemporaryDirectory() as data_dir:
        async with fresh_database(server_dsn) as dsn:
            servers = []
            for extra in variants.values():
                server = MemoryServer(Settings.from_env(_env(dsn, data_dir, **extra)))
                await server.start()
                servers.append(server)
            channels = [aio.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
            stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in channels]
            memory = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="a memory to get")
            stored = await stubs[0].Store(memory_pb2.StoreRequest(memory=memory))
            request = memory_pb2.GetRequest(id=stored.id)

            def get(stub: memory_pb2_grpc.MemoryServiceStub) -> Any:
                async def call(i: int) -> object:
                    return await stub.Get(request)

                return call

            await latencies(*(get(s) for s in stubs), count=200)  # warm up connections and statement caches
            samples = await latencies(*(get(s) for s in stubs), count=calls)
            for channel in channels:
                await channel.close()
            for server in servers:
                await server.stop(grace=1)
    sink.shutdown()
    floor = percentile_ms(samples[0], 50)
    rows = [
        [name, percentile_ms(s, 50), percentile_ms(s, 99), (percentile_ms(s, 50) - floor) * 1000]
        for name, s in zip(variants, samples, strict=True)
    ]
    print_table(["Get by id", "median ms", "p99 ms", "median - plain (us)"], rows)


def main() -> None:
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the JSON access log's destination for the whole run
    logs.configure("INFO", "json")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(run(args.calls))


if __name__ == "__main__":
    main()
