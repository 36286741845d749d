"""The SQL that records versions and change-log entries in the same statement as the change itself.

Each writing statement becomes ``WITH w AS (<the change> RETURNING <the row as it now is>), <record> SELECT ...``:
``record`` inserts one version row per returned row and one change-log row beside it, set-based, so a Store costs
one statement and a BulkStore batch one ``INSERT ... SELECT`` more per table, never a trigger per row. Fragments
are fixed text; only ``$n`` parameters carry values.
"""

from __future__ import annotations

from memory_service.models import WriteContext
from memory_service.storage import columns

# What the change returns about the row: the memory as the change left it, its new version, and the change's time.
RETURNING_ROW = f"m.id, m.version, {columns.qualified('m')}"

_VERSION_COLUMNS = f"memory_id, version, kind, {columns.NAMES}, changed_at, principal, fencing_token, request_id"


def record(source: str, *, kind: str, changed_at: str, context_params: tuple[str, str, str]) -> str:
    """``v AS (...), c AS (...)``: a version and a change for each row of the CTE ``source``.

    ``kind`` and ``changed_at`` are SQL expressions over the source's columns; ``context_params`` name the
    parameters holding the principal, fencing token and request id.
    """
    principal, token, request_id = context_params
    return f"""
    v AS (
        INSERT INTO memory.memory_versions ({_VERSION_COLUMNS})
        SELECT id, version, {kind}, {columns.NAMES}, {changed_at},
               {principal}::text, {token}::bigint, {request_id}::text
        FROM {source}
    ),
    c AS (
        INSERT INTO memory.changes (memory_id, scope, scope_id, kind, version, changed_at)
        SELECT id, scope, scope_id, {kind}, version, {changed_at} FROM {source}
    )"""


UPSERT_KIND = "CASE WHEN created THEN 'created' ELSE 'updated' END::memory.change_kind"


def context_values(context: WriteContext) -> tuple[str | None, int | None, str | None]:
    """The parameter values for ``record``'s ``context_params``, in their order."""
    return context.principal, context.fencing_token, context.request_id
