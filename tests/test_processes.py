"""SERVER_PROCESSES: several server processes on one port, started, spread over, and stopped as one server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from grpc import aio

from memory_service.config.settings import Settings
from memory_service.errors import ConfigError
from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import test_env
from tests.processes import ServerProcess

_WORKER = re.compile(r"server process (\d+) \(pid (\d+)\)")
_METRICS = re.compile(r"serving metrics on [^:]+:(\d+)")
_GRPC = re.compile(r"serving gRPC on [^:]+:(\d+)")


def _found(process: ServerProcess, pattern: re.Pattern[str], count: int, timeout: float = 60.0) -> list[str]:
    """The first group of ``pattern`` in ``count`` log lines, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m.group(1) for line in list(process.log) if (m := pattern.search(line)) is not None]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _worker_pids(process: ServerProcess) -> list[int]:
    return [int(m.group(2)) for line in list(process.log) if (m := _WORKER.search(line)) is not None]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _started_calls(metrics_port: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total{") and 'grpc_method="Stats"' in line
    )


async def test_processes_share_one_port_split_the_calls_and_stop_together(database_url: str) -> None:
    process = ServerProcess(test_env(database_url, SERVER_PROCESSES="2"))
    try:
        await asyncio.to_thread(process.wait_serving)
        ports = await asyncio.to_thread(_found, process, _GRPC, 2)
        metrics_ports = await asyncio.to_thread(_found, process, _METRICS, 2)
        assert len(ports) == 2 and ports[0] == ports[1], process.log
        assert len(set(metrics_ports)) == 2, "each process serves its own /metrics"
        pids = _worker_pids(process)
        assert len(pids) == 2 and process.process.pid not in pids
        # A new connection goes to either process (the kernel's choice): with enough of them, both serve.
        for _ in range(40):
            async with aio.insecure_channel(process.address) as channel:
                await memory_pb2_grpc.MemoryServiceStub(channel).Stats(memory_pb2.StatsRequest(), timeout=30)
        counts = [await asyncio.to_thread(_started_calls, port) for port in metrics_ports]
        assert sum(counts) == 40 and min(counts) > 0, counts

        process.terminate()
        assert await asyncio.to_thread(process.wait, 60) == 0
        assert not _wait_gone(pids, 5)
        assert sum(1 for line in process.log if "app.server: stopped" in line) == 2
    finally:
        process.stop()


async def test_workers_stop_when_the_parent_dies(database_url: str) -> None:
    process = ServerProcess(test_env(database_url, SERVER_PROCESSES="2"))
    try:
        await asyncio.to_thread(process.wait_serving)
        await asyncio.to_thread(_found, process, _GRPC, 2)
        pids = _worker_pids(process)
        assert len(pids) == 2
        process.process.send_signal(signal.SIGKILL)
        process.wait(10)
        # Their stdin, the parent's pipe, closes: each drains and exits as on SIGTERM.
        assert not await asyncio.to_thread(_wait_gone, pids, 30)
    finally:
        process.stop()


async def test_a_worker_that_dies_takes_the_server_down(database_url: str) -> None:
    process = ServerProcess(test_env(database_url, SERVER_PROCESSES="2"))
    try:
        await asyncio.to_thread(process.wait_serving)
        await asyncio.to_thread(_found, process, _GRPC, 2)
        pids = _worker_pids(process)
        os.kill(pids[0], signal.SIGKILL)
        assert await asyncio.to_thread(process.wait, 60) == 1
        assert not _wait_gone(pids, 5)
    finally:
        process.stop()


def test_server_processes_default_to_the_cores_and_are_checked() -> None:
    assert Settings.from_env({}).server_processes == (os.cpu_count() or 1)
    assert Settings.from_env({"SERVER_PROCESSES": "3"}).server_processes == 3
    with pytest.raises(ConfigError, match="SERVER_PROCESSES"):
        Settings.from_env({"SERVER_PROCESSES": "0"})


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_a_second_server_on_a_port_another_holds_stops_with_one_line(database_url: str, processes: str) -> None:
    """Workers bind with SO_REUSEPORT, and so did the port's check: a second multi-process server on a running one's
    port started and shared its connections unnoticed. A single process failed inside gRPC, whose core logged a line
    of its own before the service's."""
    first = ServerProcess(test_env(database_url, SERVER_PROCESSES="2", METRICS_PORT="off"))
    try:
        await asyncio.to_thread(first.wait_serving)
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "memory_service", "serve"],
            env={**os.environ, **test_env(database_url, SERVER_PROCESSES=processes, METRICS_PORT="off"),
                 "GRPC_PORT": str(first.port)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if "error" in line.lower() or "E1" in line[:3]]
        assert len(lines) == 1 and "cannot listen on" in lines[0] and "GRPC_PORT" in lines[0], second.stderr
        assert "add_port" not in second.stderr
    finally:
        first.stop()
