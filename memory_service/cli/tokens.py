"""`memory-service tokens create|list|revoke`: the tokens table, worked on in the database directly (like migrate).

``create`` prints the secret on stdout, a line of its own and nothing else there, once: only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from memory_service.config.env import parse_duration
from memory_service.config.settings import Settings
from memory_service.errors import InvalidArgument
from memory_service.tenants.tokens import Tokens, TokenSpec
from memory_service.tenants.types import Permission, ScopeGrant

T = TypeVar("T")

EX_FAILED = 1

_DESCRIPTION = (
    "Works on the database directly, not through a server: name it with --database-url (DATABASE_URL), or "
    "--data-dir (MEMORY_SERVICE_DATA_DIR) for an embedded one. Every server reading that database sees a change "
    "within 5 seconds, without a restart."
)


def register(commands: Any) -> None:
    tokens = commands.add_parser(
        "tokens", help="(database) create, list and revoke tokens bound to scopes", description=_DESCRIPTION
    )
    verbs = tokens.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser(
        "create",
        help="create a token and print its secret (once)",
        description=_DESCRIPTION + " No permission flag: read only.",
    )
    create.add_argument("name", help="the token's name, recorded as the principal in history and logs")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        type=_grant,
        metavar="SCOPE[:ID]",
        help="a granted scope: agent:7 (one id), project:* (every id of a kind), * (every scope); repeatable; "
        "required unless --admin",
    )
    create.add_argument("--read", action="store_true", help="Get, List, Search, History, as-of reads, Watch, Stats")
    create.add_argument("--write", action="store_true", help="Store, BulkStore, Delete, Embed")
    create.add_argument("--erase", action="store_true", help="Erase in the granted scopes")
    create.add_argument(
        "--lease", action="append", default=[], metavar="NAMESPACE", help="lease calls in this namespace; repeatable"
    )
    create.add_argument(
        "--admin",
        action="store_true",
        help="everything, in every scope (no --scope), server-wide Stats and every lease namespace",
    )
    create.add_argument("--expires", type=_duration, metavar="DURATION", help="lifetime, e.g. 90d, 12h, 30m")
    create.add_argument("--max-memories", type=int, metavar="N", help="the granted scopes hold at most N memories")
    create.add_argument("--rate", type=float, metavar="PER_SECOND", help="calls per second, on each instance")
    _database_flags(create)
    create.set_defaults(run=_create, needs_database=True)

    listing = verbs.add_parser("list", help="every token as JSON lines (never a secret)", description=_DESCRIPTION)
    _database_flags(listing)
    listing.set_defaults(run=_list, needs_database=True)

    revoke = verbs.add_parser("revoke", help="revoke a token (within 5 s on every server)", description=_DESCRIPTION)
    revoke.add_argument("name")
    _database_flags(revoke)
    revoke.set_defaults(run=_revoke, needs_database=True)


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL)")
    parser.add_argument(
        "--data-dir", metavar="DIR", help="the embedded PostgreSQL's data dir (MEMORY_SERVICE_DATA_DIR)"
    )


def _grant(text: str) -> ScopeGrant:
    try:
        return ScopeGrant.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90d, 12h, 30m or 45s (got {text!r})") from None


async def _with_tokens(settings: Settings, work: Callable[[Tokens], Awaitable[T]]) -> T:
    from memory_service.storage.database import Database, check_reachable
    from memory_service.storage.embedded import EmbeddedPostgres
    from memory_service.storage.migrations import apply_migrations

    embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
    try:
        if embedded is None:
            dsn, named_by = str(settings.database_url), "named by DATABASE_URL"
        else:
            dsn, named_by = await asyncio.to_thread(embedded.start), f"embedded in {embedded.data_dir}"
        await check_reachable(dsn, named_by=named_by)
        if settings.migrate_on_start:
            await apply_migrations(dsn)
        db = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            return await work(Tokens(db))
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def _create(settings: Settings, args: argparse.Namespace) -> int:
    permissions = {
        permission
        for permission, wanted in (
            (Permission.READ, args.read),
            (Permission.WRITE, args.write),
            (Permission.ERASE, args.erase),
            (Permission.ADMIN, args.admin),
        )
        if wanted
    } or {Permission.READ}
    spec = TokenSpec(
        name=args.name,
        scopes=tuple(args.scope),
        permissions=frozenset(permissions),
        lease_namespaces=tuple(args.lease),
        max_memories=args.max_memories,
        rate=args.rate,
        expires_in=args.expires,
    )
    try:
        secret = asyncio.run(_with_tokens(settings, lambda tokens: tokens.create(spec)))
    except InvalidArgument as exc:
        print(f"memory-service: tokens create: {exc.field}: {exc.message}", file=sys.stderr)
        return EX_FAILED
    print(secret)
    grants = ", ".join(str(s) for s in spec.scopes)
    print(f"created token {spec.name!r} ({grants}); the secret above is shown only this once", file=sys.stderr)
    return 0


def _list(settings: Settings, args: argparse.Namespace) -> int:
    for line in asyncio.run(_with_tokens(settings, lambda tokens: tokens.list())):
        print(json.dumps(line, sort_keys=True))
    return 0


def _revoke(settings: Settings, args: argparse.Namespace) -> int:
    if not asyncio.run(_with_tokens(settings, lambda tokens: tokens.revoke(args.name))):
        print(f"memory-service: tokens revoke: no token is named {args.name!r}", file=sys.stderr)
        return EX_FAILED
    print(f"revoked token {args.name!r}; every server refuses it within 5 seconds", file=sys.stderr)
    return 0
