"""``memory-service doctor``: exit 0 on a healthy database, 1 with what to do when something needs action."""

from __future__ import annotations

import asyncio

import pytest

from memory_service.cli.main import main
from tests.test_index_care import load


async def _doctor(dsn: str, capsys: pytest.CaptureFixture[str], **env: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["doctor"], {"DATABASE_URL": dsn, **env})
    return code, capsys.readouterr().out


async def test_a_healthy_database_passes(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await _doctor(database_url, capsys)
    assert code == 0, out
    assert "ACTION" not in out and "ok     migrations:" in out and "ok     model: unbound" in out


async def test_problems_come_with_what_to_do(
    database_url: str, empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await _doctor(empty_database_url, capsys)
    assert code == 1
    assert "ACTION migrations: none applied" in out and "-> run `memory-service migrate`" in out

    await load(database_url, 600, seed=21)  # binds hash-ngram-v1 at 384 dimensions, past the threshold below
    code, out = await _doctor(database_url, capsys, EMBEDDING_DIM="256", EXACT_SEARCH_MAX_ROWS="500")
    assert code == 1
    assert "ACTION model: the database is bound to hash-ngram-v1 (384)" in out
    assert "ACTION index: due for a build at" in out and "-> memory-service reindex" in out

    assert (
        await asyncio.to_thread(main, ["reindex"], {"DATABASE_URL": database_url, "EXACT_SEARCH_MAX_ROWS": "500"}) == 0
    )
    code, out = await _doctor(database_url, capsys, EXACT_SEARCH_MAX_ROWS="500")
    assert code == 0, out
    assert "ok     index: hnsw" in out and "ok     calibration:" in out  # the default kind
