"""The fencing check that the service's own writes run inside their transaction."""

from __future__ import annotations

import asyncpg

from memory_service.errors import FenceRejected
from memory_service.models import Fence


async def check_fence(conn: asyncpg.Connection, fence: Fence) -> None:
    """Refuse the write unless ``fence.token`` is still the newest grant of its lease.

    ``FOR SHARE`` holds the lease row until the write commits, so a concurrent grant (which updates the row) waits
    for this write or this write sees the new token: no write with an old token lands after a newer grant.
    """
    current = await conn.fetchval(
        "SELECT fencing_token FROM memory.leases WHERE namespace = $1 AND name = $2 FOR SHARE",
        fence.namespace,
        fence.name,
    )
    if current is None:
        raise FenceRejected(f"fence: no lease {fence.namespace}/{fence.name} has ever been granted")
    if fence.token > current:
        raise FenceRejected(f"fence: token {fence.token} was never granted for lease {fence.namespace}/{fence.name}")
    if current != fence.token:
        raise FenceRejected(
            f"fence: lease {fence.namespace}/{fence.name} has a newer holder "
            f"(token {current} supersedes {fence.token}); stop writing and re-acquire"
        )
