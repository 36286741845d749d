"""The gRPC port: checked free before a server binds it, and held by the parent of SERVER_PROCESSES workers.

Apart from ``server`` and ``processes`` because both need it, and ``processes`` starts ``server``.
"""

from __future__ import annotations

import socket

from memory_service.errors import StartupError


def check_port_free(host: str, port: int) -> None:
    """StartupError, one line, when another socket holds ``port``: checked before gRPC binds, whose own failure
    prints a log line of its core first. Bound without SO_REUSEPORT, so that a port another instance holds with it
    counts as taken too: a second server on the same port would otherwise share its connections unnoticed."""
    if port != 0:
        _bound(host, port, reuse_port=False).close()


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (never listening) SO_REUSEPORT socket holding ``port`` (a free one for 0) for the workers."""
    check_port_free(host, port)
    return _bound(host, port, reuse_port=True)


def _bound(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    try:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bound.bind((host.strip("[]"), port))
    except OSError as exc:
        bound.close()
        raise StartupError(f"cannot listen on {host}:{port} (GRPC_HOST/GRPC_PORT): {exc}") from exc
    return bound
