"""``memory-service doctor``: what needs an operator's action, and what to do about it; exit 1 when anything does.

A database command, like ``migrate``: it reads the database (catalog and settings, never a table scan) and changes
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

from memory_service.app import moves
from memory_service.cli.backup import database
from memory_service.config.settings import Settings
from memory_service.errors import MemoryServiceError
from memory_service.generations.state import check_configuration
from memory_service.search.index_care import IndexCare
from memory_service.search.index_policy import needs_calibration
from memory_service.storage import doctor_sql, generations_sql, stats_sql
from memory_service.storage.database import Database, check_reachable
from memory_service.storage.dump import plain_connection
from memory_service.storage.migrations import load_migrations

EX_ACTION = 1
MIN_POSTGRES = 150000
DEAD_SHARE = 0.2
DEAD_MIN = 10_000


@dataclasses.dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    action: str = ""


def register(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="(database) check configuration, database, migrations, model, index and vacuum; exit 1 on a problem",
    )
    doctor.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL)")
    doctor.add_argument(
        "--data-dir", metavar="DIR", help="the embedded PostgreSQL's data dir (MEMORY_SERVICE_DATA_DIR)"
    )
    doctor.set_defaults(run=_doctor, needs_database=True)


def _doctor(settings: Settings, args: argparse.Namespace) -> int:
    findings = [
        Finding(
            "configuration",
            True,
            f"embedding {settings.embedding_provider} {settings.embedding_model} ({settings.embedding_dim} "
            f"dimensions), {settings.vector_index} index, target recall {settings.search_target_recall}",
        )
    ]
    with database(settings) as (dsn, named_by):
        try:
            asyncio.run(check_reachable(dsn, named_by=named_by))
        except MemoryServiceError as exc:
            findings.append(Finding("database", False, str(exc), "start PostgreSQL or fix DATABASE_URL"))
        else:
            findings += asyncio.run(examine(dsn, settings))
    for finding in findings:
        mark = "ok    " if finding.ok else "ACTION"
        print(f"{mark} {finding.check}: {finding.detail}")
        if finding.action:
            print(f"       -> {finding.action}")
    return 0 if all(f.ok for f in findings) else EX_ACTION


async def examine(dsn: str, settings: Settings) -> list[Finding]:
    findings: list[Finding] = []
    async with plain_connection(dsn) as conn:
        versions = await doctor_sql.versions(conn)
        applied = await doctor_sql.applied_migrations(conn)
        health = await doctor_sql.dead_tuples(conn)
    findings.append(
        Finding("postgresql", versions.postgres_num >= MIN_POSTGRES, versions.postgres)
        if versions.postgres_num >= MIN_POSTGRES
        else Finding("postgresql", False, versions.postgres, "upgrade to PostgreSQL 15 or newer")
    )
    if versions.pgvector is None:
        action = (
            "run `memory-service migrate` (it creates the extension)"
            if versions.pgvector_available
            else ("install pgvector on the database server")
        )
        findings.append(Finding("pgvector", False, "not installed", action))
    else:
        iterative = tuple(int(p) for p in versions.pgvector.split(".")[:2]) >= (0, 8)
        note = "iterative index scans" if iterative else "no iterative scans: filtered searches fall back to exact"
        findings.append(Finding("pgvector", True, f"{versions.pgvector} ({note})"))
    findings.append(_migrations(applied))
    if applied is None or versions.pgvector is None:
        return findings
    db = await Database.connect(dsn, min_size=1, max_size=1)
    try:
        findings.append(await _binding(db, settings))
        findings += await _index(db, dsn, settings)
    finally:
        await db.close()
    for table in health:
        if table.dead > DEAD_MIN and table.dead > DEAD_SHARE * max(table.live, 1):
            findings.append(
                Finding(
                    f"vacuum {table.table}",
                    False,
                    f"{table.dead} dead rows beside {table.live} live (last vacuum {table.last_vacuum or 'never'})",
                    f"VACUUM (ANALYZE) memory.{table.table}; if it recurs, check that autovacuum runs and keeps up",
                )
            )
    if not any(f.check.startswith("vacuum") for f in findings):
        findings.append(Finding("vacuum", True, "dead rows within bounds in every table"))
    return findings


def _migrations(applied: dict[str, str] | None) -> Finding:
    known = {m.name: m.checksum for m in load_migrations()}
    if applied is None:
        return Finding("migrations", False, "none applied", "run `memory-service migrate` (serve does on start)")
    changed = sorted(name for name, checksum in applied.items() if name in known and known[name] != checksum)
    unknown = sorted(set(applied) - set(known))
    pending = sorted(set(known) - set(applied))
    if changed:
        return Finding(
            "migrations", False, f"changed since applied: {', '.join(changed)}", "restore the original files"
        )
    if unknown:
        return Finding(
            "migrations", False, f"applied by a newer version: {', '.join(unknown)}", "run the newer memory-service"
        )
    if pending:
        return Finding("migrations", False, f"pending: {', '.join(pending)}", "run `memory-service migrate`")
    return Finding("migrations", True, f"{len(applied)} applied, latest {max(applied)}")


async def _binding(db: Database, settings: Settings) -> Finding:
    """The configuration against the database's embedding generations, as a server's start-up checks them: during
    a move of models (docs/model-migration.md) either generation's model may be the configured one."""
    async with db.connection() as conn:
        state = await generations_sql.read_state(conn)
    configured, _, next_model = moves.models(settings)
    if state.current is None:
        return Finding("model", True, "unbound: the first stored embedding binds the configured model")
    bound, wanted = (state.current.model, state.current.dimension), (configured.model, configured.dimension)
    problem = check_configuration(state, configured, next_model)
    if problem:
        return Finding("model", False, "the configuration cannot serve this database", problem)
    if problem == "":
        return Finding(
            "model",
            False,
            f"the database is bound to {bound[0]} ({bound[1]}), the configuration says {wanted[0]} ({wanted[1]})",
            "configure EMBEDDING_MODEL/EMBEDDING_DIM as stored; a server configured otherwise refuses to start",
        )
    moving = (
        ""
        if state.move is None
        else f"; {state.phase}: {state.move.source.describe()} -> {state.move.target.describe()}"
    )
    return Finding("model", True, f"bound to {bound[0]} ({bound[1]} dimensions){moving}")


async def _index(db: Database, dsn: str, settings: Settings) -> list[Finding]:
    care = IndexCare.from_settings(db, dsn, settings)
    state = await care.refresh()
    async with db.connection() as conn:
        writes = await stats_sql.writes_so_far(conn)
    findings = []
    if state.exists and not state.valid:
        findings.append(
            Finding("index", False, "an invalid vector index (an interrupted build)", "memory-service reindex --force")
        )
    elif care.needs_rebuild(state):
        tail = f" ({state.tail} rows written since the last build)" if state.watermark is not None else ""
        findings.append(
            Finding(
                "index",
                False,
                f"due for a build at {state.rows} rows{tail}",
                "memory-service reindex (or wait a minute)",
            )
        )
    elif not state.usable:
        findings.append(Finding("index", True, f"none needed: {state.rows} rows searched exactly"))
    else:
        built = state.built_at.isoformat() if state.built_at else "unknown"
        tail = f"; {state.tail} rows since, searched exactly" if state.watermark is not None else ""
        findings.append(
            Finding("index", True, f"{state.kind}, {state.rows} rows (built at {state.rows_at_build}, {built}{tail})")
        )
        calibration = state.calibration
        if calibration is None:
            findings.append(Finding("calibration", False, "none for this index", "memory-service reindex"))
        else:
            age = datetime.now(UTC) - calibration.calibrated_at
            due = needs_calibration(state, writes=writes, target=settings.search_target_recall)
            recall = calibration.curve(filtered=False).recall_at(calibration.setting(filtered=False)) or 0.0
            detail = f"{age.total_seconds() / 3600:.1f} h old, estimated recall {recall:.3f}"
            findings.append(
                Finding("calibration", not due, detail, "memory-service reindex (recalibrates)" if due else "")
            )
    return findings
