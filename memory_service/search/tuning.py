"""How a search runs in the database: the BM25 parameters of text ranking and the session settings of an index scan.

The search package owns these values; storage receives them as plain numbers and settings.
"""

from __future__ import annotations

import dataclasses

from memory_service.config.settings import Settings
from memory_service.models import IndexKind


@dataclasses.dataclass(frozen=True)
class TextRanking:
    """BM25 parameters and the bound on how many memories one query scores (defaults: the settings')."""

    k1: float = Settings.bm25_k1
    b: float = Settings.bm25_b
    max_scored: int = Settings.text_max_scored

    @property
    def values(self) -> tuple[float, float, int]:
        """As storage takes them: (k1, b, max_scored)."""
        return (self.k1, self.b, self.max_scored)


DEFAULT_TEXT_RANKING = TextRanking()


def scan_settings(kind: IndexKind, setting: int, *, iterative: bool, limit: int, filtered: bool) -> dict[str, str]:
    """The session settings a search (or a calibration) runs an index scan with.

    Iterative scans (pgvector 0.8+) keep scanning until ``limit`` rows pass the filter, in relaxed order: the
    candidates are re-sorted by exact distance afterwards, so a looser order inside the scan costs nothing. HNSW
    returns at most ``ef_search`` rows from a plain scan, so it is never set below the limit.
    """
    if kind == "hnsw":
        settings = {"hnsw.ef_search": str(min(max(setting, limit), 1000))}
    else:
        settings = {"ivfflat.probes": str(setting)}
    if iterative:
        settings[f"{kind}.iterative_scan"] = "relaxed_order"
    if filtered:
        # The engine sends a filtered search to the index only when it has judged the index cheaper than reading
        # the filter's matches; left to itself, PostgreSQL often reads a large scope through its btree and sorts
        # every row instead (an exact scan under an approximate label, whose cost grows with the scope). The index
        # yields rows in distance order, so forbidding the sort leaves it the index. Storage resets this setting
        # before the connection serves anything else, which costs a round trip: unfiltered searches, for which
        # the index is the only plan short of reading the whole table, do without it.
        settings["enable_sort"] = "off"
    return settings
