"""The `memory-service` command: serve, migrate, and the operator tools.

Flags override the environment variables of the same meaning; ``memory-service <command> --help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import sys
from collections.abc import Callable, Mapping, Sequence

from memory_service.cli.remote import OneLineParser
from memory_service.config.settings import Settings
from memory_service.errors import ConfigError, MemoryServiceError, StartupError, one_line
from memory_service.observability import logs

log = logging.getLogger("memory_service")

EX_PIPE = 141
"""stdout's reader went away (``| head``): 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE ended."""

EPILOG = """\
Configuration comes from environment variables (DATABASE_URL, GRPC_PORT, EMBEDDING_PROVIDER, ...); see the
README's table. With DATABASE_URL unset, an embedded PostgreSQL keeps its data in MEMORY_SERVICE_DATA_DIR.
"""


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL); unset: embedded")
    parser.add_argument("--data-dir", metavar="DIR", help="embedded PostgreSQL data dir (MEMORY_SERVICE_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="memory-service",
        description="Long-term memory for AI agents: a gRPC service over PostgreSQL + pgvector.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="(database) run the gRPC server (migrates first unless --no-migrate); unset DATABASE_URL: embedded",
    )
    _database_flags(serve)
    serve.add_argument("--host", help=f"address to listen on (GRPC_HOST, default {Settings.grpc_host})")
    serve.add_argument(
        "--port", type=int, help=f"gRPC port (GRPC_PORT, default {Settings.grpc_port}; 0 picks a free one)"
    )
    serve.add_argument(
        "--metrics-port", help=f"Prometheus port (METRICS_PORT, default {Settings.metrics_port}; 'off' disables)"
    )
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations (MIGRATE_ON_START)")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser(
        "migrate",
        help="(database) apply pending database migrations and exit",
        description="Works on the database directly: name it with --database-url (DATABASE_URL), or --data-dir "
        "(MEMORY_SERVICE_DATA_DIR) for an embedded one.",
    )
    _database_flags(migrate)
    migrate.set_defaults(run=_migrate, needs_database=True)

    from memory_service.cli import backup as cli_backup
    from memory_service.cli import doctor as cli_doctor
    from memory_service.cli import history as cli_history
    from memory_service.cli import ingest as cli_ingest
    from memory_service.cli import lease as cli_lease
    from memory_service.cli import model as cli_model
    from memory_service.cli import ops as cli_ops
    from memory_service.cli import tokens as cli_tokens

    cli_ingest.register(commands)
    cli_lease.register(commands)
    cli_ops.register(commands)
    cli_history.register(commands)
    cli_model.register(commands)
    cli_backup.register(commands)
    cli_doctor.register(commands)
    cli_tokens.register(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """Flags as the environment variables they stand for."""
    mapping = {
        "database_url": "DATABASE_URL",
        "data_dir": "MEMORY_SERVICE_DATA_DIR",
        "host": "GRPC_HOST",
        "port": "GRPC_PORT",
        "metrics_port": "METRICS_PORT",
    }
    env = {var: str(getattr(args, attr)) for attr, var in mapping.items() if getattr(args, attr, None) is not None}
    if getattr(args, "no_migrate", False):
        env["MIGRATE_ON_START"] = "false"
    return env


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from memory_service.app.processes import serve

    return serve(settings)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from memory_service.storage.database import check_reachable
    from memory_service.storage.embedded import EmbeddedPostgres
    from memory_service.storage.migrations import apply_migrations

    embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
    dsn = settings.database_url or embedded.start()  # type: ignore[union-attr]
    named_by = "named by DATABASE_URL" if embedded is None else f"embedded in {embedded.data_dir}"

    async def run() -> list[str]:
        await check_reachable(dsn, named_by=named_by)
        return await apply_migrations(dsn)

    try:
        applied = asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "; up to date"))
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command; its exit code. 2 a bad flag or setting, 1 a refusal, 69 (client commands) an unreachable
    server, 141 a closed stdout: a reader that stopped early (``| head``) ends the command quietly."""
    try:
        code = _main(argv, env)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe prints "Exception ignored"
        return code
    except Exception as exc:
        if _reader_gone(exc):
            return _quiet_exit()
        if isinstance(exc, StartupError):
            _error(exc)
            return 2
        if isinstance(exc, MemoryServiceError):  # a database command the database refused or dropped midway
            _error(exc)
            return 1
        raise
    except SystemExit:  # argparse's --help and usage errors: what they printed is flushed here too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _quiet_exit()
        raise
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str] | None, env: Mapping[str, str] | None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    environment = os.environ if env is None else env
    if getattr(args, "client", False):
        # Client commands talk to a server; the server's variables are not theirs to validate.
        environment = {key: value for key, value in environment.items() if key == "LOG_LEVEL"}
    merged = {**environment, **_overrides(args)}
    if getattr(args, "needs_database", False) and not (
        merged.get("DATABASE_URL", "").strip() or merged.get("MEMORY_SERVICE_DATA_DIR", "").strip()
    ):
        # Only `serve` falls back to the embedded default: a maintenance command on a database nobody named
        # would create a fresh one and report on it.
        raise ConfigError(
            f"{args.command} works on the database directly and needs it named: --database-url (DATABASE_URL), "
            "or --data-dir (MEMORY_SERVICE_DATA_DIR) for the embedded one"
        )
    settings = Settings.from_env(merged)
    logs.configure(settings.log_level, settings.log_format)
    return run(settings, args)


def _error(exc: BaseException) -> None:
    """One line, whatever the message holds: a dependency's exception text quoted in it may span several."""
    print(f"memory-service: error: {one_line(str(exc))}", file=sys.stderr)


def _reader_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was caused by) a write to a stdout whose reader has closed it.

    A BrokenPipeError may arrive wrapped (export's is a database error "caused" by it) or be a socket's own; the
    pipe itself tells them apart where it can: a pipe without a reader polls as an error."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, BrokenPipeError):
            break
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    if chain is None or id(chain) in seen:
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or no stdout: trust the exception
        return True


def _quiet_exit() -> int:
    """End as a tool that SIGPIPE ended, without a word; stdout now points at /dev/null, so that what is left in
    its buffer is flushed there at interpreter exit instead of failing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EX_PIPE


if __name__ == "__main__":
    sys.exit(main())
