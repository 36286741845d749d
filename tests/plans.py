"""The generic plan of a statement: the one a prepared statement settles on once its custom plans cost no less."""

from __future__ import annotations

import asyncpg


async def generic_plan(conn: asyncpg.Connection, statement: str) -> str:
    """EXPLAIN (GENERIC_PLAN) of ``statement``, under the connection's settings. Run from PL/pgSQL so that no values
    are bound: over the extended protocol the driver would bind them, and a plan made with values at hand is a
    custom plan, not the generic one."""
    await conn.execute(
        "CREATE OR REPLACE FUNCTION pg_temp.generic_plan(statement text) RETURNS SETOF text LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN QUERY EXECUTE 'EXPLAIN (GENERIC_PLAN) ' || statement; END $$"
    )
    return "\n".join(r[0] for r in await conn.fetch("SELECT * FROM pg_temp.generic_plan($1)", statement))
