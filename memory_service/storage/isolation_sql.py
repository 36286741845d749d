"""The start-up check that row-level security isolates the calls of scoped tokens (migration 0011)."""

from __future__ import annotations

import asyncpg

from memory_service.tenants.types import CALLS_ROLES

PROTECTED_TABLES = ("memories", "memory_versions", "changes", "embedding_cache", "scope_usage")
"""Every table that holds memory content (and the per-scope counts); each has row-level security FORCEd and a
``calls`` policy."""


async def isolation_problem(conn: asyncpg.Connection) -> str | None:
    """What would let a calls role see rows outside its grants, or None when nothing would."""
    for role in CALLS_ROLES:
        problem = await _role_problem(conn, role)
        if problem is not None:
            return problem
    return None


async def _role_problem(conn: asyncpg.Connection, role: str) -> str | None:
    found = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", role)
    if found is None:
        return f"the role {role} does not exist (apply migration 0011: memory-service migrate)"
    if found["rolsuper"] or found["rolbypassrls"]:
        return f"the role {role} bypasses row-level security (it is a superuser or has BYPASSRLS)"
    can_switch = await conn.fetchval(
        "SELECT rolsuper OR pg_has_role(session_user, $1, 'MEMBER') FROM pg_roles WHERE rolname = session_user", role
    )
    if not can_switch:
        return f"the database user cannot SET ROLE {role} (GRANT {role} TO that user)"
    rows = await conn.fetch(
        """
        SELECT t.name, c.relrowsecurity AND c.relforcerowsecurity AS forced, pg_get_userbyid(c.relowner) AS owner,
               (SELECT array_agg(p.policyname ORDER BY p.policyname) FROM pg_policies p
                WHERE p.schemaname = 'memory' AND p.tablename = t.name AND p.policyname NOT IN ('calls', 'calls_kinds')
                  AND EXISTS (SELECT 1 FROM unnest(p.roles) r
                              WHERE r = 'public' OR pg_has_role($2, r, 'USAGE'))) AS open_policies
        FROM unnest($1::text[]) t(name)
        LEFT JOIN pg_class c ON c.relname = t.name AND c.relnamespace = 'memory'::regnamespace
        """,
        list(PROTECTED_TABLES),
        role,
    )
    for row in rows:
        if row["forced"] is None:
            return f"memory.{row['name']} does not exist"
        if not row["forced"]:
            return f"row-level security is not enabled and FORCEd on memory.{row['name']}"
        if row["owner"] == role:
            return f"{role} owns memory.{row['name']}"
        if row["open_policies"]:
            policies = ", ".join(row["open_policies"])
            return f"policies of memory.{row['name']} other than the calls roles' apply to {role}: {policies}"
    return None
