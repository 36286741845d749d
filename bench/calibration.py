"""Does the calibration's promise hold on real questions? Cold and warm recall@10 on SciFact's claims.

    python -m bench.calibration --index hnsw
    python -m bench.calibration --index ivfflat

SciFact's 5,183 abstracts (their published all-MiniLM-L6-v2 vectors, ``scope_id = row % 4``) are copied into a new
database, and the service's own runtime (``Runtime``, as ``serve`` builds it; no gRPC, which does not change recall)
builds the index and calibrates it:

* **cold**: straight after the build, before any search (the calibration makes its queries from stored memories);
  recall is measured on claims 150-299, unfiltered and in scope 0 (about 1,300 abstracts);
* **warm**: a second runtime (its own sample of searches, as a restarted instance would have) serves claims 0-149
  as traffic, recalibrates on them, and recall is measured again on claims 150-299, which it never saw.

``EXACT_SEARCH_MAX_ROWS`` and ``SEARCH_NARROW_FILTER_ROWS`` are lowered so that a table of this size is searched
through the index at all. Each row prints the setting used, the recall each response estimated, and the recall
measured against the exact top 10 (numpy); the target is ``SEARCH_TARGET_RECALL`` (0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import asyncpg
import numpy as np
import numpy.typing as npt

from bench.corpus import Corpus
from bench.datasets import copy_into_memories, records
from bench.harness import database_server, fresh_database, print_table
from bench.minilm import DATA
from memory_service.app.runtime import Runtime
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter, Scope, ScopeRef, SearchMode, SearchQuery
from memory_service.storage.database import init_connection

K = 10
SCOPES = 4
SPLIT = 150
"""Claims before this are warm traffic; the rest are only ever measured."""


def scifact(data: Path = DATA) -> Corpus:
    stored = np.load(data / "all-MiniLM-L6-v2.npz")
    vectors = stored["corpus_vectors"].astype(np.float32)
    rows = len(vectors)
    return Corpus(
        vectors=vectors,
        texts=[f"abstract {i}" for i in stored["corpus_ids"]],
        topics=np.zeros(rows, dtype=np.int64),
        scope_ids=np.arange(rows, dtype=np.int64) % SCOPES,
        importance=np.zeros(rows, dtype=np.float32),
        centres=np.zeros((0, vectors.shape[1]), dtype=np.float32),
        vocabulary=[],
        query_vectors=stored["query_vectors"].astype(np.float32),
    )


async def measure(
    runtime: Runtime, data: Corpus, claims: npt.NDArray[np.float32], scope: int | None
) -> tuple[str, float, float]:
    """The settings used, the mean estimated recall and the measured recall@10 of ``claims``."""
    memory_filter = (
        MemoryFilter() if scope is None else MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=scope),))
    )
    rows = np.arange(len(data)) if scope is None else np.flatnonzero(data.scope_ids == scope)
    recalls, estimates, settings = [], [], set()
    for claim in claims:
        query = SearchQuery(text="", embedding=claim, mode=SearchMode.VECTOR, top_k=K, filter=memory_filter)
        result = await runtime.search.search(query)
        truth = set(rows[np.argpartition(-(data.vectors[rows] @ claim), K)[:K]].tolist())
        found = {int(hit.memory.key.removeprefix("row-")) for hit in result.hits}
        recalls.append(len(found & truth) / K)
        estimates.append(result.estimated_recall or 0.0)
        settings.add(f"{result.plan} {result.probes}")
    return ", ".join(sorted(settings)), float(np.mean(estimates)), float(np.mean(recalls))


async def run(args: argparse.Namespace) -> None:
    data = scifact()
    claims = data.query_vectors
    assert claims is not None
    rows: list[tuple[str, int | None, str, float, float]] = []
    with database_server() as server:
        async with fresh_database(server) as dsn:
            env = {
                "DATABASE_URL": dsn,
                "VECTOR_INDEX": args.index,
                "EXACT_SEARCH_MAX_ROWS": "1000",
                "SEARCH_NARROW_FILTER_ROWS": "500",
                "DATABASE_POOL_MIN": "1",
            }
            settings = Settings.from_env(env)
            cold = Runtime(settings, Metrics())
            await cold.start(background=False)
            try:
                await cold.binding.bind_now()
                conn = await asyncpg.connect(dsn)
                try:
                    await init_connection(conn)
                    await copy_into_memories(conn, records(data, model=cold.embedder.model))
                    await conn.execute("ANALYZE memory.memories")
                finally:
                    await conn.close()
                print(f"cold: {await cold.index.maintain(force=True)}", flush=True)
                for scope in (None, 0):
                    rows.append(("cold", scope, *await measure(cold, data, claims[SPLIT:], scope)))
            finally:
                await cold.close()
            warm = Runtime(settings, Metrics())
            await warm.start(background=False)
            try:
                for scope in (None, 0):
                    await measure(warm, data, claims[:SPLIT], scope)
                print(f"warm: {await warm.index.maintain()}", flush=True)
                for scope in (None, 0):
                    rows.append(("warm", scope, *await measure(warm, data, claims[SPLIT:], scope)))
            finally:
                await warm.close()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    measured = len(claims) - SPLIT
    print(f"\nSciFact MiniLM, {len(data)} abstracts, {args.index}, {measured} claims measured; load {load}\n")
    table = [[phase, "all" if scope is None else f"scope {scope}", *rest] for phase, scope, *rest in rows]
    print_table(["calibration", "filter", "plan and setting", "estimated", "measured recall@10"], table)
    low = sum(measured < settings.search_target_recall for *_, measured in rows)
    print(f"\ntarget {settings.search_target_recall}: {'met' if not low else f'missed in {low} rows'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="hnsw", choices=("ivfflat", "hnsw"))
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
