"""What tenant isolation costs a scoped search: a token granted one scope vs the same search written by hand.

    python -m bench.tenants --rows 100000 --dataset minilm

The corpus is loaded and indexed as ``bench.scale`` does (scope 1 holds 1% of the rows, scope 0 10,000). Then one
server, and two callers alternating one call at a time over the same queries, for each of the two scopes:

* **token**: a token granted ``project:S`` only, searching with no filter: the service narrows the search to its
  grant and runs it as the calls role under row-level security;
* **by hand**: a full-access token (AUTH_TOKENS) with the filter ``project:S`` written in the request, no
  row-level security.

For each mode: p50/p99 latency, hits per search (top_k = 10 wanted), and for VECTOR recall@10 against exact
neighbours in the scope. Then the same statement at the SQL level, without the service: the search SQL of the
narrowed filter run as the owner and as the calls role with the token's grants, alternating, with the scans of each
plan (EXPLAIN ANALYZE), to isolate what the policies themselves cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
import numpy as np
from grpc import aio
from pgvector.asyncpg import register_vector

from bench.harness import ServerProcess, database_server, fresh_database, latencies, percentile_ms, print_table
from bench.scale import MODES, SCOPE_1PCT, SCOPE_10K, K, Measure, build, load_corpus, scans, service_env
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.search.tuning import DEFAULT_TEXT_RANKING
from memory_service.storage import search_sql
from memory_service.storage.access import access_settings
from memory_service.storage.database import Database
from memory_service.tenants.tokens import Tokens, TokenSpec
from memory_service.tenants.types import Access, Permission, ScopeGrant
from memory_service.v1 import memory_pb2, memory_pb2_grpc

STATIC = "bench-operator-token-0123456789"
EXPLAINED = 40
"""Statements run under EXPLAIN ANALYZE (TIMING OFF) per side, for PostgreSQL's own execution time: less disturbed
by a busy machine than a round trip."""
SCOPE_NAMES = {SCOPE_1PCT: "1%", SCOPE_10K: "10k rows"}


class Caller:
    """Search as one principal: with its token, and with or without the request's filter."""

    def __init__(self, stub: Any, secret: str, *, keep_filter: bool) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {secret}"),)
        self._keep_filter = keep_filter

    async def Search(self, request: memory_pb2.SearchRequest) -> memory_pb2.SearchResponse:
        if not self._keep_filter:
            copy = memory_pb2.SearchRequest()
            copy.CopyFrom(request)
            copy.ClearField("filter")
            request = copy
        response: memory_pb2.SearchResponse = await self._stub.Search(request, metadata=self._metadata)
        return response


async def create_token(dsn: str, scope_id: int) -> str:
    db = await Database.connect(dsn, min_size=1, max_size=1)
    try:
        spec = TokenSpec(
            name=f"bench-tenant-{scope_id}",
            scopes=(ScopeGrant.parse(f"project:{scope_id}"),),
            permissions=frozenset({Permission.READ}),
        )
        return await Tokens(db).create(spec)
    finally:
        await db.close()


async def through_service(
    measure: Measure, token: Caller, by_hand: Caller, scope_id: int, *, count: int, warmup: int
) -> list[list[object]]:
    return [await _service_mode(measure, token, by_hand, mode, scope_id, count=count, warmup=warmup) for mode in MODES]


async def _service_mode(
    measure: Measure, token: Caller, by_hand: Caller, mode: str, scope_id: int, *, count: int, warmup: int
) -> list[object]:
    requests = [measure.request(mode, scope_id, i) for i in range(count)]
    answers: dict[int, dict[int, set[int]]] = {id(token): {}, id(by_hand): {}}
    hits: dict[int, list[int]] = {id(token): [], id(by_hand): []}
    plans: dict[int, set[str]] = {id(token): set(), id(by_hand): set()}

    def caller(who: Caller) -> Any:
        async def call(i: int) -> None:
            response = await who.Search(requests[i % count])
            answers[id(who)][i] = {measure.keys[h.memory.key] for h in response.hits}
            hits[id(who)].append(len(response.hits))
            plans[id(who)].add(response.plan)

        return call

    await latencies(caller(token), caller(by_hand), count=warmup)
    for bucket in (*answers.values(), *hits.values()):
        bucket.clear()
    token_s, hand_s = await latencies(caller(token), caller(by_hand), count=count)
    recall: dict[int, str] = {id(token): "-", id(by_hand): "-"}
    if mode == "vector":
        truths = [measure.truth(i, scope_id) for i in range(count)]
        for who in (token, by_hand):
            got = answers[id(who)]
            recall[id(who)] = f"{np.mean([len(got[i] & truths[i]) / K for i in range(count)]):.3f}"
    return [
        mode,
        SCOPE_NAMES[scope_id],
        percentile_ms(token_s, 50),
        percentile_ms(token_s, 99),
        percentile_ms(hand_s, 50),
        percentile_ms(hand_s, 99),
        f"{percentile_ms(token_s, 50) / percentile_ms(hand_s, 50):.2f}x",
        f"{min(hits[id(token)])} / {min(hits[id(by_hand)])}",
        f"{recall[id(token)]} / {recall[id(by_hand)]}",
        " ".join(sorted(plans[id(token)])) + " / " + " ".join(sorted(plans[id(by_hand)])),
    ]


STATEMENTS = (
    # label, vector, text, exact
    ("vector, exact", True, False, True),
    ("vector, index", True, False, False),
    ("text", False, True, False),
    ("hybrid, exact", True, True, True),
)


async def sql_level(dsn: str, measure: Measure, *, count: int) -> list[list[object]]:
    """The narrowed search SQL as the owner and as the calls role, alternating."""
    owner = await asyncpg.connect(dsn)
    calls = await asyncpg.connect(dsn)
    try:
        for conn in (owner, calls):
            await register_vector(conn)
        rows = []
        for scope_id in SCOPE_NAMES:
            access = Access(
                principal="bench",
                scopes=(ScopeGrant(Scope.PROJECT, scope_id),),
                permissions=frozenset({Permission.READ}),
            )
            await calls.execute("; ".join(f"SET {name} = '{value}'" for name, value in access_settings(access).items()))
            rows += [await _sql_row(owner, calls, measure, shape, scope_id, count=count) for shape in STATEMENTS]
        return rows
    finally:
        await owner.close()
        await calls.close()


async def _sql_row(
    owner: asyncpg.Connection,
    calls: asyncpg.Connection,
    measure: Measure,
    shape: tuple[str, bool, bool, bool],
    scope_id: int,
    *,
    count: int,
) -> list[object]:
    label, vector, text, exact = shape
    narrowed = MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=scope_id),))

    def statement(i: int, *, conn_is_calls: bool) -> tuple[str, list[Any]]:
        return search_sql.candidates_statement(
            narrowed,
            vector=measure.vectors[i % count] if vector else None,
            text=measure.texts[i % count] if text else None,
            limit=K if not text else 40,
            exact=exact,
            full_rows=True,
            text_ranking=DEFAULT_TEXT_RANKING.values,
            rls=conn_is_calls,
        )

    async def on_owner(i: int) -> None:
        await owner.fetch(*_flat(statement(i, conn_is_calls=False)))

    async def on_calls(i: int) -> None:
        await calls.fetch(*_flat(statement(i, conn_is_calls=True)))

    await latencies(on_owner, on_calls, count=10)
    owner_s, calls_s = await latencies(on_owner, on_calls, count=count)
    plan = []
    executed: dict[int, list[float]] = {id(owner): [], id(calls): []}
    for i in range(EXPLAINED):
        for conn in (owner, calls):
            sql, values = statement(i, conn_is_calls=conn is calls)
            explain = f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}"
            (explained,) = json.loads(await conn.fetchval(explain, *values))
            executed[id(conn)].append(explained["Execution Time"])
            if i == 0:
                plan.append(scans(explained["Plan"]))
    calls_exec, owner_exec = (float(np.median(executed[id(c)])) for c in (calls, owner))
    return [
        label,
        SCOPE_NAMES[scope_id],
        percentile_ms(calls_s, 50),
        percentile_ms(owner_s, 50),
        f"{percentile_ms(calls_s, 50) - percentile_ms(owner_s, 50):+.3f}",
        f"{percentile_ms(calls_s, 50) / percentile_ms(owner_s, 50):.2f}x",
        f"{calls_exec:.3f} / {owner_exec:.3f}",
        f"{calls_exec / owner_exec:.2f}x",
        " / ".join(plan) if plan[0] != plan[1] else plan[0],
    ]


def _flat(statement: tuple[str, list[Any]]) -> list[Any]:
    return [statement[0], *statement[1]]


async def run(args: argparse.Namespace) -> None:
    with database_server() as server_dsn:
        data, used = load_corpus(args.dataset, args.rows)
        async with fresh_database(server_dsn) as dsn:
            print(f"{args.rows} rows of {used}: loading", flush=True)
            built = await build(dsn, data, args.index)
            print(f"  {built}", flush=True)
            secrets = {scope_id: await create_token(dsn, scope_id) for scope_id in SCOPE_NAMES}
            server = ServerProcess(service_env(dsn, args.index, AUTH_TOKENS=STATIC))
            try:
                await asyncio.to_thread(server.wait_ready)
                async with aio.insecure_channel(server.address) as channel:
                    stub = memory_pb2_grpc.MemoryServiceStub(channel)
                    measure = Measure(
                        data, None, None, count=args.queries, warmup=args.warmup, dsn=dsn, kind=args.index
                    )
                    by_hand = Caller(stub, STATIC, keep_filter=True)
                    started = time.perf_counter()
                    service_rows = []
                    for scope_id, secret in secrets.items():
                        token = Caller(stub, secret, keep_filter=False)
                        service_rows += await through_service(
                            measure, token, by_hand, scope_id, count=args.queries, warmup=args.warmup
                        )
                    print(f"  through the service in {time.perf_counter() - started:.0f} s", flush=True)
            finally:
                await asyncio.to_thread(server.stop)
            sql_rows = await sql_level(dsn, measure, count=args.queries)
    sizes = ", ".join(f"project:{s} holds {int((data.scope_ids == s).sum())} rows" for s in SCOPE_NAMES)
    print(f"\n{args.rows} rows of {used}, VECTOR_INDEX={args.index}, {sizes}; {args.queries} calls each, alternating\n")
    print_table(
        [
            "mode",
            "scope",
            "token p50 ms",
            "token p99 ms",
            "by hand p50 ms",
            "by hand p99 ms",
            "token / by hand",
            "min hits (token/hand)",
            "recall@10 (token / hand)",
            "plans (token / hand)",
        ],
        service_rows,
    )
    print("\nThe narrowed search SQL, as the calls role with the token's grants vs as the owner\n")
    headers = ["statement", "scope", "RLS p50 ms", "owner p50 ms", "difference ms", "ratio"]
    headers += ["server execution ms, median (RLS / owner)", "ratio", "scans (owner / RLS)"]
    print_table(headers, sql_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dataset", default="minilm")
    parser.add_argument("--index", default="ivfflat", choices=("ivfflat", "hnsw"))
    parser.add_argument("--queries", type=int, default=200, help="timed calls per mode, after the warm-up")
    parser.add_argument("--warmup", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
