"""Values of the history package: versions, changes, erase receipts. No gRPC, no SQL."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime

from memory_service.models import Memory, Scope, WriteContext


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    EXPIRED = "expired"
    ERASED = "erased"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Version:
    """A memory as one change left it (for deleted and expired: as it was when it went)."""

    memory: Memory
    version: int
    kind: ChangeKind
    changed_at: datetime
    context: WriteContext


@dataclasses.dataclass(frozen=True, kw_only=True)
class Change:
    """One entry of the change log, at log position ``seq``; ``memory`` when the watcher asked for it."""

    seq: int
    memory_id: int
    scope: Scope
    scope_id: int
    kind: ChangeKind
    version: int
    changed_at: datetime
    lag_seconds: float
    """Database time from the change to its reading, for the watch-lag metric."""
    memory: Memory | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EraseReceipt:
    memory_ids: tuple[int, ...]
    versions: int
    cached_embeddings: int
    erased_at: datetime
