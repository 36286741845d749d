# Production image: the service only; PostgreSQL with pgvector runs beside it (see docker-compose.yml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY memory_service ./memory_service
COPY migrations ./migrations
# The tracing extra: OpenTelemetry is imported only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tracing]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 memory && mkdir /data && chown memory:memory /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER memory
# Without DATABASE_URL the embedded PostgreSQL keeps its data in /data: a volume, so it outlives the container.
ENV GRPC_PORT=50051 METRICS_PORT=9464 MEMORY_SERVICE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 50051 9464
# Asks the port the server was configured with (GRPC_PORT), not a fixed one; NOT_SERVING (database unreachable,
# shutting down) is unhealthy. The start period covers initialising the embedded database on first start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s CMD python -c "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:' + os.environ.get('GRPC_PORT', '50051')); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3).status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["memory-service"]
CMD ["serve"]
