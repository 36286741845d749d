"""``backup``, ``export``, ``doctor`` and ``restore`` on the embedded data directory: beside a server running on it
(which they leave running), and alone (they start PostgreSQL for the command and stop it again)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from grpc import aio

from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.processes import ServerProcess


def _command(*argv: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """One command as its own process, naming the embedded data directory as an operator would."""
    env = {**os.environ, "DATABASE_URL": "", "MEMORY_SERVICE_DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "memory_service", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def _run(*argv: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(_command, *argv, data_dir=data_dir)
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


def _exported(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_database_commands_on_the_embedded_data_dir(tmp_path: Path) -> None:
    data, restored = tmp_path / "data", tmp_path / "restored"
    env = {
        "MEMORY_SERVICE_DATA_DIR": str(data),
        "DATABASE_URL": "",
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "off",
    }
    backup = tmp_path / "embedded.backup"
    server = ServerProcess(env)
    try:
        await asyncio.to_thread(server.wait_serving)
        async with aio.insecure_channel(server.address) as channel:
            memory = memory_pb2_grpc.MemoryServiceStub(channel)
            for i in range(3):
                item = memory_pb2.MemoryInput(
                    scope=memory_pb2.SCOPE_AGENT, scope_id=5, key=f"k{i}", value=f"embedded note {i}", tags=["x"]
                )
                await memory.Store(memory_pb2.StoreRequest(memory=item), timeout=30)

            # Beside the running server: each command uses its PostgreSQL and leaves it running.
            doctor = await _run("doctor", data_dir=data)
            assert "ACTION" not in doctor.stdout
            assert "ok     model: bound to hash-ngram-v1 (384 dimensions)" in doctor.stdout
            await _run("backup", str(backup), data_dir=data)
            beside = _exported(await _run("export", "--include-embeddings", data_dir=data))
            assert sorted(str(e["key"]) for e in beside) == ["k0", "k1", "k2"]
            after = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=5, key="k3", value="after backup")
            assert (await memory.Store(memory_pb2.StoreRequest(memory=after), timeout=30)).id
        server.terminate()
        assert await asyncio.to_thread(server.wait, 60) == 0
    finally:
        server.stop()
    assert not EmbeddedPostgres(data).is_running()  # the server stopped the PostgreSQL it had started

    # Alone: the command starts PostgreSQL for itself and stops it again.
    alone = _exported(await _run("export", data_dir=data))
    assert len(alone) == 4
    assert not EmbeddedPostgres(data).is_running()

    # Into a new data directory: restore initialises it, and the backup's rows come back as exported beside the server.
    await _run("restore", str(backup), data_dir=restored)
    assert not EmbeddedPostgres(restored).is_running()
    assert _exported(await _run("export", "--include-embeddings", data_dir=restored)) == beside


def test_the_last_user_of_the_embedded_postgres_stops_it_not_the_first(tmp_path: Path) -> None:
    """A command that started PostgreSQL must not stop it under a server that came to it later: whoever leaves last
    stops it, and a server this module did not start is left alone."""
    command, server = EmbeddedPostgres(tmp_path), EmbeddedPostgres(tmp_path)
    command.start()
    server.start()
    command.stop()  # it started PostgreSQL, but the server still uses it
    assert server.is_running()
    server.stop()  # the last user: it stops the server the command started
    assert not server.is_running()

    # Not started by this module (as with an operator's own pg_ctl: no marker): its users leave it running.
    outside = EmbeddedPostgres(tmp_path)
    outside.start()
    (tmp_path / "started.marker").unlink()
    user = EmbeddedPostgres(tmp_path)
    user.start()
    user.stop()
    outside.stop()
    assert outside.is_running()
    outside.stop(force=True)
    assert not outside.is_running()
