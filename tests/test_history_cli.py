"""`memory-service history` and `memory-service watch` as real subprocesses, and the Python client's history calls,
against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC

from memory_service.client import MemoryClient
from tests.conftest import RunningServer


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memory_service",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MEMORY_SERVICE_TOKEN": ""},
    )


async def test_history_and_watch_commands_print_json_lines(server: RunningServer) -> None:
    async with MemoryClient(server.address) as client:
        first = await client.store("the printer is on floor 2", scope="agent", scope_id=5, key="printer")
        await client.store("the printer is on floor 3", scope="agent", scope_id=5, key="printer")
        await client.store("elsewhere", scope="project", scope_id=1)

    process = await run_cli("history", str(first.id), "--address", server.address)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(v["version"], v["kind"]) for v in lines] == [(2, "CHANGE_KIND_UPDATED"), (1, "CHANGE_KIND_CREATED")]
    assert lines[1]["memory"]["value"] == "the printer is on floor 2"

    watcher = await run_cli("watch", "--scope", "agent:5", "--memory", "--address", server.address)
    assert watcher.stdout is not None
    try:
        changes = [json.loads(await asyncio.wait_for(watcher.stdout.readline(), timeout=60)) for _ in range(2)]
    finally:
        watcher.terminate()
        await watcher.wait()
    assert [c["version"] for c in changes] == [1, 2]
    assert changes[1]["memory"]["value"] == "the printer is on floor 3"
    assert all(c["cursor"] for c in changes)


async def test_client_reads_the_past_erases_and_resumes_a_watch(server: RunningServer) -> None:
    async with MemoryClient(server.address) as client:
        stored = await client.store("draft one", scope="agent", scope_id=9, key="doc")
        first = await client.get(stored.id)
        await client.store("draft two", scope="agent", scope_id=9, key="doc")
        past = await client.get_as_of(stored.id, first.updated_at.ToDatetime(tzinfo=UTC))
        assert past.value == "draft one"
        assert [v.version for v in await client.history(stored.id)] == [2, 1]

        stream = client.watch(scope="agent", scope_id=9)
        change = await asyncio.wait_for(anext(aiter(stream)), timeout=30)
        stream.cancel()  # type: ignore[attr-defined]
        assert change.version == 1
        resumed = client.watch(after=change.cursor, scope="agent", scope_id=9)
        assert (await asyncio.wait_for(anext(aiter(resumed)), timeout=30)).version == 2
        resumed.cancel()  # type: ignore[attr-defined]

        receipt = await client.erase(scope="agent", scope_id=9, memory_id=stored.id)
        assert list(receipt.memory_ids) == [stored.id]
        assert receipt.versions == 2
