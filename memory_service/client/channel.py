"""The client's channel: retries of UNAVAILABLE, keepalive, TLS and the bearer token on every call."""

from __future__ import annotations

import json

import grpc
from grpc import aio

from memory_service.config.settings import Settings

DEFAULT_ADDRESS = f"localhost:{Settings.grpc_port}"
"""Where a server started with the default settings listens: the client's and the command's default."""


def _service_config(attempts: int) -> str:
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": "memory_service.v1.MemoryService"}, {"service": "memory_service.v1.LeaseService"}]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def open_channel(
    address: str,
    *,
    token: str | None = None,
    root_certificates: bytes | None = None,
    tls: bool = False,
    attempts: int = 4,
    keepalive_time: float = 10.0,
    keepalive_timeout: float = 5.0,
) -> aio.Channel:
    """A channel with retries of UNAVAILABLE, keepalive, TLS when asked, and the bearer token on every call."""
    # gRPC refuses a retry policy of fewer than 2 attempts (the channel fails every call): 1 means no retries.
    retries: list[tuple[str, str | int]] = (
        [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(attempts))]
        if attempts >= 2
        else [("grpc.enable_retries", 0)]
    )
    options: list[tuple[str, str | int]] = [
        *retries,
        # A server that stops answering is detected within keepalive time + timeout, also on a long stream (a
        # lease Hold) that carries no data; the server permits pings every 5 s.
        ("grpc.keepalive_time_ms", round(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if not (tls or root_certificates or token):
        return aio.insecure_channel(address, options=options)
    if not (tls or root_certificates):
        # A token over plaintext is allowed only to loopback, where gRPC permits call credentials on insecure ports.
        credentials = grpc.local_channel_credentials()
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return aio.secure_channel(address, credentials, options=options)
