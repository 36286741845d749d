"""The columns of a memory, declared once.

``memory.memories`` and each of its versions in ``memory.memory_versions`` hold them. Every statement that reads a
memory, writes one (Store's VALUES, BulkStore's staging table and its SELECT, the upsert's SET list and its "did
anything change" test) or copies one into a version lists its columns from ``MEMORY`` here, so a new column is
one line below plus the migration that adds it.
"""

from __future__ import annotations

import dataclasses

from memory_service.models import NewMemory, Vector


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str
    """Its SQL type as a statement's parameters name it (``text`` for ``key``'s varchar)."""
    enum: bool = False
    """Of an enum type, which the driver has no codec for: travels and is read as text."""
    nullable: bool = False
    """A write may leave it NULL."""
    written: bool = True
    """Set by Store and BulkStore (the rest are defaults of the table)."""
    versioned: bool = True
    """Held by each version too."""
    identity: bool = False
    """Part of ``(scope, scope_id, key)``, what an upsert conflicts on and never rewrites."""
    compared: bool = True
    """Compared to tell a rewrite from "unchanged"; ``value`` is not: ``content_hash`` stands for it, and comparing
    the text itself would read it back from TOAST on every conflict."""
    on_conflict: str | None = None
    """What an upsert sets it to when that is not simply the new value: SQL over ``{old}`` and ``{new}``."""

    @property
    def staged_type(self) -> str:
        """Its type in a staging table: binary COPY has no encoder for enums or jsonb, so those travel as text."""
        return "text" if self.enum or self.type == "jsonb" else self.type

    def param(self, n: int) -> str:
        """Parameter ``$n`` as a value of this column."""
        return f"${n}::text::{self.type}" if self.enum else f"${n}::{self.type}"

    def staged(self, alias: str) -> str:
        """This column read from a staging row."""
        return f"{alias}.{self.name}" if self.staged_type == self.type else f"{alias}.{self.name}::{self.type}"


MEMORY = (
    Column("scope", "memory.scope", enum=True, identity=True),
    Column("scope_id", "bigint", identity=True),
    Column("agent_id", "bigint", nullable=True),
    Column("memory_type", "memory.memory_type", enum=True),
    Column("key", "text", identity=True),
    Column("value", "text", compared=False),
    Column("embedding", "vector", versioned=False),
    # The other generation's vector during a move of embedding models (migration 0012) is made from the content:
    # kept while the content is the same, dropped with it (the backfill embeds the new content) unless the write
    # brings one. Never compared: it follows the content.
    Column(
        "embedding_alt",
        "vector",
        nullable=True,
        versioned=False,
        compared=False,
        on_conflict="CASE WHEN {old}.content_hash = {new}.content_hash "
        "THEN coalesce({new}.embedding_alt, {old}.embedding_alt) ELSE {new}.embedding_alt END",
    ),
    Column("importance", "real"),
    Column("tags", "text[]"),
    Column("metadata", "jsonb"),
    Column("content_hash", "bytea"),
    # Not compared: ``embedding`` holds the current generation's vector whatever model wrote the row (a cut-over
    # swaps columns, not rows), so a memory stored again as it is after a move is unchanged; ``embedding_model``
    # names the model current when its content was written.
    Column("embedding_model", "text", nullable=True, compared=False),
    Column("created_at", "timestamptz", written=False),
    Column("expires_at", "timestamptz", nullable=True),
)
"""A memory's columns besides its id, version counter and time of change, in the order statements list them."""

BY_NAME = {c.name: c for c in MEMORY}

CONTENT = tuple(c.name for c in MEMORY if c.versioned)
"""What a memory and each of its versions hold."""

WRITTEN = tuple(c for c in MEMORY if c.written)
"""What Store and BulkStore set, in the order of an INSERT's column list and its values."""

NAMES = ", ".join(CONTENT)
"""The content columns by name, for an INSERT's column list or a SELECT from a CTE."""

WRITTEN_NAMES = ", ".join(c.name for c in WRITTEN)

IDENTITY = ", ".join(c.name for c in MEMORY if c.identity)
"""What an upsert conflicts on: the ``memories_identity`` constraint."""


def written_values(memory: NewMemory, embedding: Vector, model: str, other: Vector | None = None) -> dict[str, object]:
    """What a write stores in each of ``columns.WRITTEN`` (``expires_at`` as asked: the TTL is applied in SQL;
    ``other``: the other generation's vector during a move)."""
    return {
        "scope": memory.scope.value,
        "scope_id": memory.scope_id,
        "agent_id": memory.agent_id,
        "memory_type": memory.memory_type.value,
        "key": memory.key,
        "value": memory.value,
        "embedding": embedding,
        "embedding_alt": other,
        "importance": memory.importance,
        "tags": list(memory.tags),
        "metadata": memory.metadata,
        "content_hash": memory.content_hash,
        "embedding_model": model,
        "expires_at": memory.expires_at,
    }


def qualified(alias: str) -> str:
    """The content columns as stored, for copying a row into its version: ``m.scope, m.scope_id, ...``."""
    return ", ".join(f"{alias}.{column}" for column in CONTENT)


def readable(alias: str) -> str:
    """The content columns as ``memory_from_row`` reads them (enums as text)."""
    return ", ".join(
        f"{alias}.{c.name}::text AS {c.name}" if c.enum else f"{alias}.{c.name}" for c in MEMORY if c.versioned
    )


def upsert_set(old: str, new: str) -> str:
    """The SET list of an upsert: every written column but the identity, from ``new`` (``EXCLUDED``) unless the
    column says otherwise."""
    return ",\n    ".join(
        f"{c.name} = {c.on_conflict.format(old=old, new=new) if c.on_conflict else f'{new}.{c.name}'}"
        for c in WRITTEN
        if not c.identity
    )


def changed(table: str, new: str) -> str:
    """True when ``new`` differs from the stored row ``table`` in anything an upsert rewrites."""
    return "\n   OR ".join(
        f"{table}.{c.name} IS DISTINCT FROM {new}.{c.name}" for c in WRITTEN if not c.identity and c.compared
    )
