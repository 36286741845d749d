"""The values of the lease domain: a grant, what a contender sees of its holder, and what acquire and Hold answer.

They import nothing of the service, so storage (``storage.leases_sql``) returns them and the manager, the Hold
stream and the gRPC converters share them without importing each other.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import datetime, timedelta


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lease:
    """One grant as the lease table holds it."""

    namespace: str
    name: str
    lease_id: uuid.UUID
    holder: str
    owner: str
    fencing_token: int
    ttl: timedelta
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class Holder:
    """What a contender may see of the live holder; ``remaining`` is seconds to expiry by the database clock."""

    holder: str
    fencing_token: int
    expires_at: datetime
    remaining: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Acquired:
    """One step of an acquire: granted (with the lease) or not (with the current holder)."""

    acquired: bool
    lease: Lease | None = None
    holder: Holder | None = None
    final: bool = True
    started: float = 0.0
    """Monotonic time the granting attempt began: the holder's TTL runs from no earlier than this."""


class HoldEventKind(enum.Enum):
    """What happened to a Hold stream's lease."""

    GRANTED = "granted"
    RENEWED = "renewed"
    WAITING = "waiting"
    LOST = "lost"
    RELEASED = "released"
    NOT_ACQUIRED = "not_acquired"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HoldEvent:
    """One event a Hold stream sends its client."""

    kind: HoldEventKind
    lease: Lease | None = None
    holder: Holder | None = None
    reason: str = ""


class HoldCommand(enum.Enum):
    """What a Hold client may send after its acquire."""

    RELEASE = "release"
