"""The one reader of PostgreSQL command tags, the status strings ``execute`` returns (``DELETE 5``, ``INSERT 0 3``)."""

from __future__ import annotations


def rows_affected(tag: str) -> int:
    """The row count a command tag ends with: its last word."""
    return int(tag.rsplit(" ", 1)[-1])
