"""The same workload at growing table sizes, through the service and through the bare floor, in one run.

    python -m bench.scale --rows 10000,100000 --dataset hard
    python -m bench.scale --rows 10000,100000,1000000 --dataset minilm --index hnsw

For each size: a fresh database, the pre-embedded corpus loaded through the real server with BulkStore, VACUUM
(ANALYZE) and the text statistics refreshed (as the background work soon would), then ``memory-service reindex
--force`` (index build and, where the service has it, calibration; timed). Scope 0 holds 10,000 rows, scope 1
1% of the table, the rest is spread over scopes of about 1% each. Then a server with its default settings, and
the floor (``bench.floor``) with the probes the service's searches report, are called alternately, one call at a
time at one client: Store, Get, a List page deep inside scope 0 (through its cursor), and Search in every mode
unfiltered, on the 1% scope and on the 10k-row scope. recall@10 of VECTOR searches is against exact neighbours
(numpy over the loaded vectors), for the service and for the floor. Before any of that, straight after the build,
100 VECTOR searches in each scope measure the cold recall: what the first searches get on ``reindex``'s
calibration, before the server has seen traffic to recalibrate on.

``--dataset minilm`` has 100k real vectors (``bench.minilm``); larger sizes use ``hard`` and say so. The VECTOR
rows also show the scans PostgreSQL plans for both statements, since a label and a plan can differ.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
from grpc import aio
from pgvector.asyncpg import register_vector

from bench import minilm
from bench.corpus import Corpus
from bench.datasets import NAMES, corpus, queries
from bench.floor import scan_settings, vector_statement
from bench.harness import (
    ServerProcess,
    database_server,
    fresh_database,
    latencies,
    percentile_ms,
    print_table,
    reindex,
)
from memory_service.app.runtime import Runtime
from memory_service.client import MemoryClient
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.storage import index_sql, search_sql
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
SCOPE_10K = 0
SCOPE_1PCT = 1
STORE_SCOPE = 999_999
"""Stores go to a scope of their own, so the searched scopes keep their sizes."""
MODES = {
    "vector": memory_pb2.SEARCH_MODE_VECTOR,
    "text": memory_pb2.SEARCH_MODE_TEXT,
    "hybrid": memory_pb2.SEARCH_MODE_HYBRID,
}
FILTERS = {"none": None, "1%": SCOPE_1PCT, "10k scope": SCOPE_10K}
LIST_PAGE = 100


def scope_layout(rows: int, *, seed: int = 5) -> npt.NDArray[np.int64]:
    """scope_id per row: 1% of the rows in scope 1, 10,000 (or what is left) in scope 0, the rest in scopes 2.. of
    about 1% each; rows are assigned at random, so every scope is a sample of the whole corpus."""
    one_percent = max(1, rows // 100)
    ten_k = min(10_000, rows - one_percent)
    rest = rows - one_percent - ten_k
    layout = np.concatenate(
        [
            np.full(one_percent, SCOPE_1PCT),
            np.full(ten_k, SCOPE_10K),
            2 + np.arange(rest) % max(1, rest // one_percent),
        ]
    ).astype(np.int64)
    return layout[np.random.default_rng(seed).permutation(rows)]


def load_corpus(name: str, rows: int) -> tuple[Corpus, str]:
    """The corpus, and the name of the one actually used (minilm falls back to hard beyond its size)."""
    used = name
    if name == "minilm" and rows > minilm.available_rows():
        used = "hard"
        print(
            f"minilm has {minilm.available_rows()} rows, fewer than {rows}: using the hard synthetic corpus", flush=True
        )
    data = corpus(used, rows)
    data.scope_ids = scope_layout(rows)
    return data, used


def memory_inputs(data: Corpus) -> Iterator[memory_pb2.MemoryInput]:
    for i, text in enumerate(data.texts):
        message = memory_pb2.MemoryInput(
            scope=memory_pb2.SCOPE_PROJECT,
            scope_id=int(data.scope_ids[i]),
            key=f"row-{i}",
            value=text,
            importance=float(data.importance[i]),
        )
        message.embedding.extend(data.vectors[i].tolist())
        yield message


@dataclasses.dataclass
class Build:
    ingest_rows_per_s: float = 0.0
    vacuum_s: float = 0.0
    text_stats_s: float = 0.0
    reindex_s: float = 0.0
    reindex_said: str = ""
    table_mb: float = 0.0
    vector_index_mb: float = 0.0


def service_env(dsn: str, index: str, **extra: str) -> dict[str, str]:
    # One server process, as the floor is one: SERVER_PROCESSES in the environment overrides it.
    env = {
        "DATABASE_URL": dsn,
        "VECTOR_INDEX": index,
        "DATABASE_POOL_MIN": "4",
        "DATABASE_POOL_MAX": "20",
        "SERVER_PROCESSES": "1",
    }
    for name in ("SEARCH_TARGET_RECALL", "EMBEDDING_PROVIDER", "SERVER_PROCESSES"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {**env, **extra}


async def build(dsn: str, data: Corpus, index: str) -> Build:
    """Load through BulkStore, settle the table as background work would, and build the index as operators do."""
    result = Build()
    # No index work while loading: the index is built once, by `reindex`, and timed.
    loader = ServerProcess(service_env(dsn, index, EXACT_SEARCH_MAX_ROWS="1000000000"))
    try:
        await asyncio.to_thread(loader.wait_ready)
        async with MemoryClient(loader.address, timeout=60.0) as client:
            await client.stats()
            started = time.perf_counter()
            summary = await client.bulk_store(memory_inputs(data), batch_size=1000)
            result.ingest_rows_per_s = len(data) / (time.perf_counter() - started)
        assert not summary.rejections, list(summary.rejections.items())[:3]
    finally:
        await asyncio.to_thread(loader.stop)
    settings = Settings.from_env({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": "1", "DATABASE_POOL_MAX": "2"})
    runtime = Runtime(settings, Metrics())
    await runtime.start(background=False)
    try:
        started = time.perf_counter()
        async with runtime.db.connection() as conn:
            # As autovacuum soon would: the first reads of freshly written pages would otherwise set hint bits.
            await conn.execute("VACUUM (ANALYZE) memory.memories")
        result.vacuum_s = time.perf_counter() - started
        started = time.perf_counter()
        await runtime.text_stats.refresh()
        result.text_stats_s = time.perf_counter() - started
    finally:
        await runtime.close()
    result.reindex_said, result.reindex_s = await asyncio.to_thread(reindex, service_env(dsn, index))
    conn = await asyncpg.connect(dsn)
    try:
        result.table_mb = await conn.fetchval("SELECT pg_total_relation_size('memory.memories')") / 2**20
        result.vector_index_mb = (
            await conn.fetchval(
                "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)::bigint FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE i.indrelid = 'memory.memories'::regclass AND a.amname IN ('ivfflat', 'hnsw')"
            )
            / 2**20
        )
    finally:
        await conn.close()
    return result


@dataclasses.dataclass
class Row:
    call: str
    scope: str
    service: list[float]
    floor: list[float]
    recall_service: float | None = None
    recall_floor: float | None = None
    estimated_recall: float | None = None
    """The mean of the responses' ``estimated_recall`` (the service's calibration at the probes it used)."""
    plan: str = ""
    """The service's plans (the response's ``plan``), and for VECTOR the scans of the floor's statement."""

    def cells(self) -> list[object]:
        ratio = percentile_ms(self.service, 50) / percentile_ms(self.floor, 50)
        return [
            self.call,
            self.scope,
            percentile_ms(self.service, 50),
            percentile_ms(self.service, 99),
            percentile_ms(self.floor, 50),
            percentile_ms(self.floor, 99),
            f"{ratio:.2f}x",
            "" if self.recall_service is None else self.recall_service,
            "" if self.recall_floor is None else self.recall_floor,
            "" if self.estimated_recall is None else self.estimated_recall,
            self.plan,
        ]


HEADERS = [
    "call",
    "scope",
    "p50 ms",
    "p99 ms",
    "floor p50",
    "floor p99",
    "x floor p50",
    "recall@10",
    "floor recall",
    "estimated recall",
    "plan, probes: service's (its generic plan's scans) / floor's scans",
]


class Measure:
    """Alternating calls to the service and the floor over the same requests."""

    def __init__(self, data: Corpus, service: Any, floor: Any, *, count: int, warmup: int, dsn: str, kind: str) -> None:
        self.dsn = dsn
        self.kind = kind
        self.data = data
        self.service = service
        self.floor = floor
        self.count = count
        self.warmup = warmup
        self.vectors, self.texts = queries(data, count)
        self.keys = {f"row-{i}": i for i in range(len(data))}

    async def pair(self, make: Callable[[Any, int], Awaitable[object]]) -> tuple[list[float], list[float]]:
        async def on_service(i: int) -> None:
            await make(self.service, i)

        async def on_floor(i: int) -> None:
            await make(self.floor, i)

        await latencies(on_service, on_floor, count=self.warmup)
        service, floor = await latencies(on_service, on_floor, count=self.count)
        return service, floor

    async def plans(self, scope_id: int | None, service_plan: str, probes: int) -> str:
        """What PostgreSQL plans for the VECTOR statements: the service's as a generic plan (the one its cached
        statements settle on), the floor's for its own values (it plans every execution)."""
        exact = probes == 0
        floor_sql = vector_statement(scoped=scope_id is not None, top_k=K, exact=exact)
        memory_filter = MemoryFilter()
        if scope_id is not None:
            memory_filter = MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=scope_id),))
        setting = max(probes, K) if self.kind == "hnsw" and probes else probes
        conn = await asyncpg.connect(self.dsn, server_settings=scan_settings(self.kind, setting))
        try:
            await register_vector(conn)
            # An HNSW graph up to a watermark is searched with its tail, as the service does.
            watermark = (await index_sql.index_info(conn, self.kind)).watermark if self.kind != "none" else None
            service_sql, values = search_sql.candidates_statement(
                memory_filter,
                vector=self.vectors[0],
                text=None,
                limit=K,
                exact=service_plan == "exact",
                full_rows=True,
                watermark=watermark,
            )
            scope = () if scope_id is None else ("project", scope_id)
            (floor,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {floor_sql}", self.vectors[0], *scope))
            await conn.execute(f"SET plan_cache_mode = force_generic_plan; PREPARE service_vector AS {service_sql}")
            # EXECUTE takes no bind parameters; a generic plan does not look at the values anyway.
            explain = f"EXPLAIN (FORMAT JSON) EXECUTE service_vector({', '.join(map(literal, values))})"
            (service,) = json.loads(await conn.fetchval(explain))
        finally:
            await conn.close()
        return f"{service_plan}, {probes}: {scans(service['Plan'])} / {scans(floor['Plan'])}"

    def truth(self, i: int, scope_id: int | None) -> set[int]:
        if scope_id is None:
            similarity = self.data.vectors @ self.vectors[i]
            return {int(x) for x in np.argpartition(-similarity, K)[:K]}
        rows = np.flatnonzero(self.data.scope_ids == scope_id)
        similarity = self.data.vectors[rows] @ self.vectors[i]
        return {int(x) for x in rows[np.argpartition(-similarity, K)[:K]]}

    def request(self, mode: str, scope_id: int | None, i: int) -> memory_pb2.SearchRequest:
        request = memory_pb2.SearchRequest(mode=MODES[mode], top_k=K)
        if mode != "text":
            request.query_embedding.extend(self.vectors[i].tolist())
        if mode != "vector":
            request.query = self.texts[i]
        if scope_id is not None:
            request.filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=scope_id)
        return request

    async def search(self, mode: str, scope_name: str) -> Row:
        scope_id = FILTERS[scope_name]
        requests = [self.request(mode, scope_id, i) for i in range(self.count)]
        # The floor scans as the service did: exactly where it did, else at the probes it reported.
        first = await self.service.Search(requests[0])
        floor_requests = []
        for request in requests:
            floor_request = memory_pb2.SearchRequest()
            floor_request.CopyFrom(request)
            floor_request.exact = mode != "text" and first.plan == "exact"
            floor_request.probes = first.probes
            floor_requests.append(floor_request)
        answers: dict[int, dict[int, set[int]]] = {id(self.service): {}, id(self.floor): {}}
        plans: set[str] = set()
        estimates: list[float] = []

        async def call(stub: Any, i: int) -> None:
            on_service = stub is self.service
            response = await stub.Search((requests if on_service else floor_requests)[i % self.count])
            answers[id(stub)][i] = {self.keys[h.memory.key] for h in response.hits}
            if on_service:
                plans.add(f"{response.plan}" + (f" {response.probes}" if response.probes != first.probes else ""))
                if response.HasField("estimated_recall"):
                    estimates.append(response.estimated_recall)

        service, floor = await self.pair(call)
        row = Row(f"Search {mode}", scope_name, service, floor, plan=" ".join(sorted(plans)))
        row.estimated_recall = float(np.mean(estimates)) if estimates else None
        if mode == "vector":
            row.plan = await self.plans(scope_id, row.plan, first.probes)
        else:
            row.plan += f", {first.probes}"
        if mode == "vector":
            truths = [self.truth(i, scope_id) for i in range(self.count)]

            def recall(got: dict[int, set[int]]) -> float:
                return float(np.mean([len(got[i] & truths[i]) / K for i in range(self.count)]))

            row.recall_service, row.recall_floor = recall(answers[id(self.service)]), recall(answers[id(self.floor)])
        return row


def _fraction(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def literal(value: object) -> str:
    """A SQL literal of one of the search statement's values (numbers, strings, vectors: all made here)."""
    if isinstance(value, np.ndarray):
        value = "[" + ",".join(map(str, value.tolist())) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


async def index_kind(dsn: str) -> str:
    """The access method of the vector index the table has (what was built, whatever was asked for)."""
    conn = await asyncpg.connect(dsn)
    try:
        kind: str | None = await conn.fetchval(
            "SELECT a.amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE i.indrelid = 'memory.memories'::regclass AND a.amname IN ('ivfflat', 'hnsw') LIMIT 1"
        )
    finally:
        await conn.close()
    return kind or "none"


def scans(node: dict[str, Any]) -> str:
    """The tables' scans of a plan, outermost first, each once: ``Index Scan(memories_embedding_ivfflat)``."""
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        kind = node["Node Type"]
        if "Scan" in kind and kind not in ("CTE Scan", "Subquery Scan", "Function Scan"):
            name = kind + (f"({node['Index Name']})" if "Index Name" in node else "")
            if name not in found:
                found.append(name)
        for child in node.get("Plans", ()):
            walk(child)

    walk(node)
    return " ".join(found)


TRAFFIC = 200
COLD_QUERIES = 100


async def cold_recall(service: Any, data: Corpus) -> dict[str, tuple[float, str]]:
    """recall@10 of VECTOR searches before any traffic (the server runs on ``reindex``'s calibration, made on
    queries between stored memories), unfiltered and in each measured scope, with the response's estimate: the
    first searches after a build must get what the calibration promised, not only those after recalibration."""
    measure = Measure(data, service, service, count=COLD_QUERIES, warmup=0, dsn="", kind="")
    found: dict[str, tuple[float, str]] = {}
    for scope_name, scope_id in FILTERS.items():
        recalls, estimates, plans = [], [], set()
        for i in range(COLD_QUERIES):
            response = await service.Search(measure.request("vector", scope_id, i))
            got = {measure.keys[h.memory.key] for h in response.hits}
            recalls.append(len(got & measure.truth(i, scope_id)) / K)
            plans.add(f"{response.plan} {response.probes}" if response.probes else response.plan)
            if response.HasField("estimated_recall"):
                estimates.append(response.estimated_recall)
        estimate = f"{np.mean(estimates):.3f}" if estimates else "-"
        found[scope_name] = (float(np.mean(recalls)), f"estimated {estimate}; {', '.join(sorted(plans))}")
    return found


async def serve_traffic(service: Any, data: Corpus, count: int) -> str:
    """Searches before measuring, as production traffic: queries from the same distribution that are not among the
    ``count`` measured ones (for minilm, held-out pieces), unfiltered and in the 10k-row scope. The server keeps
    those that use the index and recalibrates on them (``reindex`` ran in a process that had seen none); wait
    for it, as a server in production would have."""
    vectors = queries(data, count + TRAFFIC)[0][count:]
    through_index = 0
    for vector in vectors:
        for scope_id in (None, FILTERS["10k scope"]):
            request = memory_pb2.SearchRequest(mode=MODES["vector"], top_k=K, query_embedding=vector.tolist())
            if scope_id is not None:
                request.filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=scope_id)
            plan = (await service.Search(request)).plan
            through_index += scope_id is None and plan != "exact"
    if not through_index:
        return "no recalibration on traffic: every search was exact (the table is below EXACT_SEARCH_MAX_ROWS)"
    # The server recalibrates at 50 searches seen, then each time its sample has doubled (up to 200): wait for the
    # last of those this traffic brings.
    for _ in range(300):
        calibration = (await service.Stats(memory_pb2.StatsRequest())).index.calibration
        if calibration.source == "searches" and 2 * calibration.queries > min(through_index, 200):
            return (
                f"recalibrated on {calibration.queries} searches: probes {calibration.probes} "
                f"(recall {calibration.recall:.3f}); filtered on {calibration.filtered_source or '-'}"
            )
        await asyncio.sleep(1)
    return "no recalibration on traffic (no search used the index)"


async def measure_size(
    dsn: str, data: Corpus, index: str, *, count: int, warmup: int
) -> tuple[list[Row], dict[str, Any]]:
    # Index checks every second, so the server recalibrates on the traffic below without a minute's wait.
    server = ServerProcess(service_env(dsn, index, INDEX_CHECK_INTERVAL="1s"))
    floor_process: ServerProcess | None = None
    try:
        await asyncio.to_thread(server.wait_ready)
        service_channel = aio.insecure_channel(server.address)
        service = memory_pb2_grpc.MemoryServiceStub(service_channel)
        # The cold queries are the measured ones' first COLD_QUERIES: the traffic below is drawn after them.
        cold = await cold_recall(service, data)
        print(f"cold recall@10: {cold}", flush=True)
        print(await serve_traffic(service, data, count), flush=True)
        stats = await service.Stats(memory_pb2.StatsRequest())
        built_kind = await index_kind(dsn)
        index_state = stats.index
        calibration = index_state.calibration
        info: dict[str, Any] = {
            "index": built_kind,
            "lists": index_state.lists,
            "m": index_state.m,
            "target recall": index_state.target_recall,
            "probes": calibration.probes,
            "calibrated recall": calibration.recall,
            "filtered probes": calibration.filtered_probes if calibration.HasField("filtered_probes") else "-",
            "filtered recall": calibration.filtered_recall if calibration.HasField("filtered_recall") else "-",
            "calibration s": calibration.seconds,
            "calibrated on": f"{calibration.queries} {calibration.source} / {calibration.filtered_source or '-'}",
            "cold recall": cold,
        }
        floor_process = ServerProcess(
            {"DATABASE_URL": dsn, "VECTOR_INDEX": built_kind, "FLOOR_POOL": "4"}, command=("-m", "bench.floor")
        )
        await asyncio.to_thread(floor_process.wait_ready)
        floor_channel = aio.insecure_channel(floor_process.address)
        floor = memory_pb2_grpc.MemoryServiceStub(floor_channel)
        try:
            rows = await calls(dsn, data, service, floor, count=count, warmup=warmup, kind=built_kind)
        finally:
            await service_channel.close()
            await floor_channel.close()
        return rows, info
    finally:
        await asyncio.to_thread(server.stop)
        if floor_process is not None:
            await asyncio.to_thread(floor_process.stop)


async def deep_page(dsn: str, service: Any) -> tuple[str, str]:
    """Cursors to the page that starts halfway into the 10k-row scope: the service's, and the floor's (an id)."""
    scope_filter = memory_pb2.MemoryFilter()
    scope_filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=SCOPE_10K)
    conn = await asyncpg.connect(dsn)
    try:
        size = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE scope_id = $1", SCOPE_10K)
    finally:
        await conn.close()
    token, skipped, last = "", 0, 0
    while skipped + 1000 <= size // 2:
        page = await service.List(memory_pb2.ListRequest(filter=scope_filter, page_size=1000, page_token=token))
        token, skipped, last = page.next_page_token, skipped + len(page.memories), page.memories[-1].id
    return token, str(last) if skipped else ""


async def calls(dsn: str, data: Corpus, service: Any, floor: Any, *, count: int, warmup: int, kind: str) -> list[Row]:
    measure = Measure(data, service, floor, count=count, warmup=warmup, dsn=dsn, kind=kind)
    rng = np.random.default_rng(9)
    conn = await asyncpg.connect(dsn)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM memory.memories ORDER BY random() LIMIT $1", count)]
    finally:
        await conn.close()
    rows: list[Row] = []

    async def get(stub: Any, i: int) -> None:
        await stub.Get(memory_pb2.GetRequest(id=ids[i % len(ids)]))

    rows.append(Row("Get", "", *await measure.pair(get)))
    service_token, floor_token = await deep_page(dsn, service)
    scope_filter = memory_pb2.MemoryFilter()
    scope_filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=SCOPE_10K)

    async def list_page(stub: Any, i: int) -> None:
        token = service_token if stub is service else floor_token
        page = await stub.List(memory_pb2.ListRequest(filter=scope_filter, page_size=LIST_PAGE, page_token=token))
        assert len(page.memories) == LIST_PAGE

    rows.append(Row(f"List page of {LIST_PAGE}, halfway", "10k scope", *await measure.pair(list_page)))
    for scope_name in FILTERS:
        for mode in MODES:
            rows.append(await measure.search(mode, scope_name))
            print(f"  measured Search {mode} / {scope_name}", flush=True)
    stored = iter(range(10**9))

    async def store(stub: Any, i: int) -> None:
        n = next(stored)
        memory = memory_pb2.MemoryInput(
            scope=memory_pb2.SCOPE_PROJECT,
            scope_id=STORE_SCOPE,
            key=f"store-{n}",
            value=f"stored memory {n}: " + measure.texts[i % count],
            importance=float(rng.uniform()),
        )
        memory.embedding.extend(measure.vectors[i % count].tolist())
        await stub.Store(memory_pb2.StoreRequest(memory=memory))

    rows.insert(0, Row("Store (new memory)", "", *await measure.pair(store)))
    return rows


async def run(args: argparse.Namespace) -> None:
    sizes = [int(r) for r in args.rows.split(",")]
    summary: list[list[object]] = []
    by_size: dict[int, list[Row]] = {}
    with database_server() as server_dsn:
        for rows in sizes:
            data, used = load_corpus(args.dataset, rows)
            async with fresh_database(server_dsn) as dsn:
                print(f"{rows} rows of {used}: loading", flush=True)
                built = await build(dsn, data, args.index)
                print(f"  {built}", flush=True)
                table, info = await measure_size(dsn, data, args.index, count=args.queries, warmup=args.warmup)
            by_size[rows] = table
            sizes_note = (
                f"scope sizes: 10k scope {int((data.scope_ids == SCOPE_10K).sum())}, "
                f"1% scope {int((data.scope_ids == SCOPE_1PCT).sum())}"
            )
            heading = f"{rows} rows, dataset {used}, VECTOR_INDEX={args.index}, built {info}, {sizes_note}"
            print(f"\n{heading}, {args.queries} calls each\n")
            print_table(HEADERS, [r.cells() for r in table])
            print(f"\nVECTOR before any traffic ({COLD_QUERIES} queries, on reindex's calibration)\n")
            cold = info["cold recall"]
            print_table(["scope", "cold recall@10", "estimate, plans"], [[k, *v] for k, v in cold.items()])
            summary.append(
                [
                    rows,
                    used,
                    built.ingest_rows_per_s,
                    built.vacuum_s,
                    built.text_stats_s,
                    built.reindex_s,
                    info["index"],
                    info["lists"] or info["m"],
                    f"{info['probes']} / {info['filtered probes']}",
                    f"{info['calibrated recall']:.3f} / {_fraction(info['filtered recall'])}",
                    info["calibration s"],
                    info["calibrated on"],
                    " / ".join(f"{recall:.3f}" for recall, _ in info["cold recall"].values()),
                    built.table_mb,
                    built.vector_index_mb,
                ]
            )
    print()
    print_table(
        [
            "rows",
            "dataset",
            "BulkStore rows/s",
            "VACUUM s",
            "text stats s",
            "reindex s",
            "index",
            "lists (m)",
            "probes / filtered",
            "calibrated recall / filtered",
            "calibration s",
            "calibrated on",
            "cold recall@10 " + " / ".join(FILTERS),
            "table MB",
            "vector index MB",
        ],
        summary,
    )
    print()
    first = by_size[sizes[0]]
    headers = ["call", "scope"]
    for rows in sizes:
        headers += [f"p50 ms @{rows}", f"x floor @{rows}"]
    compact = []
    for i, row in enumerate(first):
        cells: list[object] = [row.call, row.scope]
        for rows in sizes:
            r = by_size[rows][i]
            cells += [percentile_ms(r.service, 50), f"{percentile_ms(r.service, 50) / percentile_ms(r.floor, 50):.2f}x"]
        compact.append(cells)
    print_table(headers, compact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000", help="table sizes, comma-separated")
    parser.add_argument("--dataset", default="hard", choices=NAMES)
    parser.add_argument("--index", default="ivfflat", choices=("ivfflat", "hnsw"), help="VECTOR_INDEX of the server")
    parser.add_argument("--queries", type=int, default=300, help="timed calls per row, after the warm-up")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per row first")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
