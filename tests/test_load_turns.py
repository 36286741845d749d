"""The machine's turn to load a text index lasts as long as the load's work, cancellation included."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path

import pytest

from memory_service.search import load_turns


def held_elsewhere(path: Path) -> bool:
    """Whether another open file holds the lock (``flock`` locks belong to an open file, so this process counts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


async def test_a_load_cancelled_mid_step_keeps_the_turn_until_its_thread_ends(tmp_path: Path) -> None:
    """Cancelling a task does not stop the thread it waits for: the previous ``asyncio.to_thread`` let the task
    leave at once, releasing the turn while the thread still built (two loads' peaks at once)."""
    lock = tmp_path / "load.lock"
    started, release = threading.Event(), threading.Event()

    def step() -> str:
        started.set()
        release.wait(10)
        return "built"

    async def load() -> str:
        async with load_turns.load_turn(lock, wait=1) as turn:
            assert turn
            return await load_turns.in_thread(step)

    task = asyncio.create_task(load())
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.1)
    task.cancel()  # a second cancellation (a shutdown that insists) does not end the wait either
    await asyncio.sleep(0.1)
    assert not task.done()
    assert held_elsewhere(lock)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not held_elsewhere(lock)


async def test_work_in_a_thread_answers_or_raises_as_it_would_in_the_task(tmp_path: Path) -> None:
    assert await load_turns.in_thread(lambda a, b=0: a + b, 2, b=3) == 5

    def fails() -> None:
        raise ValueError("no index")

    with pytest.raises(ValueError, match="no index"):
        await load_turns.in_thread(fails)
