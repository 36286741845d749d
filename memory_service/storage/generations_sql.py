"""SQL of a move between embedding models: the generation state in memory.settings, the column swap, the backfill.

The column ``embedding`` always holds the generation searches use and ``embedding_alt`` the other one during a
move (migrations/0012_embedding_generations.sql). Cut-over and rollback swap the two columns' names, their
indexes' names and their index settings in one transaction, so every statement written against ``embedding``
(search, index care, calibration, Get) follows without knowing a move exists. Each change increments
``embedding_epoch``; statements guarded by ``memory.embedding_generation_is`` fail when planned for an older one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from memory_service.errors import FailedPrecondition
from memory_service.generations.types import Backfill, Gate, GenerationState, ModelSpec, Move, Phase
from memory_service.models import Vector
from memory_service.storage import settings_sql
from memory_service.storage.index_sql import COLUMNS, INDEX_SETTINGS, REBUILD_LOCK_KEY, index_name, setting_key

EPOCH = "embedding_epoch"
PROVIDER = "embedding_provider"
MOVE = "embedding_move"
FINISHED = "embedding_finished"
BACKFILL = "embedding_backfill"
GATE = "embedding_gate"
_LEGACY_INDEX_SETTINGS = {
    "vector_index_rows_at_build": "ivfflat_rows_at_build",
    "vector_index_built_at": "ivfflat_built_at",
}
"""Where databases indexed before HNSW existed keep the current column's index settings."""
# Schema changes wait at most this long for the table lock, so a long search or batch makes them fail and retry
# rather than queue every statement behind them.
_LOCK_TIMEOUT = "5s"


def state_of(stored: dict[str, str]) -> GenerationState:
    model, dimension = stored.get("embedding_model"), stored.get("embedding_dim")
    current = None
    if model is not None and dimension is not None:
        current = ModelSpec(provider=stored.get(PROVIDER, ""), model=model, dimension=int(dimension))
    move = stored.get(MOVE)
    finished = stored.get(FINISHED)
    return GenerationState(
        epoch=int(stored.get(EPOCH, "0")),
        current=current,
        move=None if move is None else Move.from_json(json.loads(move)),
        finished=None if finished is None else Move.from_json(json.loads(finished)),
    )


async def read_state(conn: asyncpg.Connection) -> GenerationState:
    return state_of(await settings_sql.read_settings(conn))


async def read_progress(
    conn: asyncpg.Connection,
) -> tuple[GenerationState, Backfill | None, Gate | None, dict[str, str]]:
    """The state, the backfill's checkpoint, the gate, and every setting (for the index state), in one read."""
    stored = await settings_sql.read_settings(conn)
    backfill, gate = stored.get(BACKFILL), stored.get(GATE)
    return (
        state_of(stored),
        None if backfill is None else Backfill.from_json(json.loads(backfill)),
        None if gate is None else Gate.from_json(json.loads(gate)),
        stored,
    )


async def _lock_state(conn: asyncpg.Connection) -> GenerationState:
    """Inside a transaction: serialise changes of the generation (and the first binding) and read the state."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", settings_sql.BIND_LOCK_KEY)
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
    return await read_state(conn)


# Migration 0005's rule, that a memory's vector and the name of its model go together, belongs to the column of the
# current generation; renames carry a constraint along with its column, so it is put back on ``embedding``. NOT VALID,
# as it was: checked on every write, without a scan (the table's exclusive lock is held already).
_CONSTRAIN_CURRENT = (
    "ALTER TABLE memory.memories DROP CONSTRAINT IF EXISTS memories_embedding_model, "
    "ADD CONSTRAINT memories_embedding_model CHECK ((embedding IS NULL) = (embedding_model IS NULL)) NOT VALID"
)


async def _exclude_index_maintenance(conn: asyncpg.Connection) -> None:
    """Inside a transaction: hold off index maintenance (rebuilds and calibrations, on any instance) until it ends,
    or refuse when a job is running. A rebuild or calibration that spanned a swap of the columns would build or
    measure one generation's index and record it as the other's."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REBUILD_LOCK_KEY):
        raise FailedPrecondition(
            "index maintenance is building or calibrating a vector index right now: nothing changed; run the "
            "command again in a moment"
        )


async def _write_state(conn: asyncpg.Connection, state: GenerationState, changes: dict[str, str]) -> None:
    await settings_sql.write_settings(conn, {**changes, EPOCH: str(state.epoch + 1)})


async def _delete(conn: asyncpg.Connection, keys: Sequence[str]) -> None:
    await conn.execute("DELETE FROM memory.settings WHERE key = ANY($1::text[])", list(keys))


_ALT_INDEX_KEYS = [setting_key(base, "embedding_alt") for base in INDEX_SETTINGS]


async def begin(conn: asyncpg.Connection, source: ModelSpec, target: ModelSpec, now: datetime) -> GenerationState:
    """Start a move from ``source`` (the bound model) to ``target``: type a fresh ``embedding_alt`` for it.

    Runs in the caller's transaction. Returns the state after, which is another move's when one was begun first.
    """
    state = await _lock_state(conn)
    if state.move is not None or not source.same(state.current):
        return state
    # A nullable column without a default is added without rewriting the table; dropping the old one frees nothing
    # until the rows are next rewritten, but it holds nothing either (finish emptied it).
    await conn.execute("ALTER TABLE memory.memories DROP COLUMN IF EXISTS embedding_alt")
    await conn.execute(f"ALTER TABLE memory.memories ADD COLUMN embedding_alt vector({int(target.dimension)})")
    await conn.execute("ALTER TABLE memory.memories ALTER COLUMN embedding_alt SET STORAGE MAIN")
    await _delete(conn, [BACKFILL, GATE, *_ALT_INDEX_KEYS])
    move = Move(source=source, target=target, phase=Phase.BACKFILLING, started_at=now)
    await _write_state(conn, state, {MOVE: json.dumps(move.to_json()), PROVIDER: source.provider})
    return await read_state(conn)


async def missing(conn: asyncpg.Connection) -> int:
    """Memories without a vector of the other generation (a scan of the table)."""
    value: int = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE embedding_alt IS NULL")
    return value


async def swap(conn: asyncpg.Connection, *, epoch: int, to: Phase) -> GenerationState:
    """Cut over (``to`` CUT_OVER) or roll back (``to`` BACKFILLING): swap the two generations' columns, indexes
    and index settings, and make the other model the current one. Runs in the caller's transaction.

    Refused unless every memory has a vector of the generation switched to. SHARE ROW EXCLUSIVE stops writes
    (not searches) while that is counted; the renames then take the table's exclusive lock for a moment.
    """
    state = await _lock_state(conn)
    move = state.move
    if state.epoch != epoch or move is None or move.phase is to:
        raise FailedPrecondition("the embedding generation changed while the command ran; look at model status again")
    await _exclude_index_maintenance(conn)
    await conn.execute("LOCK TABLE memory.memories IN SHARE ROW EXCLUSIVE MODE")
    left = await missing(conn)
    if left:
        raise FailedPrecondition(
            f"{left} memories have no vector of {state.other.describe() if state.other else 'the other model'} "
            "yet: let the backfill finish (model status shows its progress)"
        )
    await conn.execute("ALTER TABLE memory.memories RENAME COLUMN embedding TO embedding_swap")
    await conn.execute("ALTER TABLE memory.memories RENAME COLUMN embedding_alt TO embedding")
    await conn.execute("ALTER TABLE memory.memories RENAME COLUMN embedding_swap TO embedding_alt")
    await conn.execute(_CONSTRAIN_CURRENT)
    current, other = COLUMNS
    for kind in ("ivfflat", "hnsw"):
        await conn.execute(f"ALTER INDEX IF EXISTS memory.{index_name(current, kind)} RENAME TO memories_swap")
        await conn.execute(
            f"ALTER INDEX IF EXISTS memory.{index_name(other, kind)} RENAME TO {index_name(current, kind)}"
        )
        await conn.execute(f"ALTER INDEX IF EXISTS memory.memories_swap RENAME TO {index_name(other, kind)}")
    stored = await settings_sql.read_settings(conn)
    await _delete(conn, [*_LEGACY_INDEX_SETTINGS.values(), *INDEX_SETTINGS, *_ALT_INDEX_KEYS])
    swapped = {}
    for base in INDEX_SETTINGS:
        alt = setting_key(base, other)
        current_value = stored.get(base) or stored.get(_LEGACY_INDEX_SETTINGS.get(base, ""))
        if alt in stored:
            swapped[base] = stored[alt]
        if current_value is not None:
            swapped[alt] = current_value
    switched_to = move.target if to is Phase.CUT_OVER else move.source
    moved = Move(source=move.source, target=move.target, phase=to, started_at=move.started_at)
    await _write_state(
        conn,
        state,
        {
            **swapped,
            "embedding_model": switched_to.model,
            "embedding_dim": str(switched_to.dimension),
            PROVIDER: switched_to.provider,
            MOVE: json.dumps(moved.to_json()),
        },
    )
    return await read_state(conn)


async def finish(conn: asyncpg.Connection, *, epoch: int, now: datetime, abandon: bool = False) -> GenerationState:
    """Drop the other generation (its column and indexes): the previous one after a cut-over, or with ``abandon``
    the next one before it (the move is given up). Runs in the caller's transaction."""
    state = await _lock_state(conn)
    move = state.move
    wanted = Phase.BACKFILLING if abandon else Phase.CUT_OVER
    if state.epoch != epoch or move is None or move.phase is not wanted:
        raise FailedPrecondition("the embedding generation changed while the command ran; look at model status again")
    await _exclude_index_maintenance(conn)
    await conn.execute("ALTER TABLE memory.memories DROP COLUMN embedding_alt")
    await conn.execute("ALTER TABLE memory.memories ADD COLUMN embedding_alt vector")
    await conn.execute("ALTER TABLE memory.memories ALTER COLUMN embedding_alt SET STORAGE MAIN")
    await conn.execute(_CONSTRAIN_CURRENT)
    await _delete(conn, [MOVE, BACKFILL, GATE, *_ALT_INDEX_KEYS])
    finished = Move(source=move.source, target=move.target, phase=Phase.CUT_OVER, started_at=now)
    await _write_state(conn, state, {} if abandon else {FINISHED: json.dumps(finished.to_json())})
    return await read_state(conn)


async def record_provider(conn: asyncpg.Connection, provider: str) -> None:
    """Name the bound model's provider, for the messages of a later move (databases bound before moves existed)."""
    await conn.execute(
        "INSERT INTO memory.settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", PROVIDER, provider
    )


# --- the backfill ----------------------------------------------------------------------------------------------


async def pending(conn: asyncpg.Connection, *, after_id: int, limit: int) -> list[tuple[int, str, bytes]]:
    """The next memories (by id) without a vector of the other generation: (id, value, content hash)."""
    rows = await conn.fetch(
        """
        SELECT id, value, content_hash FROM memory.memories
        WHERE id > $1 AND embedding_alt IS NULL ORDER BY id LIMIT $2
        """,
        after_id,
        limit,
    )
    return [(r["id"], r["value"], bytes(r["content_hash"])) for r in rows]


_STAGING = "memory_backfill_staging"
# As bulk ingest's staging table (storage.ingest_sql): one per pooled connection, emptied at every commit.
_CREATE_STAGING = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (id bigint NOT NULL, content_hash bytea NOT NULL, vector vector NOT NULL)
ON COMMIT DELETE ROWS
"""


async def fill(
    conn: asyncpg.Connection, *, epoch: int, ids: Sequence[int], hashes: Sequence[bytes], vectors: Sequence[Vector]
) -> int:
    """Write the other generation's vectors of memories still holding the content they were embedded from and
    still without one; return how many. A memory rewritten meanwhile got its vector from its writer (or is left
    for the next pass), a deleted one is gone: neither is touched. The row's version, time and history stay.
    Runs in the caller's transaction: the vectors go in by binary COPY, then one UPDATE."""
    await conn.execute(_CREATE_STAGING)
    await conn.copy_records_to_table(
        _STAGING,
        schema_name="pg_temp",
        columns=("id", "content_hash", "vector"),
        records=list(zip(ids, hashes, vectors, strict=True)),
    )
    # The ids again as an array: the staging table has no statistics, and without them a join of a few hundred
    # rows can be planned as a scan of the whole memories table; ``id = ANY`` reads them through the primary key.
    status = await conn.execute(
        f"""
        UPDATE memory.memories m SET embedding_alt = s.vector
        FROM pg_temp.{_STAGING} s
        WHERE m.id = ANY($2::bigint[]) AND m.id = s.id AND m.content_hash = s.content_hash
          AND m.embedding_alt IS NULL AND memory.embedding_generation_is($1)
        """,
        epoch,
        list(ids),
    )
    return int(status.split()[-1])


async def vacuum(conn: asyncpg.Connection) -> None:
    """Reclaim the row versions the backfill's updates left behind, and their index entries (outside a
    transaction), and refresh the statistics: the other column's share of NULLs, which the index care reads to
    count the rows its index would hold, falls as the backfill goes."""
    await conn.execute("VACUUM (ANALYZE) memory.memories")


async def counts(conn: asyncpg.Connection) -> tuple[int, int]:
    """(memories, of them without a vector of the other generation): one scan, at the start of a pass."""
    row = await conn.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE embedding_alt IS NULL) AS missing FROM memory.memories"
    )
    assert row is not None
    return row["total"], row["missing"]


async def write_backfill(conn: asyncpg.Connection, backfill: Backfill) -> None:
    await settings_sql.write_settings(conn, {BACKFILL: json.dumps(backfill.to_json())})


async def write_gate(conn: asyncpg.Connection, gate: Gate) -> None:
    await settings_sql.write_settings(conn, {GATE: json.dumps(gate.to_json())})


async def sample_pairs(conn: asyncpg.Connection, size: int, *, rows: int) -> list[tuple[int, Vector, Vector]]:
    """About ``size`` memories with vectors of both generations, drawn uniformly: (id, current, other)."""
    percent = min(100.0, 100.0 * 4 * size / max(rows, 1))
    records = await conn.fetch(
        f"""
        SELECT id, embedding, embedding_alt FROM memory.memories TABLESAMPLE BERNOULLI ({percent:.6f})
        WHERE embedding IS NOT NULL AND embedding_alt IS NOT NULL ORDER BY random() LIMIT $1
        """,
        size,
    )
    return [(r["id"], r["embedding"], r["embedding_alt"]) for r in records]
