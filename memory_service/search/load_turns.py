"""One text index load at a time on a machine.

Every server process holds its own text index (``SERVER_PROCESSES``, by default one per core, and any instances
sharing the machine), and a load peaks at about five times the index it builds: 2.3 GB of RSS for the 470 MB of a
million memories. Processes started together would all load at once, and a machine sized for their indexes would
run out of memory for their loads. So a load first takes an exclusive ``flock`` on a file in the temporary
directory, shared by every process of every instance on the machine, and holds it until its temporaries are handed
back: the peak is one load's above the indexes already held. A process whose turn has not come serves meanwhile
from the SQL statement, as it does while any large index loads, and tries again later; the kernel drops the lock of
a process that dies. A load that hangs (on a database that stopped answering) holds the turn until it fails, so no
process waits for it for long: a load at start-up waits a bounded time, a background one not at all. A load
cancelled at shutdown keeps the turn until the step its worker thread is on has ended (``in_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

LOCK_PATH = Path(tempfile.gettempdir()) / "memory-service-text-index-load.lock"
POLL_SECONDS = 0.2
"""How often a waiting load tries the lock again (polled, so a waiting task can be cancelled at shutdown)."""


@contextlib.asynccontextmanager
async def load_turn(path: Path = LOCK_PATH, *, wait: float | None = None) -> AsyncIterator[bool]:
    """True while this process holds the machine's turn to load; False once ``wait`` seconds passed without it
    (None: wait as long as it takes), and the caller leaves its load for later. Without a usable lock file the load
    goes ahead on its own (True)."""
    fd = _open(path)
    if fd is None:
        yield True
        return
    try:
        deadline = None if wait is None else time.monotonic() + wait
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                turn = True
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    turn = False
                    break
                if not logged:
                    log.info("text index load waits for another process's load to finish (%s)", path)
                    logged = True
                await asyncio.sleep(POLL_SECONDS)
        yield turn
    finally:
        os.close(fd)  # releases the lock


async def in_thread(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)`` in a worker thread, for a task holding the turn. A thread cannot be stopped, so
    when the task is cancelled (at shutdown) this still waits for ``work`` to end before the cancellation goes on:
    leaving the turn while the thread builds on would let another process's load start beside it, the peak the turn
    exists to prevent."""
    running = asyncio.ensure_future(asyncio.to_thread(work, *args, **kwargs))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                continue  # cancelled again while waiting: the thread still runs
            except Exception:
                break  # its failure is moot: the load is being cancelled
        raise


def _open(path: Path) -> int | None:
    """The lock file, opened for reading (all ``flock`` needs, so a file another account created serves too),
    created if missing; None when it can be neither opened nor created."""
    try:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            # Only when missing: O_CREAT on another account's file in a sticky directory is refused (protected_regular).
            return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        log.warning("text index loads are not serialised on this machine (%s): %s", path, exc)
        return None
