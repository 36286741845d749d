"""What every command that talks to a running server shares: the address, token and TLS flags, and its exit codes:
0 done, 1 the server refused (answered with an error), 2 a bad flag or setting, 69 the server could not be reached.

These commands never open a database: they reach the service through ``--address`` (``MEMORY_SERVICE_ADDRESS``),
with ``--token`` (``MEMORY_SERVICE_TOKEN``) as a bearer token and ``--ca-file`` (``MEMORY_SERVICE_CA_FILE``) for TLS.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import grpc

from memory_service.client.channel import DEFAULT_ADDRESS
from memory_service.errors import ConfigError, one_line

EX_FAILED = 1
"""The server answered with an error: it refused the call (permission, invalid argument, quota, ...)."""
EX_USAGE = 2
"""A bad flag, argument or setting, as argparse and every other command answer."""
EX_UNAVAILABLE = 69
"""sysexits.h: the service could not be reached (or stayed unreachable for the retry budget)."""


def failed(what: str, error: grpc.RpcError) -> int:
    """Say in one line that ``what`` failed with ``error``; 69 when the server could not be reached, else 1."""
    details = one_line(str(error.details() or ""))
    print(f"memory-service: {what} failed: {error.code().name}: {details}", file=sys.stderr)
    return EX_UNAVAILABLE if error.code() is grpc.StatusCode.UNAVAILABLE else EX_FAILED


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error of the command; ``--help`` has the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument(
        "--address",
        default=env.get("MEMORY_SERVICE_ADDRESS", DEFAULT_ADDRESS),
        help=f"server host:port (MEMORY_SERVICE_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--token", default=env.get("MEMORY_SERVICE_TOKEN"), help="bearer token (MEMORY_SERVICE_TOKEN)")
    parser.add_argument(
        "--ca-file",
        default=env.get("MEMORY_SERVICE_CA_FILE"),
        metavar="PEM",
        help="use TLS, trusting this CA (MEMORY_SERVICE_CA_FILE)",
    )
    parser.set_defaults(client=True)


def read_ca(args: argparse.Namespace) -> bytes | None:
    """The CA bundle named by --ca-file, or None for plaintext; a ConfigError (one line, exit 2) when unreadable."""
    if not args.ca_file:
        return None
    try:
        return Path(args.ca_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"--ca-file is expected to name a readable PEM file (got {args.ca_file!r}: {exc.strerror})"
        ) from exc
