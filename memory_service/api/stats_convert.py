"""The Stats response: counts, the vector index's state and calibration, a model move, refused writes."""

from __future__ import annotations

from memory_service.api.convert import scope_to_proto, set_timestamp
from memory_service.api.move_convert import move_to_proto
from memory_service.memories.stats import Stats
from memory_service.v1 import memory_pb2


def stats_to_proto(stats: Stats) -> memory_pb2.StatsResponse:
    response = memory_pb2.StatsResponse(
        memories=stats.memories,
        by_scope=[
            memory_pb2.ScopeCount(scope=scope_to_proto(scope), memories=count)
            for scope, count in sorted(stats.by_scope.items())
        ],
        expired_pending_purge=stats.expired_pending_purge,
        embedding_model=stats.embedding_model,
        dimension=stats.dimension,
        pgvector_version=stats.pgvector_version,
        postgres_version=stats.postgres_version,
        iterative_scan=stats.iterative_scan,
        index=_index_to_proto(stats),
        embedding_cache_entries=stats.embedding_cache_entries,
        counts_estimated=stats.counts_estimated,
    )
    if stats.move is not None:
        response.model_move.CopyFrom(move_to_proto(stats.move))
    if (refused := stats.writes_refused) is not None:
        response.writes_refused.reason = refused.reason
        response.writes_refused.refused_calls = refused.refused_calls
        set_timestamp(response.writes_refused.since, refused.since)
    return response


def _index_to_proto(stats: Stats) -> memory_pb2.IndexState:
    state = stats.index
    message = memory_pb2.IndexState(
        exists=state.exists,
        valid=state.valid,
        lists=state.lists,
        rows_at_build=state.rows_at_build,
        exact_threshold=stats.exact_threshold,
        kind=state.kind or "",
        m=state.m,
        rows=state.rows,
        target_recall=stats.target_recall,
        tail_rows=state.tail,
    )
    if state.built_at is not None:
        message.built_at.FromDatetime(state.built_at)
    if (calibration := state.calibration) is not None:
        probes = calibration.setting(filtered=False)
        message.calibration.probes = probes
        message.calibration.recall = calibration.unfiltered.recall_at(probes) or 0.0
        if calibration.filtered is not None:
            filtered_probes = calibration.setting(filtered=True)
            message.calibration.filtered_probes = filtered_probes
            message.calibration.filtered_recall = calibration.filtered.recall_at(filtered_probes) or 0.0
            message.calibration.filtered_source = calibration.filtered.source
        message.calibration.queries = calibration.unfiltered.queries
        message.calibration.source = calibration.unfiltered.source
        message.calibration.calibrated_at.FromDatetime(calibration.calibrated_at)
        message.calibration.seconds = calibration.seconds
    return message
