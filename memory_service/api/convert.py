"""Wire messages to domain values and back. Wire-level checks (enums, oneofs) happen here, with the field named."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from memory_service.api import times
from memory_service.config.settings import Settings
from memory_service.errors import InvalidArgument
from memory_service.leases.rules import check_name as check_lease_name
from memory_service.memories import validation
from memory_service.memories.ingest import BulkAck
from memory_service.models import (
    NO_FILTER,
    Fence,
    Fusion,
    Memory,
    MemoryFilter,
    MemoryType,
    NewMemory,
    Scope,
    ScopeRef,
    SearchMode,
    SearchQuery,
    SearchResult,
    Vector,
    WriteOutcome,
    content_hash,
    derived_key,
)
from memory_service.v1 import memory_pb2

E = TypeVar("E")

_SCOPES = {
    memory_pb2.SCOPE_GLOBAL: Scope.GLOBAL,
    memory_pb2.SCOPE_CIRCLE: Scope.CIRCLE,
    memory_pb2.SCOPE_AGENT: Scope.AGENT,
    memory_pb2.SCOPE_CONVERSATION: Scope.CONVERSATION,
    memory_pb2.SCOPE_PROJECT: Scope.PROJECT,
}
_TYPES = {
    memory_pb2.MEMORY_TYPE_FACT: MemoryType.FACT,
    memory_pb2.MEMORY_TYPE_PREFERENCE: MemoryType.PREFERENCE,
    memory_pb2.MEMORY_TYPE_EXPERIENCE: MemoryType.EXPERIENCE,
    memory_pb2.MEMORY_TYPE_SKILL: MemoryType.SKILL,
    memory_pb2.MEMORY_TYPE_RELATIONSHIP: MemoryType.RELATIONSHIP,
    memory_pb2.MEMORY_TYPE_CONTEXT: MemoryType.CONTEXT,
    memory_pb2.MEMORY_TYPE_DECISION: MemoryType.DECISION,
}
_MODES = {
    memory_pb2.SEARCH_MODE_VECTOR: SearchMode.VECTOR,
    memory_pb2.SEARCH_MODE_TEXT: SearchMode.TEXT,
    memory_pb2.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}
_FUSIONS = {
    memory_pb2.FUSION_UNSPECIFIED: Fusion.WEIGHTED,
    memory_pb2.FUSION_RRF: Fusion.RRF,
    memory_pb2.FUSION_WEIGHTED: Fusion.WEIGHTED,
}
_OUTCOMES = {
    WriteOutcome.CREATED: memory_pb2.WRITE_OUTCOME_CREATED,
    WriteOutcome.UPDATED: memory_pb2.WRITE_OUTCOME_UPDATED,
    WriteOutcome.UNCHANGED: memory_pb2.WRITE_OUTCOME_UNCHANGED,
}
_SCOPE_WIRE = {v: k for k, v in _SCOPES.items()}
_TYPE_WIRE = {v: k for k, v in _TYPES.items()}
_MODE_WIRE = {v: k for k, v in _MODES.items()}
_MAX_RRF_K = 10_000
_MAX_BOOST = 100.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _enum(field: str, value: int, table: Mapping[Any, E], *, default: E | None = None) -> E:
    if value == 0 and default is not None:
        return default
    try:
        return table[value]
    except KeyError:
        what = "is required" if value == 0 else f"has an unknown value {value}"
        raise InvalidArgument(field, what) from None


def _struct(field: str, message: struct_pb2.Struct) -> dict[str, Any]:
    if not message.fields:
        return {}
    try:
        as_dict = json_format.MessageToDict(message)
    except ValueError:
        raise InvalidArgument(field, "must not contain NaN or infinite numbers") from None
    return validation.check_metadata(field, as_dict)


def fence_from_proto(message: memory_pb2.Fence, field: str = "fence") -> Fence | None:
    if not message.namespace and not message.name and not message.fencing_token:
        return None
    # The lease's own rules: a fence naming a lease no Acquire could grant is bad input, not a lost lease (ABORTED),
    # and a NUL in it would reach PostgreSQL.
    check_lease_name(f"{field}.namespace", message.namespace)
    check_lease_name(f"{field}.name", message.name)
    if message.fencing_token <= 0:
        raise InvalidArgument(f"{field}.fencing_token", "must be a token from a lease grant (> 0)")
    return Fence(namespace=message.namespace, name=message.name, token=message.fencing_token)


def new_memory_from_proto(message: memory_pb2.MemoryInput, settings: Settings, dimension: int, field: str) -> NewMemory:
    scope = _enum(f"{field}.scope", message.scope, _SCOPES)
    if scope is Scope.GLOBAL and message.scope_id != 0:
        raise InvalidArgument(f"{field}.scope_id", "must be 0 for SCOPE_GLOBAL")
    validation.check_id(f"{field}.scope_id", message.scope_id, allow_zero=True)
    value = validation.check_text(f"{field}.value", message.value, max_bytes=settings.max_text_bytes)
    digest = content_hash(value)
    key = validation.check_key(f"{field}.key", message.key) or derived_key(digest)
    agent_id = validation.check_id(f"{field}.agent_id", message.agent_id) if message.HasField("agent_id") else None
    importance = (
        validation.check_fraction(f"{field}.importance", message.importance) if message.HasField("importance") else 0.5
    )
    embedding = (
        validation.check_vector(f"{field}.embedding", message.embedding, dimension) if len(message.embedding) else None
    )
    expires_at = None
    ttl = None
    expiry = message.WhichOneof("expiry")
    if expiry == "expires_at":
        expires_at = times.timestamp(f"{field}.expires_at", message.expires_at)
    elif expiry == "ttl":
        ttl = validation.check_ttl(f"{field}.ttl", times.duration(f"{field}.ttl", message.ttl))
    return NewMemory(
        scope=scope,
        scope_id=message.scope_id,
        key=key,
        value=value,
        content_hash=digest,
        agent_id=agent_id,
        memory_type=_enum(f"{field}.memory_type", message.memory_type, _TYPES, default=MemoryType.FACT),
        importance=importance,
        tags=validation.check_tags(f"{field}.tags", list(message.tags)),
        metadata=_struct(f"{field}.metadata", message.metadata),
        embedding=embedding,
        expires_at=expires_at,
        ttl_seconds=ttl,
    )


def scope_ref_from_proto(message: memory_pb2.ScopeRef, field: str) -> ScopeRef:
    """A scope reference at ``field`` (errors name ``field.scope`` and ``field.scope_id``)."""
    scope = _enum(f"{field}.scope", message.scope, _SCOPES)
    scope_id = None
    if message.HasField("scope_id"):
        scope_id = validation.check_id(f"{field}.scope_id", message.scope_id, allow_zero=True)
    return ScopeRef(scope=scope, scope_id=scope_id)


def filter_from_proto(message: memory_pb2.MemoryFilter, field: str = "filter") -> MemoryFilter:
    if message.ByteSize() == 0:
        # Nothing set (fields with presence count even at 0): most searches and pages. Nothing to check.
        return NO_FILTER
    if len(message.scopes) > validation.MAX_SCOPES:
        raise InvalidArgument(f"{field}.scopes", f"may name at most {validation.MAX_SCOPES} scopes")
    scopes = [scope_ref_from_proto(ref, f"{field}.scopes[{index}]") for index, ref in enumerate(message.scopes)]
    types = tuple(
        dict.fromkeys(_enum(f"{field}.memory_types[{i}]", t, _TYPES) for i, t in enumerate(message.memory_types))
    )
    created_after = (
        times.timestamp(f"{field}.created_after", message.created_after) if message.HasField("created_after") else None
    )
    created_before = (
        times.timestamp(f"{field}.created_before", message.created_before)
        if message.HasField("created_before")
        else None
    )
    if created_after and created_before and created_after >= created_before:
        raise InvalidArgument(f"{field}.created_before", "must be later than created_after")
    return MemoryFilter(
        scopes=tuple(dict.fromkeys(scopes)),
        agent_id=validation.check_id(f"{field}.agent_id", message.agent_id) if message.HasField("agent_id") else None,
        memory_types=types,
        tags=validation.check_tags(f"{field}.tags", list(message.tags)),
        min_importance=(
            validation.check_fraction(f"{field}.min_importance", message.min_importance)
            if message.HasField("min_importance")
            else None
        ),
        created_after=created_after,
        created_before=created_before,
        metadata_contains=(
            _struct(f"{field}.metadata_contains", message.metadata_contains)
            if message.HasField("metadata_contains") and message.metadata_contains.fields
            else None
        ),
    )


def search_query_from_proto(message: memory_pb2.SearchRequest, settings: Settings, dimension: int) -> SearchQuery:
    text = ""
    if message.query:
        text = validation.check_text("query", message.query, max_bytes=settings.max_text_bytes)
    embedding = (
        validation.check_vector("query_embedding", message.query_embedding, dimension)
        if len(message.query_embedding)
        else None
    )
    default_mode = SearchMode.HYBRID if text else SearchMode.VECTOR
    mode = _enum("mode", message.mode, _MODES, default=default_mode)
    if mode is SearchMode.TEXT and not text:
        raise InvalidArgument("query", "is required for SEARCH_MODE_TEXT")
    if mode is SearchMode.HYBRID and not text:
        raise InvalidArgument("query", "is required for SEARCH_MODE_HYBRID")
    if mode is SearchMode.VECTOR and not text and embedding is None:
        raise InvalidArgument("query", "a query text or a query_embedding is required")
    half_life = None
    if message.HasField("recency_half_life"):
        half_life = times.duration("recency_half_life", message.recency_half_life).total_seconds()
        if half_life <= 0:
            raise InvalidArgument("recency_half_life", f"must be positive (got {half_life:g}s)")
    recency_boost = _optional(message, "recency_boost", lambda v: _boost_value("recency_boost", v), 0.0)
    if recency_boost and half_life is None:
        raise InvalidArgument("recency_half_life", "is required with recency_boost")
    return SearchQuery(
        text=text,
        embedding=embedding,
        mode=mode,
        top_k=validation.check_limit("top_k", message.top_k, default=10, maximum=settings.search_max_top_k),
        filter=filter_from_proto(message.filter),
        min_score=_optional(message, "min_score", lambda v: _finite("min_score", v), None),
        fusion=_enum("fusion", message.fusion, _FUSIONS),
        rrf_k=_optional(message, "rrf_k", _rrf_k, 60),
        alpha=_optional(message, "alpha", lambda v: validation.check_fraction("alpha", v), None),
        importance_boost=_optional(message, "importance_boost", lambda v: _boost_value("importance_boost", v), 0.0),
        recency_boost=recency_boost,
        recency_half_life_seconds=half_life,
        probes=_optional(message, "probes", _probes, None),
        exact=message.exact,
        include_embedding=message.include_embedding,
    )


T = TypeVar("T")


def _optional(message: Any, name: str, check: Callable[[Any], T], default: T) -> T:
    return check(getattr(message, name)) if message.HasField(name) else default


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number")
    return value


def _boost_value(field: str, value: float) -> float:
    validation.check_non_negative(field, value)
    if value > _MAX_BOOST:
        raise InvalidArgument(field, f"must be at most {_MAX_BOOST}")
    return value


def _rrf_k(value: int) -> int:
    if not 1 <= value <= _MAX_RRF_K:
        raise InvalidArgument("rrf_k", f"must be between 1 and {_MAX_RRF_K} (got {value})")
    return value


def _probes(value: int) -> int:
    if not 1 <= value <= 32768:
        raise InvalidArgument("probes", f"must be between 1 and 32768 (got {value})")
    return value


def memory_to_proto(memory: Memory) -> memory_pb2.Memory:
    message = memory_pb2.Memory()
    fill_memory(message, memory)
    return message


def fill_memory(message: memory_pb2.Memory, memory: Memory) -> None:
    """Write ``memory`` into an empty ``message`` in place, a response's own sub-message: one built apart and handed
    over is copied once more for each level it is nested in (twice per search hit)."""
    message.id = memory.id
    message.scope = _SCOPE_WIRE[memory.scope]
    message.scope_id = memory.scope_id
    message.memory_type = _TYPE_WIRE[memory.memory_type]
    message.key = memory.key
    message.value = memory.value
    message.importance = memory.importance
    if memory.tags:
        message.tags.extend(memory.tags)
    if memory.embedding_model:
        message.embedding_model = memory.embedding_model
    message.content_hash = memory.content_hash.hex()
    if memory.agent_id is not None:
        message.agent_id = memory.agent_id
    if memory.metadata:
        message.metadata.update(memory.metadata)
    if memory.embedding is not None:
        message.embedding.extend(memory.embedding.tolist())
    set_timestamp(message.created_at, memory.created_at)
    set_timestamp(message.updated_at, memory.updated_at)
    if memory.expires_at is not None:
        set_timestamp(message.expires_at, memory.expires_at)


def set_timestamp(message: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Like ``FromDatetime`` for the aware datetimes asyncpg returns, without its per-call validation cost,
    which showed in search profiles (three timestamps per hit). Integer arithmetic: through a float, the last
    microsecond of year 9999 rounds up into year 10000, a Timestamp no client can read."""
    delta = value - _EPOCH
    message.seconds = delta.days * 86400 + delta.seconds
    message.nanos = delta.microseconds * 1000


def outcome_to_proto(outcome: WriteOutcome) -> memory_pb2.WriteOutcome.ValueType:
    return _OUTCOMES[outcome]


def scope_to_proto(scope: Scope) -> memory_pb2.Scope.ValueType:
    return _SCOPE_WIRE[scope]


def search_result_to_proto(result: SearchResult) -> memory_pb2.SearchResponse:
    response = memory_pb2.SearchResponse(
        mode=_MODE_WIRE[result.mode],
        exact=result.exact,
        plan=result.plan,
        probes=result.probes,
        estimated_recall=result.estimated_recall,
    )
    for hit in result.hits:
        # Filled where it lives: a hit built apart and passed in would be copied into the response (and its memory
        # into the hit before that).
        message = response.hits.add(score=hit.score)
        fill_memory(message.memory, hit.memory)
        if hit.cosine_similarity is not None:
            message.cosine_similarity = hit.cosine_similarity
        if hit.text_score is not None:
            message.text_score = hit.text_score
        if hit.vector_rank is not None:
            message.vector_rank = hit.vector_rank
        if hit.text_rank is not None:
            message.text_rank = hit.text_rank
    return response


def bulk_ack_to_proto(ack: BulkAck) -> memory_pb2.BulkStoreAck:
    return memory_pb2.BulkStoreAck(
        durable_sequence=ack.durable_sequence,
        created=ack.created,
        updated=ack.updated,
        unchanged=ack.unchanged,
        superseded=ack.superseded,
        rejected=ack.rejected,
        rejections=[memory_pb2.Rejection(sequence=r.sequence, field=r.field, reason=r.reason) for r in ack.rejections],
    )


def embed_response(vectors: Sequence[Vector], *, model: str, dimension: int) -> memory_pb2.EmbedResponse:
    return memory_pb2.EmbedResponse(
        embeddings=[memory_pb2.Embedding(values=v.tolist()) for v in vectors], model=model, dimension=dimension
    )
