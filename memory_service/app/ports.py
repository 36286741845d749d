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
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port} (GRPC_HOST/GRPC_PORT): {exc}") from exc


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (never listening) SO_REUSEPORT socket holding ``port`` (a free one for 0) for the workers."""
    check_port_free(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host.strip("[]"), port))
    except OSError as exc:
        holder.close()
        raise StartupError(f"cannot listen on {host}:{port} (GRPC_HOST/GRPC_PORT): {exc}") from exc
    return holder
