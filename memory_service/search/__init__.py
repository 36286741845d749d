"""Search: planning (exact or ivfflat), candidate retrieval, fusion and boosts."""

from memory_service.search.engine import SearchEngine

__all__ = ["SearchEngine"]
