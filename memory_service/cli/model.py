"""``memory-service model status|cutover|rollback|finish``: a move to another embedding model, run on the database.

Like ``migrate``, these work on PostgreSQL directly (``DATABASE_URL``, or the embedded data directory), not through
a server, so every instance sees their effect: each statement an instance runs checks the embedding generation it
was planned for. docs/model-migration.md has the whole procedure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from memory_service.config.settings import Settings
from memory_service.errors import ConfigError, FailedPrecondition, MemoryServiceError, StartupError
from memory_service.generations import admin
from memory_service.search.index_care import IndexCare
from memory_service.storage.database import Database, check_reachable
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.storage.migrations import apply_migrations

EX_REFUSED = 1
"""The command was refused: the move is not in a state where it can run (the message says why)."""

_ACTIONS = ("status", "cutover", "rollback", "finish")


def register(commands: Any) -> None:
    model = commands.add_parser(
        "model",
        help="(database) a move to another embedding model: status (JSON), cutover, rollback, finish",
        description="status: the move's phase, backfill progress, rate, time left and quality gate, as JSON. "
        "cutover: switch every instance's searches and new embeddings to the next model (refused until the "
        "backfill is complete and the next index is built and calibrated). rollback: switch back (the previous "
        "generation is kept until finish); before a cut-over, give the move up. finish: drop the previous "
        "generation and its index. Works on the database directly: --database-url (DATABASE_URL), or --data-dir "
        "(MEMORY_SERVICE_DATA_DIR).",
    )
    model.add_argument("action", choices=_ACTIONS)
    model.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL)")
    model.add_argument("--data-dir", metavar="DIR", help="the embedded PostgreSQL's data dir (MEMORY_SERVICE_DATA_DIR)")
    model.set_defaults(run=_run, needs_database=True)


def _next_index(db: Database, dsn: str, settings: Settings) -> IndexCare:
    return IndexCare.from_settings(db, dsn, settings, column="embedding_alt")


async def act(settings: Settings, dsn: str, action: str) -> tuple[str, dict[str, Any]]:
    """Run ``action``; return the line to print (empty for status) and the status after it."""
    await check_reachable(dsn, named_by="named by DATABASE_URL" if settings.database_url else "embedded")
    if settings.migrate_on_start:
        await apply_migrations(dsn)
    db = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        next_index = _next_index(db, dsn, settings)
        line = ""
        if action == "cutover":
            state = await admin.cutover(db, next_index)
            assert state.current is not None
            line = (
                f"cut over to {state.current.describe()}: every instance searches and embeds with it from its next "
                "statement; `model rollback` switches back, `model finish` drops the previous generation"
            )
        elif action == "rollback":
            state = await admin.rollback(db)
            assert state.current is not None
            line = f"rolled back to {state.current.describe()}; the next model stays up to date for another cut-over"
            if state.move is None:
                line = (
                    f"gave up the move: {state.current.describe()} stays, the next model's vectors are dropped; an "
                    "instance still configured with EMBEDDING_NEXT_* begins it again"
                )
        elif action == "finish":
            state = await admin.finish(db)
            assert state.current is not None
            line = (
                f"finished: the database holds {state.current.describe()} only. On every instance set "
                f"the EMBEDDING_* settings to it and unset EMBEDDING_NEXT_*"
            )
        status = await admin.status(db, next_index)
        blocking = admin.blocking_cutover(status, next_index, await next_index.refresh())
        return line, admin.report(status, blocking=blocking)
    finally:
        await db.close()


def _run(settings: Settings, args: argparse.Namespace) -> int:
    embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
    dsn = settings.database_url or embedded.start()  # type: ignore[union-attr]
    try:
        line, report = asyncio.run(act(settings, dsn, args.action))
    except FailedPrecondition as exc:
        print(f"memory-service: model {args.action} refused: {exc}", file=sys.stderr)
        return EX_REFUSED
    except (StartupError, ConfigError):
        raise
    except MemoryServiceError as exc:
        print(f"memory-service: model {args.action} failed: {exc}", file=sys.stderr)
        return EX_REFUSED
    finally:
        if embedded is not None:
            embedded.stop()
    if line:
        print(line)
    else:
        print(json.dumps(report, indent=2))
    return 0
