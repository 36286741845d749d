"""CLI edges, through the real command in a subprocess against a real server: client commands never touch a
database, every error is one line, and `lease run` exits as flock does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env

TOKEN = "cli-test-token-0123456789"


async def cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with an empty home directory and no server variables; off the event loop,
    so that an in-process server keeps answering."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "memory_service", *args],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
async def authed(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, AUTH_TOKENS=TOKEN))
    yield running
    await stop_server(running)


async def test_stats_asks_the_server_and_creates_no_database(server: RunningServer, tmp_path: Path) -> None:
    await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=3, value="x"))
    )
    result = await cli("stats", "--json", "--address", server.address, home=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["memories"] == 1 and stats["by_scope"] == {"agent": 1} and stats["dimension"] == 384
    assert stats["writes_refused"] is None
    assert os.listdir(tmp_path) == []  # no embedded database was created in the home directory


async def test_stats_of_an_unreachable_server_is_one_line_and_69(tmp_path: Path) -> None:
    result = await cli("stats", "--address", "127.0.0.1:1", home=tmp_path)
    assert result.returncode == 69
    assert one_line(result).startswith("memory-service: stats failed: UNAVAILABLE")
    assert os.listdir(tmp_path) == []


async def test_server_commands_take_the_same_token_flag(authed: RunningServer, tmp_path: Path) -> None:
    for command in (["stats"], ["search", "tea"], ["lease", "list"]):
        refused = await cli(*command, "--address", authed.address, home=tmp_path)
        assert refused.returncode == 1
        assert "UNAUTHENTICATED" in one_line(refused)
        allowed = await cli(*command, "--address", authed.address, "--token", TOKEN, home=tmp_path)
        assert allowed.returncode == 0, allowed.stderr
        via_env = await cli(
            *command, home=tmp_path, env={"MEMORY_SERVICE_ADDRESS": authed.address, "MEMORY_SERVICE_TOKEN": TOKEN}
        )
        assert via_env.returncode == 0, via_env.stderr


async def test_server_commands_refuse_an_unreadable_ca_file_in_one_line(tmp_path: Path) -> None:
    for command in (["stats"], ["search", "tea"], ["lease", "list"]):
        result = await cli(*command, "--ca-file", str(tmp_path / "missing.pem"), home=tmp_path)
        assert result.returncode == 2
        assert "--ca-file is expected to name a readable PEM file" in one_line(result)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["search", "tea", "--scope", "agent:abc"], "the scope id after ':' must be an integer (got 'abc')"),
        (["search", "tea", "--scope", "bogus"], "unknown scope 'bogus'"),
        (["search", "tea", "--top-k", "many"], "invalid int value"),
        (["no-such-command"], "invalid choice"),
        (["lease", "run", "job", "--ttl", "soon", "--", "true"], "expected a duration"),
    ],
)
async def test_usage_errors_are_one_line(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = await cli(*args, home=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("memory-service") and fragment in line


async def test_search_with_a_scope_reaches_the_server(server: RunningServer, tmp_path: Path) -> None:
    await server.memory.Store(
        memory_pb2.StoreRequest(
            memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=42, value="green tea in the morning")
        )
    )
    result = await cli("search", "tea", "--scope", "agent:42", "--address", server.address, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "green tea in the morning" in result.stdout
    other = await cli("search", "tea", "--scope", "agent:7", "--address", server.address, home=tmp_path)
    assert "green tea" not in other.stdout


@pytest.mark.parametrize("command", ["migrate", "reindex"])
async def test_database_commands_need_the_database_named(command: str, tmp_path: Path) -> None:
    result = await cli(command, home=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert f"{command} works on the database directly and needs it named" in line and "DATABASE_URL" in line
    assert os.listdir(tmp_path) == []


async def test_lease_run_exits_127_when_the_command_is_not_found(server: RunningServer, tmp_path: Path) -> None:
    result = await cli("lease", "run", "job", "--address", server.address, "--", "no-such-command-x", home=tmp_path)
    assert result.returncode == 127
    assert "no-such-command-x: command not found" in result.stderr
    listed = await cli("lease", "list", "--address", server.address, home=tmp_path)
    assert "job" not in listed.stdout  # released


async def test_lease_run_exits_126_when_the_command_cannot_be_executed(server: RunningServer, tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    await asyncio.to_thread(script.write_text, "#!/bin/sh\necho hi\n")
    await asyncio.to_thread(script.chmod, 0o644)
    for command in (str(script), str(tmp_path)):  # a file without the x bit, and a directory
        result = await cli("lease", "run", "job", "--address", server.address, "--", command, home=tmp_path)
        assert result.returncode == 126, result.stderr
        assert "cannot execute" in result.stderr


async def test_lease_run_without_wait_gives_up_on_an_unreachable_server(tmp_path: Path) -> None:
    result = await cli(
        "lease", "run", "job", "--address", "127.0.0.1:1", "--retry-timeout", "1s", "--", "true", home=tmp_path
    )
    assert result.returncode == 69
    assert "cannot acquire default/job: UNAVAILABLE" in result.stderr.strip().splitlines()[-1]
