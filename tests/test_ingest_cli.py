"""``memory-service ingest`` as a real process against real servers: resuming across a SIGKILLed server, summaries,
rejected lines, reloads from stdin, and fencing from ``lease run``'s environment."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from memory_service.cli.jsonl import LineError, parse_line
from memory_service.client.bulk import ResumableBulkStore
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.processes import ServerProcess
from tests.test_ingest import Feeder, fetch, item, stored
from tests.test_leases import acquire_request, eventually

_SUMMARY = re.compile(r"created ([\d,]+), updated ([\d,]+), unchanged ([\d,]+), rejected ([\d,]+)")


def line(number: int, **fields: object) -> str:
    data: dict[str, object] = {"scope": "agent", "scope_id": 1, "key": f"k{number:05d}", "value": f"memory {number}"}
    data.update(fields)
    return json.dumps(data)


_INGEST = (sys.executable, "-m", "memory_service", "ingest")


def summary(stdout: str) -> tuple[int, int, int, int]:
    match = _SUMMARY.search(stdout)
    assert match is not None, stdout
    created, updated, unchanged, rejected = (int(g.replace(",", "")) for g in match.groups())
    return created, updated, unchanged, rejected


async def ingest(
    address: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *_INGEST,
        "--address",
        address,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def count(dsn: str) -> int:
    return int((await fetch(dsn, "SELECT count(*) AS n FROM memory.memories"))[0]["n"])


async def test_load_resumes_across_a_killed_server(database_url: str, tmp_path: Path) -> None:
    total = 20_000
    bad = {10: "{not json", 5000: line(5000, value=""), 15000: line(15000, scope="team")}
    data = tmp_path / "load.jsonl"
    data.write_text("\n".join(bad.get(n) or line(n) for n in range(1, total + 1)) + "\n")
    env = test_env(database_url, GRPC_PORT=str(free_port()), BULK_BATCH_ROWS="200")
    server = ServerProcess(env)
    restarted: ServerProcess | None = None
    try:
        await asyncio.to_thread(server.wait_serving)
        client = asyncio.create_task(ingest(server.address, str(data), "--batch-size", "200"))
        await eventually(lambda: _at_least(database_url, 2000))
        server.kill()
        committed = await stored(database_url)
        assert 2000 <= len(committed) < total - len(bad), "the load finished before the kill: make it longer"
        # Whole batches committed in order, so what is there is a prefix of the file.
        assert sorted(committed) == [f"k{n:05d}" for n in range(1, max(map(_number, committed)) + 1) if n not in bad]

        restarted = ServerProcess(env)
        await asyncio.to_thread(restarted.wait_serving)
        code, out, err = await client
    finally:
        for process in (server, restarted):
            if process is not None:
                process.stop()
    assert code == 1, err
    print(out, err)
    created, updated, unchanged, rejected = summary(out)
    assert rejected == 3 and created + updated + unchanged == total - 3
    assert "line 10: not valid JSON" in out and "line 5000: memory.value: must not be empty" in out
    assert "line 15000: scope: must be one of" in out
    rows = await stored(database_url)
    assert sorted(rows) == [f"k{n:05d}" for n in range(1, total + 1) if n not in bad]
    assert all(row["value"] == f"memory {_number(key)}" for key, row in rows.items())


async def _at_least(dsn: str, rows: int) -> bool:
    return await count(dsn) >= rows


def _number(key: str) -> int:
    return int(key.removeprefix("k"))


async def test_summary_rejections_and_a_reload_from_stdin(server: RunningServer, tmp_path: Path) -> None:
    lines = [
        line(1),
        "",
        line(3, embedding=[0.1, 0.2]),
        line(4, tags="urgent"),
        line(5, colour="blue"),
        line(6, ttl_seconds=3600, metadata={"source": "chat"}, tags=["x"], importance=0.7, memory_type="preference"),
        line(7, expires_at="2999-01-01T00:00:00Z", agent_id=9),
        line(8, ttl_seconds=60, expires_at="2999-01-01T00:00:00Z"),
        line(9),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, out, _ = await ingest(server.address, str(data), "--batch-size", "2")
    assert code == 1
    assert summary(out) == (4, 0, 0, 4)
    assert "line 3: memory.embedding: has 2 dimensions; this database stores 384" in out
    assert "line 4: tags: must be a list of strings" in out
    assert "line 5: colour: is not a known field" in out
    assert "line 8: ttl_seconds: give ttl_seconds or expires_at, not both" in out

    code, out, _ = await ingest(server.address, "-", stdin=data.read_bytes())
    assert code == 1
    # The ttl row is recomputed against the clock, so it counts as updated; the rest is unchanged.
    assert summary(out) == (0, 1, 3, 4)

    valid = "\n".join(lines[i] for i in (0, 5, 6, 8)).encode()
    code, out, _ = await ingest(server.address, "-", stdin=valid)
    assert code == 0 and summary(out)[3] == 0


async def test_a_superseded_lease_from_lease_run_stops_the_load(server: RunningServer, tmp_path: Path) -> None:
    old = (await server.leases.Acquire(acquire_request("import", holder="a"))).lease
    await server.leases.Release(lease_pb2.ReleaseRequest(lease_id=old.lease_id))
    await server.leases.Acquire(acquire_request("import", holder="b"))
    data = tmp_path / "load.jsonl"
    data.write_text(line(1) + "\n")
    lease_env = {
        "MEMORY_SERVICE_LEASE_NAMESPACE": old.namespace,
        "MEMORY_SERVICE_LEASE_NAME": old.name,
        "MEMORY_SERVICE_LEASE_TOKEN": str(old.fencing_token),
    }
    code, _, err = await ingest(server.address, str(data), env={**os.environ, **lease_env})
    assert code == 1  # refused, as every server command answers a refusal
    assert "ABORTED" in err and "newer holder" in err


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"[1, 2]", "line"),
        (b'{"scope": "agent"}', "value"),
        (b'{"value": "x"}', "scope"),
        (b'{"scope": "agent", "value": "x", "scope_id": "1"}', "scope_id"),
        (b'{"scope": "agent", "value": "x", "importance": true}', "importance"),
        (b'{"scope": "agent", "value": "x", "embedding": [1, "a"]}', "embedding"),
        (b'{"scope": "agent", "value": "x", "expires_at": "tomorrow"}', "expires_at"),
        (b'{"scope": "agent", "value": "x", "memory_type": "gossip"}', "memory_type"),
        (b'{"scope": "agent", "value": "x", "ttl_seconds": NaN}', "ttl_seconds"),
        (b'{"scope": "agent", "value": "x", "metadata": []}', "metadata"),
    ],
)
def test_malformed_lines_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(LineError) as caught:
        parse_line(raw)
    assert caught.value.field == (field if field != "line" else "")


def test_a_line_becomes_a_memory_input() -> None:
    message = parse_line(line(1, memory_type="Skill", tags=["a"], ttl_seconds=1.5, agent_id=3).encode())
    assert message.scope == memory_pb2.SCOPE_AGENT and message.memory_type == memory_pb2.MEMORY_TYPE_SKILL
    assert message.ttl.ToNanoseconds() == 1_500_000_000 and message.agent_id == 3


async def test_an_overloaded_server_slows_the_load_down(database_url: str, tmp_path: Path) -> None:
    running = await start_server(test_env(database_url, GRPC_MAX_CONCURRENT_RPCS="1"))
    try:
        data = tmp_path / "load.jsonl"
        data.write_text(line(1) + "\n")
        feeder = Feeder()
        busy = running.memory.BulkStore(feeder.__aiter__())  # takes the server's only call slot
        await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(100)]))
        assert (await busy.read()).durable_sequence == 100
        process = await asyncio.create_subprocess_exec(
            *_INGEST,
            "--address",
            running.address,
            str(data),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        async with asyncio.timeout(60):
            # The client meets RESOURCE_EXHAUSTED and backs off instead of giving up.
            while b"RESOURCE_EXHAUSTED" not in (said := await process.stderr.readline()):
                assert said, "the client ended without meeting RESOURCE_EXHAUSTED"
        feeder.close()
        await busy.read()  # the held stream ends and frees the slot
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0
        assert summary(out.decode()) == (1, 0, 0, 0)
    finally:
        await stop_server(running)


def cancelled_so_far(running: RunningServer) -> float:
    """BulkStore streams the server has answered with DEADLINE_EXCEEDED."""
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "memory_service.v1.MemoryService",
        "grpc_method": "BulkStore",
        "grpc_code": "DEADLINE_EXCEEDED",
    }
    return running.server.metrics.registry.get_sample_value("grpc_server_handled_total", labels) or 0


async def cancelled_batches(running: RunningServer, *, at_least: float) -> None:
    """Wait until the server has answered DEADLINE_EXCEEDED to ``at_least`` BulkStore streams in all."""
    async with asyncio.timeout(60):
        while cancelled_so_far(running) < at_least:
            await asyncio.sleep(0.05)


async def test_batches_cancelled_by_statement_timeout_are_retried(database_url: str, tmp_path: Path) -> None:
    """A batch the server cancels at its statement_timeout (here: waiting on a table lock held past it) answers
    DEADLINE_EXCEEDED, and the load backs off and resumes instead of giving up, in the CLI and in the client engine."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '300ms'")
    running = await start_server(test_env(database_url))
    try:
        data = tmp_path / "load.jsonl"
        data.write_text("".join(line(n) + "\n" for n in range(1, 3001)))
        # Writes wait on the lock until statement_timeout cancels them, for about two seconds.
        lock = conn.transaction()
        await lock.start()
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute("LOCK TABLE memory.memories IN SHARE ROW EXCLUSIVE MODE")
        process = await asyncio.create_subprocess_exec(
            *_INGEST, "--address", running.address, str(data), "--batch-size", "200",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await cancelled_batches(running, at_least=1)
        await lock.commit()
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, (out.decode(), err.decode())
        assert "DEADLINE_EXCEEDED" in err.decode()
        assert summary(out.decode()) == (3000, 0, 0, 0)
        assert await count(database_url) == 3000

        # The engine under MemoryClient.bulk_store, with the same fault.
        retried: list[str] = []

        async def items() -> AsyncIterator[memory_pb2.BulkItem]:
            for n in range(1, 3001):
                value = {"scope": memory_pb2.SCOPE_AGENT, "scope_id": 2, "value": f"engine {n}"}
                yield memory_pb2.BulkItem(sequence=n, memory=value)  # type: ignore[arg-type]

        lock = conn.transaction()
        await lock.start()
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute("LOCK TABLE memory.memories IN SHARE ROW EXCLUSIVE MODE")
        engine = ResumableBulkStore(
            running.memory, items(), batch_size=100, on_retry=lambda why, _delay: retried.append(why)
        )
        before = cancelled_so_far(running)  # the CLI's load above may have had more than one cancelled
        load = asyncio.create_task(engine.run())
        await cancelled_batches(running, at_least=before + 1)
        await lock.commit()
        result = await asyncio.wait_for(load, 120)
        assert result.created == 3000 and result.durable_sequence == 3000
        assert any(why.startswith("DEADLINE_EXCEEDED") for why in retried), retried
    finally:
        await stop_server(running)
        await conn.close()
