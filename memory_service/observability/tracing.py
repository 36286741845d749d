"""OpenTelemetry tracing: off unless an OTLP endpoint is configured, and then a span per RPC with children.

On with ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over HTTP/protobuf); the
SDK reads the other standard variables itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``). The packages come with the ``tracing``
extra and are imported only when tracing is on: off, a call pays one ``None`` check and ``span`` hands back a shared
no-op context.

Spans carry names, sizes, plans and status codes; never a memory's text, a query's text or a token. SQL spans carry
the statement, which holds ``$n`` placeholders and constants written in the code, never the parameters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from memory_service.errors import ConfigError

_NOOP = contextlib.nullcontext()
_tracer: Any = None
"""The running tracer, or None while tracing is off (the default)."""
_STATEMENT_CHARS = 2000


def endpoint_from(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL the standard variables name, or None when tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return base.rstrip("/") + "/v1/traces" if base else None


def span(name: str, **attributes: Any) -> Any:
    """A child span of the current one around a piece of work; a shared no-op while tracing is off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


class Tracing:
    """The process's tracer provider, exporting in batches over OTLP/HTTP."""

    def __init__(self, endpoint: str, *, service_name: str = "memory-service") -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry packages are not installed "
                f"(pip install 'memory-service[tracing]'): {exc}"
            ) from None
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win over the default name.
        resource = Resource({SERVICE_NAME: service_name}).merge(Resource.create())
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = self._provider.get_tracer("memory_service")

    def start(self) -> None:
        global _tracer  # noqa: PLW0603 - one tracer per process, as OpenTelemetry's own global is
        _tracer = self.tracer

    def start_call(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[Any, Any]:
        """A server span for one RPC, child of the caller's W3C ``traceparent`` when it sent one, made current."""
        from opentelemetry import context

        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        parent = self._propagator.extract(carrier) if "traceparent" in carrier else None
        service, _, name = method.lstrip("/").rpartition("/")
        call_span = self.tracer.start_span(
            method.lstrip("/"),
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        token = context.attach(self._trace.set_span_in_context(call_span))
        return call_span, token

    def end_call(self, call_span: Any, token: Any, code: Any, attributes: Mapping[str, Any] | None) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        call_span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
        for key, value in (attributes or {}).items():
            if value is not None:
                call_span.set_attribute(key, value)
        if code.name not in ("OK", "NOT_FOUND", "ALREADY_EXISTS", "CANCELLED"):
            call_span.set_status(Status(StatusCode.ERROR, code.name))
        call_span.end()
        context.detach(token)

    @staticmethod
    def trace_id(call_span: Any) -> str:
        return f"{call_span.get_span_context().trace_id:032x}"

    def on_query(self, record: Any) -> None:
        """A span for one SQL statement, from asyncpg's query logger (called just after it finished)."""
        if not self._trace.get_current_span().is_recording():
            return  # background work outside any call: no trace to add it to
        end = time.time_ns()
        statement = str(record.query)
        operation = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        sql_span = self.tracer.start_span(
            f"SQL {operation}".strip(),
            kind=self._trace.SpanKind.CLIENT,
            start_time=end - int(record.elapsed * 1e9),
            attributes={
                "db.system": "postgresql",
                "db.operation": operation,
                "db.statement": statement[:_STATEMENT_CHARS],
            },
        )
        if record.exception is not None:
            from opentelemetry.trace import Status, StatusCode

            sql_span.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
        sql_span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is buffered and stop; tracing is off afterwards."""
        global _tracer  # noqa: PLW0603
        if _tracer is self.tracer:
            _tracer = None
        self._provider.shutdown()
