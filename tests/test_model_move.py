"""A move to another embedding model through real servers and the real `memory-service model` command.

The next model here is the hash embedder at another dimension (256): a generation of its own, cheap to compute.
tests/test_model_move_scifact.py moves SciFact from the hash embedder to MiniLM; tests/test_model_move_kill.py
kills the backfill's holder.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest

from memory_service.cli.main import main
from memory_service.config.settings import Settings
from memory_service.errors import EmbeddingConfigMismatch, GenerationChanged
from memory_service.generations.backfill import BackfillWorker
from memory_service.generations.state import check_configuration
from memory_service.generations.types import GenerationState, ModelSpec, Move, Phase
from memory_service.memories.writes import Embedded, WritePath
from memory_service.models import MemoryFilter, NewMemory, Scope, content_hash
from memory_service.search.tuning import DEFAULT_TEXT_RANKING
from memory_service.storage import index_sql, ingest_sql, memories_sql, search_sql
from memory_service.storage.database import Connection
from memory_service.storage.index_sql import REBUILD_LOCK_KEY
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env
from tests.fake_openai import FakeOpenAI

NEXT = {"EMBEDDING_NEXT_PROVIDER": "hash", "EMBEDDING_NEXT_MODEL": "hash-ngram-v1-256", "EMBEDDING_NEXT_DIM": "256"}
AFTER = {"EMBEDDING_PROVIDER": "hash", "EMBEDDING_MODEL": "hash-ngram-v1-256", "EMBEDDING_DIM": "256"}


def store(value: str) -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value=value))


def search(text: str) -> memory_pb2.SearchRequest:
    return memory_pb2.SearchRequest(query=text, mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=5, include_embedding=True)


async def model(env: dict[str, str], action: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(main, ["model", action], env)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def doctor(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["doctor"], env)
    return code, capsys.readouterr().out


async def backfill(running: RunningServer) -> str:
    """Run the backfill until complete: this call, or the server's own round if it holds the lease now."""
    worker: BackfillWorker = running.server.runtime.moves.backfill
    for _ in range(300):
        if (outcome := await worker.run()) == "backfill complete":
            return outcome
        await asyncio.sleep(0.1)
    return outcome


async def test_a_move_backfills_cuts_over_rolls_back_and_finishes(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = test_env(database_url)
    first = await start_server(env)
    try:
        for i in range(40):
            await first.memory.Store(store(f"note {i} about topic {i % 7} and word{i}"))
    finally:
        await stop_server(first)

    moving = await start_server({**env, **NEXT})
    try:
        code, out = await model(env, "status", capsys)
        assert code == 0 and '"phase": "backfilling"' in out, out
        code, out = await model(env, "cutover", capsys)
        assert code == 1 and "backfill is not complete" in out, out
        # Written while the move is under way: its next vector comes from the writer or the backfill.
        await moving.memory.Store(store("written during the move"))
        assert await backfill(moving) == "backfill complete"
        stats = await moving.memory.Stats(memory_pb2.StatsRequest())
        assert stats.model_move.phase == "backfilling"
        assert stats.model_move.backfill_complete and stats.model_move.backfill_done == 41
        assert stats.model_move.gate_memories.queries > 0
        runtime = moving.server.runtime
        await runtime.moves.refresh()
        registry = runtime.metrics.registry
        gate = stats.model_move.gate_memories
        assert registry.get_sample_value("memory_model_move_phase") == 1
        assert registry.get_sample_value("memory_model_backfill_done_memories") == 41
        assert (
            registry.get_sample_value("memory_model_gate_overlap_at_10", {"sample": "memories"}) == gate.overlap_at_10
        )
        changed = registry.get_sample_value("memory_model_gate_top_hit_changed_ratio", {"sample": "memories"})
        assert changed == gate.top_hit_changed

        before = await moving.memory.Search(search("topic 3"))
        assert {len(h.memory.embedding) for h in before.hits} == {384}
        # An index rebuild or calibration (here: its lock, held as index maintenance holds it) must not span the
        # swap of the columns: the cut-over is refused, nothing changed, and goes ahead once the job is done.
        maintenance = await asyncpg.connect(database_url)
        try:
            await maintenance.execute("SELECT pg_advisory_lock($1)", REBUILD_LOCK_KEY)
            code, out = await model(env, "cutover", capsys)
            assert code == 1 and "index maintenance is building or calibrating" in out, out
        finally:
            await maintenance.close()
        code, out = await model(env, "status", capsys)
        assert code == 0 and '"phase": "backfilling"' in out, out
        code, out = await model(env, "cutover", capsys)
        assert code == 0 and "cut over to hash 'hash-ngram-v1-256' (256 dimensions)" in out, out
        after = await moving.memory.Search(search("topic 3"))
        assert {len(h.memory.embedding) for h in after.hits} == {256}
        # doctor checks the configuration as a starting server would: fine with the next model, not without it.
        _, out = await doctor({**env, **NEXT}, capsys)
        assert "ok     model: bound to hash-ngram-v1-256 (256 dimensions); cut_over:" in out, out
        _, out = await doctor(env, capsys)
        assert "ACTION model: the configuration cannot serve this database" in out, out
        assert "configure it as EMBEDDING_NEXT_*" in out, out
        stats = await moving.memory.Stats(memory_pb2.StatsRequest())
        assert (stats.embedding_model, stats.dimension, stats.model_move.phase) == (
            "hash-ngram-v1-256",
            256,
            "cut_over",
        )
        # Stores keep both generations: the rollback needs the previous one.
        await moving.memory.Store(store("written after the cut-over"))
        # A memory stored again as it is stays as it is: the cut-over changed no memory, so no version is recorded.
        again = await moving.memory.Store(store("note 3 about topic 3 and word3"))
        assert again.outcome == memory_pb2.WRITE_OUTCOME_UNCHANGED

        code, out = await model(env, "rollback", capsys)
        assert code == 0, out
        back = await moving.memory.Search(search("written after the cut-over"))
        assert {len(h.memory.embedding) for h in back.hits} == {384}
        assert await backfill(moving) == "backfill complete"
        code, out = await model(env, "cutover", capsys)
        assert code == 0, out
        code, out = await model(env, "finish", capsys)
        assert code == 0 and "unset EMBEDDING_NEXT_*" in out, out
        done = await moving.memory.Search(search("topic 3"))
        assert {len(h.memory.embedding) for h in done.hits} == {256}
    finally:
        await stop_server(moving)

    with pytest.raises(EmbeddingConfigMismatch) as refused:
        await start_server({**env, **NEXT})
    message = str(refused.value)
    assert "EMBEDDING_PROVIDER=hash EMBEDDING_MODEL=hash-ngram-v1-256 EMBEDDING_DIM=256" in message
    assert "\n" not in message
    with pytest.raises(EmbeddingConfigMismatch):
        await start_server(env)

    served = await start_server({**env, **AFTER})
    try:
        found = await served.memory.Search(search("written during the move"))
        assert found.hits[0].memory.value == "written during the move"
        listed = await served.memory.List(memory_pb2.ListRequest(page_size=100))
        assert len(listed.memories) == 42
    finally:
        await stop_server(served)


async def test_a_server_without_the_current_model_refuses_searches_after_a_cut_over(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = test_env(database_url)
    moving = await start_server({**env, **NEXT})
    old = None
    try:
        await moving.memory.Store(store("bound before the move"))
        await stop_server(moving)
        moving = await start_server({**env, **NEXT})
        old = await start_server(env)  # rolling restart: this one has no next model yet
        await old.memory.Store(store("stored by the instance without the next model"))
        assert await backfill(moving) == "backfill complete"
        code, out = await model(env, "cutover", capsys)
        assert code == 0, out
        with pytest.raises(grpc.RpcError) as refused:
            await old.memory.Search(search("move"))
        assert code_of(refused.value) is grpc.StatusCode.FAILED_PRECONDITION
        assert "EMBEDDING_NEXT" in (refused.value.details() or "")
        found = await moving.memory.Search(search("stored by the instance without the next model"))
        assert found.hits[0].memory.value == "stored by the instance without the next model"
    finally:
        if old is not None:
            await stop_server(old)
        await stop_server(moving)


def test_next_model_settings_are_checked() -> None:
    settings = Settings.from_env({**NEXT})
    nxt = settings.next_embedding()
    assert nxt is not None and (nxt.embedding_model, nxt.embedding_dim) == ("hash-ngram-v1-256", 256)
    assert Settings.from_env({}).next_embedding() is None
    with pytest.raises(Exception, match="EMBEDDING_NEXT_PROVIDER"):
        Settings.from_env({"EMBEDDING_NEXT_MODEL": "x"})


async def test_a_rollback_before_the_cut_over_gives_the_move_up(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = test_env(database_url)
    first = await start_server(env)
    try:
        await first.memory.Store(store("kept through the move that was given up"))
    finally:
        await stop_server(first)
    moving = await start_server({**env, **NEXT})
    await stop_server(moving)  # every instance has dropped the next model again
    code, out = await model(env, "rollback", capsys)
    assert code == 0 and "gave up the move" in out, out
    code, out = await model(env, "status", capsys)
    assert code == 0 and '"phase": "steady"' in out, out
    served = await start_server(env)
    try:
        found = await served.memory.Search(search("given up"))
        assert {len(h.memory.embedding) for h in found.hits} == {384}
    finally:
        await stop_server(served)
    code, out = await model(env, "rollback", capsys)
    assert code == 1 and "no move is under way" in out, out


async def test_a_write_whose_generation_is_replaced_runs_again_in_the_new_one(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The write path fixes the generation before it embeds; a cut-over between the embedding and the commit fails
    the statement (nothing written), and the write runs again with vectors of the new roles."""
    env = test_env(database_url)
    moving = await start_server({**env, **NEXT})
    try:
        await moving.memory.Store(store("bound before the move"))
        await stop_server(moving)
        moving = await start_server({**env, **NEXT})
        assert await backfill(moving) == "backfill complete"
        runtime = moving.server.runtime
        writes = WritePath(
            runtime.db, runtime.embedder, runtime.binding, history=True, generations=runtime.moves.generations
        )
        memory = NewMemory(
            scope=Scope.GLOBAL, scope_id=0, key="raced", value="raced by a cut-over", content_hash=content_hash("raced")
        )
        embedded = await writes.embeddings([memory])
        assert (embedded.model, len(embedded.vectors[0])) == ("hash-ngram-v1", 384)
        assert embedded.others[0] is not None and len(embedded.others[0]) == 256
        code, out = await model(env, "cutover", capsys)  # after the embedding, before the write
        assert code == 0, out

        runs: list[Embedded] = []

        async def upsert(conn: Connection, given: Embedded) -> int:
            runs.append(given)
            memory_id, _ = await memories_sql.upsert(
                conn,
                memory,
                given.vectors[0],
                given.model,
                history=None,
                other=given.others[0],
                generation=given.generation,
            )
            return memory_id

        # A search planned before the cut-over (its query vector of the previous model) fails its generation check,
        # in every plan, before a vector of one generation is compared with the other's.
        for exact, text in ((True, None), (False, None), (True, "raced")):
            with pytest.raises(GenerationChanged):
                async with runtime.db.connection() as conn:
                    await search_sql.candidates(
                        conn,
                        MemoryFilter(),
                        vector=embedded.vectors[0],
                        text=text,
                        limit=5,
                        exact=exact,
                        full_rows=text is None,
                        text_ranking=DEFAULT_TEXT_RANKING.values,
                        generation=embedded.generation,
                    )

        memory_id = await writes.write([memory], embedded, (), upsert)
        assert [run.generation for run in runs] == [embedded.generation, embedded.generation + 1]
        other = runs[1].others[0]
        assert other is not None
        assert (runs[1].model, len(runs[1].vectors[0]), len(other)) == ("hash-ngram-v1-256", 256, 384)
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT vector_dims(embedding) AS current, vector_dims(embedding_alt) AS other "
                "FROM memory.memories WHERE id = $1",
                memory_id,
            )
        finally:
            await conn.close()
        assert row is not None and (row["current"], row["other"]) == (256, 384)

        # BulkStore's statement, across a rollback: staged rows, one upsert from the staging table.
        bulk = dataclasses.replace(memory, key="raced in bulk", value="raced by a rollback")
        embedded = await writes.embeddings([bulk])
        assert embedded.model == "hash-ngram-v1-256"
        code, out = await model(env, "rollback", capsys)
        assert code == 0, out
        bulk_runs: list[Embedded] = []

        async def upsert_staged(conn: Connection, given: Embedded) -> ingest_sql.WriteCounts:
            bulk_runs.append(given)
            await ingest_sql.stage(conn, ingest_sql.staging_records([bulk], given.vectors, given.others))
            return await ingest_sql.upsert_staged(conn, 1, given.model, history=None, generation=given.generation)

        counts = await writes.write([bulk], embedded, (), upsert_staged)
        assert counts.created == 1
        assert [(run.model, len(run.vectors[0])) for run in bulk_runs] == [
            ("hash-ngram-v1-256", 256),
            ("hash-ngram-v1", 384),
        ]
        conn = await asyncpg.connect(database_url)
        try:
            dims = await conn.fetch(
                "SELECT vector_dims(embedding) AS current, vector_dims(embedding_alt) AS other FROM memory.memories"
            )
        finally:
            await conn.close()
        assert {(r["current"], r["other"]) for r in dims} == {(384, 256)}
    finally:
        await stop_server(moving)


A_MODEL = ModelSpec("hash", "hash-ngram-v1", 384)
B_MODEL = ModelSpec("hash", "hash-ngram-v1-256", 256)
C_MODEL = ModelSpec("local", "all-MiniLM-L6-v2", 384)
_STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def _moving(phase: Phase) -> GenerationState:
    current = A_MODEL if phase is Phase.BACKFILLING else B_MODEL
    return GenerationState(epoch=1, current=current, move=Move(A_MODEL, B_MODEL, phase, _STARTED))


@pytest.mark.parametrize(
    ("state", "configured", "next_model", "refusal"),
    [
        # The rows of "Instances during a rolling restart" in docs/model-migration.md, in order.
        (GenerationState(current=A_MODEL), A_MODEL, B_MODEL, None),
        (GenerationState(current=A_MODEL), A_MODEL, None, None),
        (
            GenerationState(epoch=3, current=B_MODEL, finished=Move(A_MODEL, B_MODEL, Phase.CUT_OVER, _STARTED)),
            A_MODEL,
            None,
            "EMBEDDING_MODEL=hash-ngram-v1-256 EMBEDDING_DIM=256",
        ),
        (_moving(Phase.BACKFILLING), A_MODEL, B_MODEL, None),
        (_moving(Phase.BACKFILLING), A_MODEL, None, None),
        (_moving(Phase.CUT_OVER), A_MODEL, B_MODEL, None),
        (_moving(Phase.CUT_OVER), A_MODEL, None, "configure it as EMBEDDING_NEXT_*"),
        (_moving(Phase.BACKFILLING), C_MODEL, B_MODEL, "is neither"),
        # After the cut-over an instance may already name the new model as its own.
        (_moving(Phase.CUT_OVER), B_MODEL, None, None),
        (GenerationState(current=A_MODEL), C_MODEL, None, ""),  # the plain binding mismatch
    ],
)
def test_which_instances_may_start_during_a_rolling_restart(
    state: GenerationState, configured: ModelSpec, next_model: ModelSpec | None, refusal: str | None
) -> None:
    problem = check_configuration(state, configured, next_model)
    if refusal is None or refusal == "":
        assert problem == refusal
    else:
        assert problem is not None and refusal in problem and "\n" not in problem


async def test_a_move_to_1536_dimensions_through_an_openai_compatible_server(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any provider, any dimension: the hash embedder's 384 to an OpenAI-compatible server's 1536."""
    env = test_env(database_url)
    with FakeOpenAI(dimension=1536) as server:
        openai = {
            "EMBEDDING_PROVIDER": "hash",  # named: OPENAI_BASE_URL alone would imply the openai provider
            "OPENAI_BASE_URL": server.base_url,
            "EMBEDDING_NEXT_PROVIDER": "openai",
            "EMBEDDING_NEXT_MODEL": "text-embedding-3-small",
            "EMBEDDING_NEXT_DIM": "1536",
        }
        moving = await start_server(env)
        try:
            for i in range(12):
                await moving.memory.Store(store(f"remark {i} on theme {i % 3}"))
        finally:
            await stop_server(moving)
        moving = await start_server({**env, **openai})
        try:
            assert await backfill(moving) == "backfill complete"
            embedded = {text for request in server.requests for text in request["input"]}
            assert {f"remark {i} on theme {i % 3}" for i in range(12)} <= embedded
            code, out = await model(env, "cutover", capsys)
            assert code == 0 and "(1536 dimensions)" in out, out
            found = await moving.memory.Search(search("remark 7 on theme 1"))
            assert {len(h.memory.embedding) for h in found.hits} == {1536}
            assert found.hits[0].memory.value == "remark 7 on theme 1"
            code, out = await model(env, "finish", capsys)
            assert code == 0, out
        finally:
            await stop_server(moving)


async def test_a_completed_backfill_leaves_statistics_that_count_the_next_generation(database_url: str) -> None:
    """The next index is sized from the planner's statistics: statistics taken while the next column was empty
    must not survive the backfill, or the index care takes a full column for an empty one."""
    env = test_env(database_url)
    first = await start_server(env)
    try:
        for i in range(40):
            await first.memory.Store(store(f"note {i} about topic {i % 7}"))
    finally:
        await stop_server(first)
    moving = await start_server({**env, **NEXT})
    try:
        column = moving.server.runtime.moves.other_index.column
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("ANALYZE memory.memories")  # the next column is all NULL here
            assert await index_sql.estimated_rows(conn, column) == 0
            assert await backfill(moving) == "backfill complete"
            assert await index_sql.estimated_rows(conn, column) == 40
        finally:
            await conn.close()
    finally:
        await stop_server(moving)
