"""All Prometheus metrics of one server, in one object with its own registry.

Labels are bounded sets (method, code, mode, plan, outcome, task), never user ids or memory keys. Label values
known in advance are created at zero, so a rate or an alert has a series to read before the first event.

The metrics assume one process per ``/metrics`` endpoint: gauges such as the pool's are read from this process's
objects at scrape time, and counters live in this process's memory (a server of several processes needs
prometheus_client's multiprocess mode or one metrics port per process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

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
# A pool wait is usually zero; what matters is how often it is not, and by how much.
_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

SEARCH_MODES = ("vector", "text", "hybrid")
SEARCH_PLANS = ("exact", "index", "iterative_index", "text")
"""What answered a search: an exact scan, the vector index (plain or iterative scan), or text alone."""
BACKGROUND_TASKS = (
    "purge",
    "index_maintenance",
    "text_statistics",
    "history_retention",
    "text_index",
    "model_generation",
    "model_backfill",
    "quota_counts",
)
INGEST_OUTCOMES = ("created", "updated", "unchanged", "rejected")


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
        self.serving = Gauge(
            "memory_serving", "1 while the health status is SERVING (the database answers), else 0.", registry=r
        )
        self._search_metrics(r)
        self._index_metrics(r)
        self._model_metrics(r)
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
        self.embedding_pending = Gauge(
            "memory_embedding_pending_texts",
            "Texts handed to the embedding provider and not yet embedded (queued or in a request).",
            registry=r,
        )
        self.ingest_rows = Counter(
            "memory_ingest_rows_total", "Rows received by BulkStore, by outcome.", ("outcome",), registry=r
        )
        for outcome in INGEST_OUTCOMES:
            self.ingest_rows.labels(outcome)
        self.ingest_in_flight = Gauge(
            "memory_ingest_rows_in_flight", "BulkStore rows received and not yet acknowledged.", registry=r
        )
        self.pool_size = Gauge("memory_db_pool_connections", "Connections open in the pool.", registry=r)
        self.pool_in_use = Gauge("memory_db_pool_in_use_connections", "Pool connections checked out.", registry=r)
        self.writes_refused = Gauge(
            "memory_db_writes_refused",
            "1 while the database refuses writes (read-only, out of disk or memory), as this instance last saw.",
            registry=r,
        )
        self.pool_max = Gauge("memory_db_pool_max_connections", "Most connections the pool opens.", registry=r)
        self.pool_wait = Histogram(
            "memory_db_pool_wait_seconds",
            "Time a call waited for a pooled connection, in seconds.",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
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
        self.background_runs = Counter(
            "memory_background_runs_total",
            "Rounds of background work, by task and outcome.",
            ("task", "outcome"),
            registry=r,
        )
        self.background_success = Gauge(
            "memory_background_last_success_timestamp_seconds",
            "Unix time of each background task's last successful round (its start-up time before the first).",
            ("task",),
            registry=r,
        )
        now = time.time()
        for task in BACKGROUND_TASKS:
            for outcome in ("ok", "error"):
                self.background_runs.labels(task, outcome)
            self.background_success.labels(task).set(now)
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

    def _search_metrics(self, r: CollectorRegistry) -> None:
        self.search_latency = Histogram(
            "memory_search_seconds",
            "Search latency by mode and plan, in seconds.",
            ("mode", "plan"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.searches = Counter("memory_searches_total", "Searches by mode and plan.", ("mode", "plan"), registry=r)
        self.search_short = Counter(
            "memory_search_short_results_total",
            "Searches that answered fewer hits than top_k while more memories matched (should stay 0).",
            ("mode",),
            registry=r,
        )
        self.search_text_bounded = Counter(
            "memory_search_text_bounded_total",
            "Text and hybrid searches whose candidates met TEXT_MAX_SCORED: their commoner terms brought none in.",
            ("mode",),
            registry=r,
        )
        self.search_text_widened = Counter(
            "memory_search_text_widened_total",
            "Text and hybrid searches whose rarest terms found fewer than top_k, so every term brought candidates.",
            ("mode",),
            registry=r,
        )
        self.search_index_fallbacks = Counter(
            "memory_search_index_fallbacks_total",
            "Index searches that came back short and were answered by an exact scan.",
            ("mode",),
            registry=r,
        )
        for mode in SEARCH_MODES:
            for plan in SEARCH_PLANS:
                if (mode == "text") == (plan == "text"):
                    self.searches.labels(mode, plan)
            for counter in (self.search_short, self.search_text_bounded, self.search_text_widened):
                counter.labels(mode)
            self.search_index_fallbacks.labels(mode)
        self.search_recall = Summary(
            "memory_search_recall",
            "Recall@10 of sampled index searches against their exact re-run (SEARCH_RECALL_SAMPLE).",
            ("filtered",),
            registry=r,
        )
        self.search_recall_skipped = Counter(
            "memory_search_recall_checks_skipped_total",
            "Sampled index searches not re-run: the queue was full or no connection was idle.",
            registry=r,
        )
        for filtered in ("false", "true"):
            self.search_recall.labels(filtered)

    def _index_metrics(self, r: CollectorRegistry) -> None:
        self.index_info = Gauge(
            "memory_index_info", "1 for the vector index's kind (ivfflat, hnsw, or none).", ("kind",), registry=r
        )
        self.index_usable = Gauge(
            "memory_index_usable", "1 when a valid vector index exists and searches may use it.", registry=r
        )
        self.index_lists = Gauge("memory_index_lists", "ivfflat lists (0 for HNSW or no index).", registry=r)
        self.index_m = Gauge("memory_index_hnsw_m", "HNSW m (0 for ivfflat or no index).", registry=r)
        self.index_rows = Gauge("memory_index_rows", "Rows with an embedding, as the planner estimates.", registry=r)
        self.index_rows_at_build = Gauge("memory_index_rows_at_build", "Rows when the index was built.", registry=r)
        self.index_tail_rows = Gauge(
            "memory_index_tail_rows",
            "Rows above the HNSW graph's watermark, searched exactly until a build or an insertion takes them.",
            registry=r,
        )
        self.index_tail_bound = Gauge(
            "memory_index_tail_bound_rows",
            "The HNSW tail at which the graph is built again (HNSW_TAIL_ROWS, or half its rows); 0 without a tail.",
            registry=r,
        )
        self.index_exact_rows = Gauge(
            "memory_index_exact_search_max_rows", "Below this many rows every search is exact (no index).", registry=r
        )
        self.index_built = Gauge(
            "memory_index_built_timestamp_seconds", "Unix time the index was built (0: never).", registry=r
        )
        self.index_calibrated = Gauge(
            "memory_index_calibrated_timestamp_seconds", "Unix time of the index's calibration (0: none).", registry=r
        )
        self.index_target_recall = Gauge(
            "memory_index_target_recall", "SEARCH_TARGET_RECALL, what calibration chooses probes for.", registry=r
        )
        self.index_setting = Gauge(
            "memory_index_search_setting",
            "Probes (ivfflat) or ef_search (HNSW) index searches use, unfiltered and filtered.",
            ("filtered",),
            registry=r,
        )
        self.index_estimated_recall = Gauge(
            "memory_index_estimated_recall",
            "Recall@10 the calibration measured at the setting in use (0: not calibrated).",
            ("filtered",),
            registry=r,
        )
        self.index_calibration_queries = Gauge(
            "memory_index_calibration_queries",
            "Queries the calibration measured on, by source (recent searches or sampled memories).",
            ("filtered", "source"),
            registry=r,
        )

    def _model_metrics(self, r: CollectorRegistry) -> None:
        """A move to another embedding model (docs/model-migration.md)."""
        self.model_backfill_written = Counter(
            "memory_model_backfill_written_total",
            "Memories this instance re-embedded into the other generation of a model move.",
            registry=r,
        )
        self.model_move_phase = Gauge(
            "memory_model_move_phase", "Embedding model move: 0 none, 1 backfilling, 2 cut over.", registry=r
        )
        self.model_backfill_done = Gauge(
            "memory_model_backfill_done_memories", "Memories with a vector of the move's other generation.", registry=r
        )
        self.model_backfill_total = Gauge(
            "memory_model_backfill_total_memories", "Memories the move's backfill covers.", registry=r
        )
        self.model_backfill_rate = Gauge(
            "memory_model_backfill_rate_memories_per_second", "Recent re-embedding rate of the backfill.", registry=r
        )
        self.model_backfill_eta = Gauge(
            "memory_model_backfill_eta_seconds", "Estimated seconds until the backfill completes.", registry=r
        )
        self.model_gate_overlap = Gauge(
            "memory_model_gate_overlap_at_10",
            "Quality gate: mean overlap of the two generations' top 10, by sample (searches, memories).",
            ("sample",),
            registry=r,
        )
        self.model_gate_top_changed = Gauge(
            "memory_model_gate_top_hit_changed_ratio",
            "Quality gate: share of queries whose first hit differs between the generations, by sample.",
            ("sample",),
            registry=r,
        )

    def watch_pool(
        self,
        size: Callable[[], int],
        idle: Callable[[], int],
        maximum: int = 0,
        refusing: Callable[[], bool] = lambda: False,
    ) -> None:
        """Read pool gauges at scrape time rather than tracking every acquire."""
        self.pool_size.set_function(lambda: float(size()))
        self.pool_in_use.set_function(lambda: float(size() - idle()))
        self.pool_max.set(maximum)
        self.writes_refused.set_function(lambda: float(refusing()))

    def init_rpcs(self, methods: Iterable[tuple[str, str, str]]) -> None:
        """Create each method's call series at zero (``grpc_type``, ``grpc_service``, ``grpc_method``; status OK
        for the handled count), so an idle instance's call panels and rules read 0, not "no data"."""
        for labels in methods:
            self.grpc_started.labels(*labels)
            self.grpc_latency.labels(*labels)
            self.grpc_handled.labels(*labels, "OK")

    def init_embedding(self, provider: str, outcomes: Iterable[str] = ("ok", "retryable_error", "refused")) -> None:
        """Create the provider's series at zero, so its error ratio has something to divide from the start."""
        for outcome in outcomes:
            self.embedding_requests.labels(provider, outcome)
        self.embedding_texts.labels(provider)
        self.embedding_latency.labels(provider)
