"""SQL of the per-scope memory counts (``memory.scope_usage``, migration 0011) that quotas and scoped Stats read."""

from __future__ import annotations

import asyncpg

# The scopes with more than one row, up to $1 of them: each one's rows become a single row holding their sum. Rows a
# concurrent writer appends meanwhile are not in this statement's snapshot and stay; two instances folding at once
# lock the same rows, and the second finds them gone, so nothing is counted twice.
_FOLD = """
WITH scopes AS (
    SELECT scope, scope_id FROM memory.scope_usage GROUP BY scope, scope_id HAVING count(*) > 1 LIMIT $1
),
gone AS (
    DELETE FROM memory.scope_usage u USING scopes s
    WHERE u.scope = s.scope AND u.scope_id = s.scope_id
    RETURNING u.scope, u.scope_id, u.memories
),
folded AS (
    INSERT INTO memory.scope_usage (scope, scope_id, memories)
    SELECT scope, scope_id, sum(memories) FROM gone GROUP BY scope, scope_id HAVING sum(memories) <> 0
)
SELECT (SELECT count(*) FROM scopes) AS scopes, (SELECT count(*) FROM gone) AS rows
"""


async def fold(conn: asyncpg.Connection, *, scopes: int) -> tuple[int, int]:
    """Fold the rows of up to ``scopes`` scopes into one each; returns how many scopes and rows were folded."""
    row = await conn.fetchrow(_FOLD, scopes)
    assert row is not None
    return row["scopes"], row["rows"]
