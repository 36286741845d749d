"""Assembly and life cycle of one server instance.

Start-up order: database (embedded or DATABASE_URL), migrations, pool, lease manager, embedder, domain services,
gRPC server, metrics endpoint, health SERVING. Migrations run before the pool because every pooled connection
registers the pgvector codec, which needs the extension to exist. From then on the health status follows the
database (a probe every HEALTH_CHECK_INTERVAL): NOT_SERVING while PostgreSQL cannot be reached, SERVING when it
answers again.

Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop accepting, drain in-flight calls within the grace period,
stop background work and release held leases, close the embedder, close the pool last, then stop the embedded
PostgreSQL if this process started it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from memory_service.api.call_log import CallObserver
from memory_service.api.health import HealthMonitor
from memory_service.api.interceptor import Authenticator, ServiceInterceptor, method_labels
from memory_service.api.lease_servicer import LeaseServicer
from memory_service.api.memory_servicer import MemoryServicer
from memory_service.app.ports import check_port_free
from memory_service.app.runtime import Runtime
from memory_service.config.settings import Settings
from memory_service.errors import StartupError
from memory_service.metrics import Metrics
from memory_service.observability.tracing import Tracing
from memory_service.storage.probe import DatabaseProbe
from memory_service.v1 import lease_pb2, lease_pb2_grpc, memory_pb2, memory_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = (
    memory_pb2.DESCRIPTOR.services_by_name["MemoryService"],
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """Ping every client every GRPC_KEEPALIVE_TIME and drop it when a ping goes unanswered for
    GRPC_KEEPALIVE_TIMEOUT, so the calls of a silent peer end (and a Hold stream releases its lease) in bounded time.

    gRPC's default is two hours, and a peer behind a connection that stops forwarding would keep a Hold lease
    renewed all that time. Pings continue on streams that carry no data (a Hold between renewals), and clients may
    ping as often as every 5 s (the Python client's default is 10 s). In grpcio 1.85 an unanswered keepalive ping
    ends the connection only after ``grpc.http2.ping_timeout_ms`` (one minute by default), not after
    ``keepalive_timeout_ms`` alone, so both are set (measured with a proxy that stops forwarding).
    """
    return [
        ("grpc.keepalive_time_ms", round(settings.grpc_keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.grpc_keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", round(settings.grpc_keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


class MemoryServer:
    """One running instance: the runtime (database, embedder, domain services) behind a gRPC server."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, reuse_port: bool = False) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        """Bind with SO_REUSEPORT: one of several server processes sharing the port (``app.processes``)."""
        self.metrics = metrics or Metrics()
        self.tracing = Tracing(settings.otel_traces_endpoint) if settings.otel_traces_endpoint else None
        self.runtime = Runtime(settings, self.metrics, tracing=self.tracing)
        self.health = HealthServicer()
        self._server: aio.Server | None = None
        self._metrics_http: Any = None
        self._monitor: HealthMonitor | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        if self.tracing is not None:
            self.tracing.start()
            log.info("tracing to %s", self.settings.otel_traces_endpoint)
        await self.runtime.start()
        try:
            await self._start_grpc()
            self._start_metrics_http()
        except BaseException:
            await self._stop_grpc(0)
            await self.runtime.close()
            raise
        probe = DatabaseProbe(self.runtime.dsn, timeout=max(self.settings.health_check_interval, 1.0))
        self._monitor = HealthMonitor(
            self.health,
            probe,
            ("", *SERVICE_NAMES),
            self.settings.health_check_interval,
            on_change=lambda serving: self.metrics.serving.set(1 if serving else 0),
            writes=self.runtime.db,
        )
        await self._monitor.set_all(True)
        self._monitor_task = asyncio.create_task(self._monitor.run(), name="health monitor")
        log.info("serving gRPC on %s:%d", self.settings.grpc_host, self.port)

    async def _start_grpc(self) -> None:
        settings = self.settings
        limit = settings.grpc_max_message_bytes
        server = aio.server(
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
            interceptors=[ServiceInterceptor(self.metrics, Authenticator(self.runtime.tokens), self._observer())],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", int(self._reuse_port)),
                *keepalive_options(settings),
            ],
        )
        runtime = self.runtime
        memory_servicer = MemoryServicer(
            settings,
            memories=runtime.memories,
            search=runtime.search,
            embedder=runtime.embedder,
            bulk=runtime.bulk,
            stats=runtime.stats,
            history=runtime.history,
            feed=runtime.feed,
        )
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(memory_servicer, server)
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(LeaseServicer(runtime.leases), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.metrics.init_rpcs(method_labels((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"])))
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        if not self._reuse_port:  # the workers of SERVER_PROCESSES bind a port their parent checked and holds
            check_port_free(settings.grpc_host, settings.grpc_port)
        credentials = self._server_credentials()
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address} (GRPC_HOST/GRPC_PORT): {exc}") from exc
        if port == 0:
            raise StartupError(f"cannot listen on {address} (GRPC_HOST/GRPC_PORT): the address is in use")
        self.port = port
        self._server = server
        await server.start()

    def _observer(self) -> CallObserver:
        settings = self.settings
        return CallObserver(
            access_log=settings.log_format == "json",
            slow_call_seconds=settings.slow_call_seconds,
            tracing=self.tracing,
        )

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        key = settings.tls_key_file.read_bytes()
        cert = settings.tls_cert_file.read_bytes()
        client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def _start_metrics_http(self) -> None:
        if self.settings.metrics_port is None:
            return
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(
                self.settings.metrics_port, addr=self.settings.metrics_host, registry=self.metrics.registry
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {self.settings.metrics_host}:{self.settings.metrics_port} "
                f"(METRICS_HOST/METRICS_PORT): {exc}"
            ) from exc
        self._metrics_http = server
        self.metrics_port = int(server.server_port)
        log.info("serving metrics on %s:%d/metrics", self.settings.metrics_host, self.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and shut down in the documented order; safe to call twice."""
        grace = self.settings.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        # Hold streams never end by themselves; ending them first (LOST, lease released) keeps them from
        # holding the drain open for the whole grace period.
        self.runtime.begin_shutdown()
        await self._stop_grpc(grace)
        await self.runtime.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self.tracing is not None:
            self.tracing.shutdown()
        log.info("stopped")

    async def _stop_grpc(self, grace: float) -> None:
        if self._server is not None:
            log.info("draining in-flight calls (grace %.1fs)", grace)
            await self._server.stop(grace)
            self._server = None


async def serve(
    settings: Settings,
    *,
    on_ready: Callable[[MemoryServer], Awaitable[None]] | None = None,
    reuse_port: bool = False,
    parent_gone: int | None = None,
) -> int:
    """Run until SIGTERM or SIGINT (or, for a worker of ``app.processes``, until the pipe ``parent_gone`` ends),
    then shut down gracefully; return the process exit code."""
    server = MemoryServer(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if parent_gone is not None:
        loop.add_reader(parent_gone, stop.set)
    try:
        await server.start()
        if on_ready is not None:
            await on_ready(server)
        await stop.wait()
        log.info("shutdown requested")
    finally:
        try:
            await server.stop()
        except Exception:
            # Shutdown goes on; the operator still learns what did not stop cleanly.
            log.exception("shutdown did not complete cleanly")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if parent_gone is not None:
            loop.remove_reader(parent_gone)
    return 0
