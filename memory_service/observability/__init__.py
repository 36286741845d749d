"""What an operator sees of each call besides metrics: the JSON log, the slow-call log and OpenTelemetry traces.

Foundation: it knows no gRPC and no driver. ``calls`` holds the running call's note (request id, principal, the
plan its search chose), ``logs`` formats log records, ``tracing`` starts spans when OTEL_EXPORTER_OTLP_ENDPOINT is
set and costs nothing when it is not.
"""
