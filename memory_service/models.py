"""Domain values shared by the memory, search, ingest and lease modules. No gRPC, no SQL."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from datetime import datetime
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
_T = TypeVar("_T")

DERIVED_KEY_PREFIX = "sha256:"


def assemble(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of the frozen dataclass ``cls`` from a value for every one of its fields, past its generated
    ``__init__``.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (3 microseconds for a
    ``Memory``'s 16), and a search builds four such objects for every hit it returns: 60-70 microseconds of a call's
    CPU, a fifth of what the service adds to its statement. Filling the instance's ``__dict__`` takes a tenth of that
    and gives an equal object. Only for the per-row hot paths; ``fields`` must name exactly the class's fields."""
    if fields.keys() != cls.__dataclass_fields__.keys():  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} needs exactly its fields; got {sorted(fields)}")
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


class Scope(enum.StrEnum):
    GLOBAL = "global"
    CIRCLE = "circle"
    AGENT = "agent"
    CONVERSATION = "conversation"
    PROJECT = "project"


class MemoryType(enum.StrEnum):
    FACT = "fact"
    PREFERENCE = "preference"
    EXPERIENCE = "experience"
    SKILL = "skill"
    RELATIONSHIP = "relationship"
    CONTEXT = "context"
    DECISION = "decision"


class WriteOutcome(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class SearchMode(enum.StrEnum):
    VECTOR = "vector"
    TEXT = "text"
    HYBRID = "hybrid"


class Fusion(enum.StrEnum):
    RRF = "rrf"
    WEIGHTED = "weighted"


def content_hash(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def derived_key(digest: bytes) -> str:
    """The identity key of a memory stored without one: the same text in a scope is one memory."""
    return DERIVED_KEY_PREFIX + digest.hex()[:48]


IndexKind = Literal["ivfflat", "hnsw"]
"""The approximate vector index: pgvector's ivfflat (lists probed per query) or HNSW (a graph searched with
ef_search candidates)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fence:
    """A lease and the token its holder was granted; writes carrying it are refused once it is superseded."""

    namespace: str
    name: str
    token: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewMemory:
    """A validated memory as a client writes it."""

    scope: Scope
    scope_id: int
    key: str
    value: str
    content_hash: bytes
    agent_id: int | None = None
    memory_type: MemoryType = MemoryType.FACT
    importance: float = 0.5
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    embedding: Vector | None = None
    expires_at: datetime | None = None
    ttl_seconds: float | None = None
    """Relative expiry, resolved against the database clock when written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Memory:
    """A stored memory."""

    id: int
    scope: Scope
    scope_id: int
    agent_id: int | None
    memory_type: MemoryType
    key: str
    value: str
    importance: float
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    content_hash: bytes
    embedding_model: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    embedding: Vector | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WriteContext:
    """Who made a change, recorded in its version: all optional."""

    principal: str | None = None
    """The authenticated caller, when auth is on."""
    request_id: str | None = None
    """The caller's request id (``x-request-id`` metadata), when it sent one."""
    fencing_token: int | None = None
    """The lease token the write was fenced with."""


NO_CONTEXT = WriteContext()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreResult:
    id: int
    key: str
    outcome: WriteOutcome


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScopeRef:
    scope: Scope
    scope_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryFilter:
    """Conditions that must all hold; an empty filter matches every live memory."""

    scopes: tuple[ScopeRef, ...] = ()
    agent_id: int | None = None
    memory_types: tuple[MemoryType, ...] = ()
    tags: tuple[str, ...] = ()
    min_importance: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata_contains: dict[str, Any] | None = None

    @property
    def is_empty(self) -> bool:
        return self is NO_FILTER or self == NO_FILTER


NO_FILTER = MemoryFilter()
"""The filter that matches everything; requests without one share it, so ``is_empty`` is an identity test for them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchQuery:
    text: str = ""
    embedding: Vector | None = None
    mode: SearchMode = SearchMode.HYBRID
    top_k: int = 10
    filter: MemoryFilter = NO_FILTER
    min_score: float | None = None
    fusion: Fusion = Fusion.WEIGHTED
    rrf_k: int = 60
    alpha: float | None = None
    """Vector weight in weighted fusion; None takes the service's default for its embedding provider."""
    importance_boost: float = 0.0
    recency_boost: float = 0.0
    recency_half_life_seconds: float | None = None
    probes: int | None = None
    exact: bool = False
    include_embedding: bool = False


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One memory a search considered: what ranking needs, and the whole memory when it was fetched along."""

    id: int
    distance: float | None
    text_score: float | None
    importance: float
    updated_at: datetime
    memory: Memory | None = None
    from_vector: bool = False
    """Among the nearest ``limit`` by vector."""
    from_text: bool = False
    """Among the best ``limit`` by BM25."""
    text_every_term: bool = False
    """The text candidates were sought with every query term (pruning left none out): a wider search could find no
    more. The same on every candidate of one statement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchHit:
    memory: Memory
    score: float
    cosine_similarity: float | None = None
    text_score: float | None = None
    vector_rank: int | None = None
    text_rank: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchResult:
    hits: list[SearchHit]
    mode: SearchMode
    exact: bool
    plan: str
    probes: int = 0
    estimated_recall: float | None = None
    """Recall@10 of the vector candidates as the index's calibration measured it at these probes: 1.0 for exact
    plans, None for text-only searches and for an index not yet calibrated."""
