"""The CLI's exit codes, through the real command against a real server: a server's refusal exits 1 (125 for
`lease run`, whose other codes are the command's own), a reader that closes stdout early (`| head`) ends a command
quietly with 141, and a start-up error quoting a multi-line exception is still one line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from memory_service.tenants.types import Permission
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.tenancy import create_token
from tests.test_cli import cli, one_line
from tests.test_leases import acquire_request

ADMIN = "cli-exits-admin-token-0123456789"
EX_PIPE = 141


@pytest.fixture
async def tenant(database_url: str) -> AsyncIterator[tuple[RunningServer, str]]:
    """A server with auth on, and a read-only token granted agent:1 and the lease namespace `granted`."""
    secret = await create_token(
        database_url, "reader", ["agent:1"], permissions=frozenset({Permission.READ}), leases=("granted",)
    )
    running = await start_server(test_env(database_url, AUTH_TOKENS=ADMIN))
    yield running, secret
    await stop_server(running)


async def test_lease_run_exits_125_and_lease_list_1_when_the_server_refuses(
    tenant: tuple[RunningServer, str], tmp_path: Path
) -> None:
    server, secret = tenant
    marker = tmp_path / "ran"
    child = ["--", "sh", "-c", f"touch {marker}"]
    for token, namespace, code in ((secret, "other", "PERMISSION_DENIED"), (ADMIN, "bad name!", "INVALID_ARGUMENT")):
        flags = ["--address", server.address, "--token", token, "--namespace", namespace]
        ran = await cli("lease", "run", "job", *flags, "-n", *child, home=tmp_path)
        assert ran.returncode == 125, ran.stderr
        assert f"cannot acquire {namespace}/job: {code}" in one_line(ran)
        assert not marker.exists()
        listed = await cli("lease", "list", *flags, home=tmp_path)
        assert listed.returncode == 1, listed.stderr
        assert code in one_line(listed)
    granted = await cli(
        "lease", "run", "job", "--address", server.address, "--token", secret, "--namespace", "granted", *child,
        home=tmp_path,
    )  # fmt: skip
    assert granted.returncode == 0 and marker.exists(), granted.stderr


async def test_lease_run_help_and_docs_name_the_same_exit_codes(tmp_path: Path) -> None:
    result = await cli("lease", "run", "--help", home=tmp_path)
    assert result.returncode == 0
    assert "64" not in result.stdout and "125 the server refused" in result.stdout
    assert "2 a usage error" in result.stdout
    leases = (Path(__file__).parent.parent / "docs" / "leases.md").read_text()
    assert "125 when the server refuses" in " ".join(leases.split())


async def test_ingest_refused_by_the_server_exits_1_like_search(
    tenant: tuple[RunningServer, str], tmp_path: Path
) -> None:
    server, secret = tenant
    data = tmp_path / "load.jsonl"
    data.write_text(json.dumps({"scope": "agent", "scope_id": 1, "value": "tea"}) + "\n")
    ingest = await cli("ingest", str(data), "-q", "--address", server.address, "--token", secret, home=tmp_path)
    assert ingest.returncode == 1, ingest.stderr
    assert "the server refused the load: PERMISSION_DENIED" in one_line(ingest)
    search = await cli("search", "tea", "--address", server.address, "--token", "wrong", home=tmp_path)
    assert search.returncode == 1 and "UNAUTHENTICATED" in one_line(search)
    unreadable = await cli("ingest", str(tmp_path / "missing.jsonl"), "--address", server.address, home=tmp_path)
    assert unreadable.returncode == 2 and "cannot read" in one_line(unreadable)


async def closed_stdout(
    *args: str, read_first: bool = False, then: Callable[[], Awaitable[object]] | None = None
) -> tuple[int | None, str]:
    """Run the command with stdout a pipe whose reader goes away: at once, or after reading one line (then
    ``then`` makes it write more). Its exit code and stderr."""
    read_end, write_end = os.pipe()
    if not read_first:
        os.close(read_end)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memory_service",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    os.close(write_end)
    if read_first:
        with os.fdopen(read_end, "rb") as reader:
            first = await asyncio.wait_for(asyncio.to_thread(reader.readline), 60)
            assert first.startswith(b"{"), first
    if then is not None:
        await then()
    assert process.stderr is not None
    stderr = await asyncio.wait_for(process.stderr.read(), 60)
    return await asyncio.wait_for(process.wait(), 60), stderr.decode()


async def test_a_closed_stdout_ends_every_streaming_command_quietly(server: RunningServer, database_url: str) -> None:
    stored = await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="tea"))
    )
    await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="tea2"))
    )
    await server.leases.Acquire(acquire_request("piped", holder="x"))
    address = ["--address", server.address]
    for command in (
        ["search", "tea", *address],
        ["stats", "--json", *address],
        ["stats", *address],
        ["history", str(stored.id), *address],
        ["lease", "list", *address],
        ["export", "--database-url", database_url],
        ["--help"],
    ):
        code, stderr = await closed_stdout(*command)
        assert (code, stderr) == (EX_PIPE, ""), command


async def test_watch_piped_into_head_ends_quietly(server: RunningServer) -> None:
    async def store(value: str) -> None:
        memory = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value=value)
        await server.memory.Store(memory_pb2.StoreRequest(memory=memory))

    for i in range(3):
        await store(f"before {i}")

    async def more() -> None:  # written after the reader left: each is a write into a closed pipe
        for i in range(3):
            await store(f"after {i}")

    code, stderr = await closed_stdout("watch", "--address", server.address, read_first=True, then=more)
    assert (code, stderr) == (EX_PIPE, "")


async def test_export_piped_into_head_is_no_database_error(server: RunningServer, database_url: str) -> None:
    value = "x" * 2000  # 300 of them are several pipe buffers: most writes come after the reader left
    for start in range(0, 300, 50):
        await asyncio.gather(
            *(
                server.memory.Store(
                    memory_pb2.StoreRequest(
                        memory=memory_pb2.MemoryInput(
                            scope=memory_pb2.SCOPE_AGENT, scope_id=1, key=f"k{i}", value=value
                        )
                    )
                )
                for i in range(start, start + 50)
            )
        )
    code, stderr = await closed_stdout("export", "--database-url", database_url, read_first=True)
    assert code == EX_PIPE, stderr
    assert "Traceback" not in stderr and "error" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_a_model_that_cannot_be_downloaded_is_one_line(database_url: str, tmp_path: Path, processes: str) -> None:
    env = {
        **test_env(database_url, SERVER_PROCESSES=processes, METRICS_PORT="off", LOG_LEVEL="ERROR"),
        "EMBEDDING_PROVIDER": "local",
        "MEMORY_SERVICE_DATA_DIR": str(tmp_path / "data"),
        "HF_ENDPOINT": "http://127.0.0.1:1",  # no network: the hub's error text spans lines
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memory_service",
        "serve",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err.decode()
    assert lines[0].startswith("memory-service: error: could not download embedding model"), lines
    assert "set EMBEDDING_MODEL_PATH" in lines[0]
