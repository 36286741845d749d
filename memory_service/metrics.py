"""All Prometheus metrics of one server, in one object with its own registry.

Labels are bounded sets (method, code, mode, outcome), never user ids or memory keys.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        rpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.grpc_started = Counter("grpc_server_started_total", "RPCs started on the server.", rpc_labels, registry=r)
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc_labels, "grpc_code"),
            registry=r,
        )
        self.grpc_latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, in seconds.",
            rpc_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_latency = Histogram(
            "memory_search_seconds",
            "Search latency by mode, in seconds.",
            ("mode",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.embedding_requests = Counter(
            "memory_embedding_requests_total",
            "Requests sent to the embedding provider, by outcome.",
            ("provider", "outcome"),
            registry=r,
        )
        self.embedding_latency = Histogram(
            "memory_embedding_request_seconds",
            "Embedding provider request latency, in seconds.",
            ("provider",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.embedding_texts = Counter(
            "memory_embedding_texts_total",
            "Texts embedded by the provider (cache misses).",
            ("provider",),
            registry=r,
        )
        self.embedding_cache_hits = Counter(
            "memory_embedding_cache_hits_total", "Texts whose embedding came from the cache.", registry=r
        )
        self.ingest_rows = Counter(
            "memory_ingest_rows_total", "Rows received by BulkStore, by outcome.", ("outcome",), registry=r
        )
        self.pool_size = Gauge("memory_db_pool_connections", "Connections open in the pool.", registry=r)
        self.pool_in_use = Gauge("memory_db_pool_in_use_connections", "Pool connections checked out.", registry=r)
        self.leases_held = Gauge("memory_leases_held", "Live leases in the database.", registry=r)
        self.leases_granted = Counter("memory_lease_grants_total", "Lease grants made by this instance.", registry=r)
        self.memories_purged = Counter("memory_expired_purged_total", "Expired memories deleted.", registry=r)
        self.watch_streams = Gauge("memory_watch_streams", "Watch streams open on this instance.", registry=r)
        self.watch_changes = Counter(
            "memory_watch_changes_delivered_total", "Changes sent to watchers by this instance.", registry=r
        )
        self.watch_lag = Histogram(
            "memory_watch_lag_seconds",
            "Database time from a change to its delivery to a watcher, in seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.history_purged = Counter(
            "memory_history_purged_total", "Versions and change-log entries past HISTORY_RETENTION deleted.", registry=r
        )
        # Per token name: bounded by the number of tokens an operator created (docs/security.md).
        self.token_calls = Counter(
            "memory_token_calls_total", "RPCs of each named token, by status code.", ("token", "grpc_code"), registry=r
        )
        self.token_quota_refusals = Counter(
            "memory_token_quota_refusals_total",
            "Calls of each named token refused by one of its quotas (rate, max_memories).",
            ("token", "quota"),
            registry=r,
        )
        self.token_memories = Gauge(
            "memory_token_memories",
            "Memories in the scopes of each token with a memory quota, as the quota counts them (refreshed with its "
            "grant, at most every 5 s while it makes calls).",
            ("token",),
            registry=r,
        )

    def watch_pool(self, size: Callable[[], int], idle: Callable[[], int]) -> None:
        """Read pool gauges at scrape time rather than tracking every acquire."""
        self.pool_size.set_function(lambda: float(size()))
        self.pool_in_use.set_function(lambda: float(size() - idle()))
