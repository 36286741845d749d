"""Queries to calibrate on before an index has served any: stored memories moved off the data, and a margin.

A stored vector is an optimistic query, most of all for HNSW: the search reaches it as a node of the graph, and
that node's edges lead straight to its own nearest neighbours, the very answer being checked; leaving the vector
out of its own answer does not undo that. Measured with the service's statement at 30k-50k ``hard`` rows, recall@10
at ef_search 10 was 0.93-0.96 on stored vectors and 0.79-0.86 on fresh queries drawn like the rows, so a
calibration on stored vectors chose ef_search 10-16 where fresh queries needed 40-80.

So each sampled memory ``x`` is moved by ``STEP`` (0.7) times its distance to its nearest other memory, in a
random direction: the query is no longer a node of the graph, and its nearest memory is as far from it as memories
are from each other. On ``hard`` the recall curve of such queries follows that of fresh ones within 0.01 from
ef_search 32 up (ivfflat: within 0.02 at every probe count; a fresh query lands in its nearest list as a stored one
does).

No query made from the data alone predicts real questions, which may lie farther out: SciFact MiniLM's claims
reached recall 0.93 at ef_search 10 where every kind of synthetic query tried (moved at random, towards other
memories, between pairs) reached 0.99. Moving along directions the data spreads in matched the claims there but
found far too little on ``hard`` (0.93 at ef_search 1000). So a calibration on these queries is taken with a margin
(``COLD_MARGIN``): the setting the target needs on them, times 2 for HNSW and 1.5 for ivfflat, which covered every
set measured (SciFact claims: 0.966 at ef_search 20, 0.982 at probes 6). The margin lasts until an instance has
seen enough real searches to calibrate on them (``search.query_sample``), usually minutes after start.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memory_service.models import IndexKind, Vector

STEP = 0.7
"""How far a query moves from its memory, as a share of the (Euclidean) distance to the memory's nearest other."""
COLD_MARGIN: dict[IndexKind, float] = {"hnsw": 2.0, "ivfflat": 1.5}
"""What the setting chosen on these queries is multiplied by."""


def moved(vectors: Sequence[Vector], nearest: Sequence[float | None], *, seed: int = 0) -> list[Vector]:
    """One query per memory: ``vectors[i]`` moved by ``STEP`` times its distance to its nearest other memory
    (``nearest[i]``, a cosine distance; None: unknown, not moved) in a random direction; unit length."""
    rng = np.random.default_rng(seed)
    queries: list[Vector] = []
    for vector, cosine in zip(vectors, nearest, strict=True):
        x = np.asarray(vector, dtype=np.float32)
        x = x / max(float(np.linalg.norm(x)), 1e-12)
        direction = rng.standard_normal(x.shape[0])
        if cosine is None:
            queries.append(x)
            continue
        # Between unit vectors, Euclidean distance is sqrt(2 * cosine distance).
        step = STEP * float(np.sqrt(2.0 * max(cosine, 0.0)))
        query = x + step * direction / np.linalg.norm(direction)
        queries.append((query / np.linalg.norm(query)).astype(np.float32))
    return queries
