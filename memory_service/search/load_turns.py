"""One text index load at a time on a machine.

Every server process holds its own text index (``SERVER_PROCESSES``, by default one per core, and any instances
sharing the machine), and a load peaks at about five times the index it builds: 2.3 GB of RSS for the 470 MB of a
million memories. Processes started together would all load at once, and a machine sized for their indexes would
run out of memory for their loads. So a load first takes an exclusive ``flock`` on a file in the temporary
directory, shared by every process of every instance on the machine, and holds it until its temporaries are handed
back: the peak is one load's above the indexes already held. A process that waits serves meanwhile from the SQL
statement, as it does while any large index loads; the kernel drops the lock of a process that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_PATH = Path(tempfile.gettempdir()) / "memory-service-text-index-load.lock"
POLL_SECONDS = 0.2
"""How often a waiting load tries the lock again (polled, so a waiting task can be cancelled at shutdown)."""


@contextlib.asynccontextmanager
async def load_turn(path: Path = LOCK_PATH) -> AsyncIterator[None]:
    """Held while loading; waits while another process on the machine loads. Without a usable lock file (another
    user's, a read-only directory) the load goes ahead on its own."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.debug("text index loads are not serialised on this machine: %s", exc)
        yield
        return
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("text index load waits for another process's load to finish (%s)", path)
                    waiting = True
                await asyncio.sleep(POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock
