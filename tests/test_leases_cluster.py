"""Leases across two real server processes on one database, with many concurrent clients and real failures."""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc import aio

from memory_service.v1 import lease_pb2, lease_pb2_grpc
from tests.conftest import TEMPLATE_DB, code_of, create_database, drop_database, test_env
from tests.processes import ServerProcess
from tests.test_leases import NS, acquire_request, advisory_lock, eventually

pytestmark = pytest.mark.timeout(240)


@dataclass
class Cluster:
    dsn: str
    servers: list[ServerProcess]
    channels: list[aio.Channel]

    @property
    def stubs(self) -> list[lease_pb2_grpc.LeaseServiceStub]:
        return [lease_pb2_grpc.LeaseServiceStub(channel) for channel in self.channels]


@pytest.fixture(scope="module")
async def cluster(server_dsn: str, template_dsn: str) -> AsyncIterator[Cluster]:
    dsn = await create_database(server_dsn, TEMPLATE_DB)
    env = test_env(dsn, LEASE_MIN_TTL="100ms", DATABASE_POOL_MAX="10")
    servers = [ServerProcess(env), ServerProcess(env)]
    try:
        await asyncio.gather(*(asyncio.to_thread(server.wait_serving) for server in servers))
        channels = [aio.insecure_channel(server.address) for server in servers]
        yield Cluster(dsn, servers, channels)
        for channel in channels:
            await channel.close()
    finally:
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
        await drop_database(server_dsn, dsn)


async def _scalar(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_fifty_clients_race_for_one_name(cluster: Cluster) -> None:
    stubs = cluster.stubs
    tokens: list[int] = []
    for round_ in range(5):
        responses = await asyncio.gather(
            *(stubs[i % 2].Acquire(acquire_request("race", holder=f"client-{i}")) for i in range(50))
        )
        winners = [response.lease for response in responses if response.acquired]
        assert len(winners) == 1, f"round {round_}: {len(winners)} grants"
        winner = winners[0]
        assert {r.current_holder.fencing_token for r in responses if not r.acquired} == {winner.fencing_token}
        tokens.append(winner.fencing_token)
        await stubs[(round_ + 1) % 2].Release(lease_pb2.ReleaseRequest(lease_id=winner.lease_id))
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


async def test_any_instance_renews_and_releases(cluster: Cluster) -> None:
    first, second = cluster.stubs
    lease = (await first.Acquire(acquire_request("roaming", ttl=5, holder="roamer"))).lease
    renewed = (await second.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id))).lease
    assert renewed.fencing_token == lease.fencing_token
    assert renewed.renewed_at.ToDatetime() > lease.renewed_at.ToDatetime()
    seen = (await first.Get(lease_pb2.GetLeaseRequest(namespace=NS, name="roaming"))).lease
    assert seen.expires_at == renewed.expires_at
    assert (await second.Release(lease_pb2.ReleaseRequest(lease_id=lease.lease_id))).released
    assert (await first.Acquire(acquire_request("roaming"))).lease.fencing_token > lease.fencing_token


_WAITING_ON_LEASE_LOCK = """
SELECT array_agg(pid) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'
"""


async def _terminate_the_waiter(conn: asyncpg.Connection) -> None:
    async def waiting() -> bool:
        return bool(await conn.fetchval(_WAITING_ON_LEASE_LOCK))

    await eventually(waiting)
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", await conn.fetchval(_WAITING_ON_LEASE_LOCK)
    )


async def test_backend_killed_mid_acquire_answers_unavailable_and_grants_nothing(cluster: Cluster) -> None:
    stub = cluster.stubs[0]
    async with advisory_lock(cluster.dsn, NS, "killed-acquire") as conn:
        call = asyncio.ensure_future(stub.Acquire(acquire_request("killed-acquire", holder="victim")))
        await _terminate_the_waiter(conn)
        with pytest.raises(grpc.RpcError) as caught:
            await call
        assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert await _scalar(cluster.dsn, "SELECT count(*) FROM memory.leases WHERE name = 'killed-acquire'") == 0
    assert (await stub.Acquire(acquire_request("killed-acquire", holder="next"))).acquired


async def test_backend_killed_mid_renew_answers_unavailable_and_keeps_the_lease(cluster: Cluster) -> None:
    first, second = cluster.stubs
    lease = (await first.Acquire(acquire_request("killed-renew", ttl=30))).lease
    async with advisory_lock(cluster.dsn, NS, "killed-renew") as conn:
        call = asyncio.ensure_future(second.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id)))
        await _terminate_the_waiter(conn)
        with pytest.raises(grpc.RpcError) as caught:
            await call
        assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE
    renewed = (await second.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id))).lease
    assert renewed.lease_id == lease.lease_id and renewed.fencing_token == lease.fencing_token


async def test_backends_killed_under_load_never_cost_a_correct_answer(cluster: Cluster) -> None:
    """Clients retry UNAVAILABLE with their request id; in the end each name has exactly the grant one client holds."""
    stubs = cluster.stubs
    names = [f"chaos-{i}" for i in range(10)]
    beliefs: dict[str, list[lease_pb2.Lease]] = {name: [] for name in names}
    aborted: list[str] = []
    stop = asyncio.Event()

    async def call(method: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        """Retry UNAVAILABLE, as a client library would; any other error fails the test."""
        while True:
            try:
                return await method(request)
            except grpc.RpcError as exc:
                assert code_of(exc) == grpc.StatusCode.UNAVAILABLE, exc
                await asyncio.sleep(0.01)

    async def client(index: int) -> None:
        name = names[index % len(names)]
        request = acquire_request(name, ttl=60, holder=f"chaos-client-{index}", request_id=f"req-{index}")
        response = await call(stubs[index % 2].Acquire, request)
        if not response.acquired:
            return
        beliefs[name].append(response.lease)
        renew = lease_pb2.RenewRequest(lease_id=response.lease.lease_id)
        while not stop.is_set():
            try:
                await call(stubs[random.randrange(2)].Renew, renew)
            except AssertionError:
                aborted.append(name)
                raise

    async def terminator() -> None:
        conn = await asyncpg.connect(cluster.dsn)
        try:
            for _ in range(150):
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                await asyncio.sleep(random.uniform(0.005, 0.03))
        finally:
            await conn.close()
            stop.set()

    await asyncio.gather(terminator(), *(client(i) for i in range(30)))
    assert not aborted
    conn = await asyncpg.connect(cluster.dsn)
    try:
        for name in names:
            assert len(beliefs[name]) == 1, (name, beliefs[name])
            row = await conn.fetchrow(
                "SELECT lease_id::text, fencing_token FROM memory.leases WHERE namespace = $1 AND name = $2", NS, name
            )
            assert row is not None
            assert (row["lease_id"], row["fencing_token"]) == (
                beliefs[name][0].lease_id,
                beliefs[name][0].fencing_token,
            )
    finally:
        await conn.close()

    # Both instances recover by themselves.
    for stub in stubs:

        async def answers(stub: lease_pb2_grpc.LeaseServiceStub = stub) -> bool:
            try:
                await stub.List(lease_pb2.ListLeasesRequest(namespace=NS))
            except grpc.RpcError as exc:
                assert code_of(exc) == grpc.StatusCode.UNAVAILABLE
                return False
            return True

        await eventually(answers)
        for i in range(20):
            response = await stub.Acquire(acquire_request(f"after-chaos-{i}", ttl=5))
            assert response.acquired
            await stub.Release(lease_pb2.ReleaseRequest(lease_id=response.lease.lease_id))


async def test_ten_thousand_cycles_with_cancellations_leave_no_locks(cluster: Cluster) -> None:
    stubs = cluster.stubs
    names = [f"cycle-{i}" for i in range(64)]
    cycles = iter(range(10_000))
    tokens: list[int] = []
    codes: Counter[str] = Counter()

    async def attempt(call: Awaitable[object], rng: random.Random) -> object | None:
        """Await the call, or cancel it after a random moment, as a client that gives up would."""
        try:
            if rng.random() < 0.15:
                return await asyncio.wait_for(call, timeout=rng.uniform(0, 0.004))
            return await asyncio.wait_for(call, timeout=30)
        except TimeoutError:
            codes["cancelled"] += 1
        except grpc.RpcError as exc:
            codes[code_of(exc).name] += 1
        return None

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in cycles:
            stub = stubs[rng.randrange(2)]
            response = await attempt(stub.Acquire(acquire_request(rng.choice(names), ttl=0.5, holder=f"w{seed}")), rng)
            if isinstance(response, lease_pb2.AcquireResponse) and response.acquired:
                tokens.append(response.lease.fencing_token)
                await attempt(
                    stubs[rng.randrange(2)].Release(lease_pb2.ReleaseRequest(lease_id=response.lease.lease_id)), rng
                )

    await asyncio.gather(*(worker(seed) for seed in range(48)))
    assert set(codes) <= {"cancelled", "CANCELLED", "DEADLINE_EXCEEDED"}, codes
    assert len(tokens) > 1000 and len(set(tokens)) == len(tokens)

    async def quiet() -> bool:
        locks = await _scalar(
            cluster.dsn,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
        idle = await _scalar(
            cluster.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state IN ('idle in transaction', 'idle in transaction (aborted)')",
        )
        return locks == 0 and idle == 0

    await eventually(quiet, timeout=10)


def _lease_run(
    cluster: Cluster, server: int, name: str, *args: str, wait: tuple[str, ...] = ("--wait", "60s")
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "memory_service",
        "lease",
        "run",
        name,
        "--namespace",
        NS,
        "--address",
        cluster.servers[server].address,
        *wait,
        *args,
    ]


_CRITICAL_SECTION = """
if ! mkdir "$DIR/inside" 2>/dev/null; then echo overlap >> "$DIR/overlaps"; exit 3; fi
echo "$MEMORY_SERVICE_LEASE_TOKEN" >> "$DIR/tokens"
sleep 0.2
rmdir "$DIR/inside"
"""


_spawned: list[asyncio.subprocess.Process] = []


async def _spawn(argv: list[str], env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    _spawned.append(process)
    return process


@pytest.fixture(autouse=True)
async def _no_stray_processes() -> AsyncIterator[None]:
    """A failed test must not leave ``lease run`` processes behind."""
    yield
    while _spawned:
        process = _spawned.pop()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_lease_run_never_overlaps(cluster: Cluster, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "DIR": str(tmp_path)}
    processes = [
        await _spawn(_lease_run(cluster, i % 2, "cron", "--ttl", "2s", "--", "sh", "-c", _CRITICAL_SECTION), env)
        for i in range(6)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in processes)), timeout=90)
    assert [process.returncode for process in processes] == [0] * 6, [err.decode() for _, err in results]
    assert not (tmp_path / "overlaps").exists()
    tokens = [int(line) for line in (tmp_path / "tokens").read_text().split()]
    assert len(tokens) == 6 and tokens == sorted(set(tokens))


async def test_lease_run_exit_codes(cluster: Cluster) -> None:
    process = await _spawn(
        _lease_run(cluster, 0, "codes", "--", "sh", "-c", 'test -n "$MEMORY_SERVICE_LEASE_TOKEN" && exit 7')
    )
    await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 7

    holder = (await cluster.stubs[1].Acquire(acquire_request("codes", holder="someone-else"))).lease
    process = await _spawn(_lease_run(cluster, 0, "codes", "--", "true", wait=("--no-wait",)))
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1 and b"someone-else" in stderr
    await cluster.stubs[1].Release(lease_pb2.ReleaseRequest(lease_id=holder.lease_id))


async def test_lease_run_stops_the_command_when_the_lease_is_lost(cluster: Cluster, tmp_path: Path) -> None:
    started = tmp_path / "started"
    argv = _lease_run(cluster, 1, "doomed", "--ttl", "1s", "--", "sh", "-c", f"touch {started}; exec sleep 60")
    process = await _spawn(argv)
    await eventually(lambda: asyncio.sleep(0, started.exists()))
    conn = await asyncpg.connect(cluster.dsn)
    try:  # the lease runs out (as after a long stall) and another client takes it
        await conn.execute("UPDATE memory.leases SET expires_at = clock_timestamp() WHERE name = 'doomed'")
    finally:
        await conn.close()
    assert (await cluster.stubs[0].Acquire(acquire_request("doomed", holder="successor"))).acquired
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 128 + 15, stderr.decode()
    assert b"lost" in stderr
