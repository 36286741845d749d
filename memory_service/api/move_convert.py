"""A move to another embedding model (``generations.types.MoveStatus``) as the Stats response carries it."""

from __future__ import annotations

from memory_service.generations.types import GateFigures, MoveStatus, Phase
from memory_service.v1 import memory_pb2


def move_to_proto(status: MoveStatus) -> memory_pb2.ModelMove:
    state = status.state
    message = memory_pb2.ModelMove(phase=state.phase, generation=state.epoch)
    if state.current is not None:
        message.current_model = state.current.model
        message.current_dimension = state.current.dimension
    move = state.move
    if move is not None:
        message.next_model = move.target.model
        message.next_dimension = move.target.dimension
        if move.phase is Phase.CUT_OVER:
            message.previous_model = move.source.model
        message.next_index = status.next_index
    backfill = status.backfill
    if backfill is not None:
        message.backfill_done = backfill.done
        message.backfill_total = backfill.total
        message.backfill_rows_per_second = backfill.rate
        message.backfill_complete = backfill.complete
        if (eta := backfill.eta_seconds) is not None:
            message.backfill_eta_seconds = eta
    gate = status.gate
    if gate is not None:
        if gate.searches is not None:
            message.gate_searches.CopyFrom(_gate(gate.searches))
        if gate.memories is not None:
            message.gate_memories.CopyFrom(_gate(gate.memories))
        message.gate_computed_at.FromDatetime(gate.computed_at)
    return message


def _gate(figures: GateFigures) -> memory_pb2.ModelGate:
    return memory_pb2.ModelGate(
        queries=figures.queries, overlap_at_10=figures.overlap_at_10, top_hit_changed=figures.top_hit_changed
    )
