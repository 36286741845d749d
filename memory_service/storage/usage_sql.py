"""SQL of the per-scope memory counts (``memory.scope_usage``, migration 0011) that quotas and scoped Stats read."""

from __future__ import annotations

import asyncpg

# What both folds do with the scopes the statement's own ``scopes`` found: delete their rows and insert the sum.
_FOLD_SCOPES_FOUND = """
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

# The scopes with more than one row, up to $1 of them: each one's rows become a single row holding their sum. Rows a
# concurrent writer appends meanwhile are not in this statement's snapshot and stay; two instances folding at once
# lock the same rows, and the second finds them gone, so nothing is counted twice.
_FOLD = (
    """
WITH scopes AS (
    SELECT scope, scope_id FROM memory.scope_usage GROUP BY scope, scope_id HAVING count(*) > 1 LIMIT $1
),
"""
    + _FOLD_SCOPES_FOUND
)


async def fold(conn: asyncpg.Connection, *, scopes: int) -> tuple[int, int]:
    """Fold the rows of up to ``scopes`` scopes into one each; returns how many scopes and rows were folded."""
    row = await conn.fetchrow(_FOLD, scopes)
    assert row is not None
    return row["scopes"], row["rows"]


# The same fold, for the scopes of quota-bound tokens only (pairs $1/$2 of kind and id, and every scope of the kinds
# in $3), each found through the (scope, scope_id) index: what a quota check sums stays a few rows between purges,
# at the cost of the rows written since.
_FOLD_SCOPES = (
    """
WITH scopes AS (
    SELECT u.scope, u.scope_id FROM memory.scope_usage u
    JOIN unnest($1::text[], $2::bigint[]) g(scope, scope_id) ON u.scope = g.scope::memory.scope
                                                             AND u.scope_id = g.scope_id
    GROUP BY u.scope, u.scope_id HAVING count(*) > 1
    UNION
    SELECT scope, scope_id FROM memory.scope_usage WHERE scope = ANY ($3::text[]::memory.scope[])
    GROUP BY scope, scope_id HAVING count(*) > 1
),
"""
    + _FOLD_SCOPES_FOUND
)


async def fold_scopes(conn: asyncpg.Connection, pairs: list[tuple[str, int]], kinds: list[str]) -> tuple[int, int]:
    """Fold the rows of the scopes in ``pairs`` and of every scope of ``kinds``; returns scopes and rows folded."""
    row = await conn.fetchrow(_FOLD_SCOPES, [k for k, _ in pairs], [i for _, i in pairs], kinds)
    assert row is not None
    return row["scopes"], row["rows"]
