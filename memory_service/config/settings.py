"""Settings read once from the environment (12-factor) and validated before anything starts.

Every bad value stops start-up with one line naming the variable, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import platformdirs

from memory_service.config.cores import available_cores
from memory_service.config.env import MIN_TOKEN_LENGTH, EnvReader, parse_duration, redact_url
from memory_service.errors import ConfigError
from memory_service.models import IndexKind
from memory_service.observability.logs import LOG_FORMATS
from memory_service.observability.tracing import endpoint_from

__all__ = ["MIN_TOKEN_LENGTH", "Settings", "parse_duration", "redact_url"]

EMBEDDING_PROVIDERS = ("hash", "openai", "local")
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
DEFAULT_HASH_MODEL = "hash-ngram-v1"
DEFAULT_LOCAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_MODELS = {"openai": DEFAULT_OPENAI_MODEL, "hash": DEFAULT_HASH_MODEL, "local": DEFAULT_LOCAL_MODEL}
DEFAULT_METRICS_PORT = 9464
_DEFAULT_DIMS = {"openai": 1536, "hash": 384, "local": 384}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The whole configuration of one server instance."""

    database_url: str | None = None
    """PostgreSQL DSN; unset starts the embedded PostgreSQL in ``data_dir``."""
    database_read_url: str | None = None
    """Optional read replica for searches."""
    database_pool_min: int = 4
    database_pool_max: int = 20
    data_dir: Path = dataclasses.field(
        default_factory=lambda: Path(platformdirs.user_data_dir("memory-service", appauthor=False))
    )
    """Where the embedded PostgreSQL keeps its data across restarts."""
    migrate_on_start: bool = True

    embedding_provider: str = "hash"
    """``hash`` (lexical, no network), ``local`` (a semantic ONNX model in-process) or ``openai`` (any
    OpenAI-compatible server)."""
    embedding_model_path: Path | None = None
    """Directory of the local provider's model (ONNX and tokenizer); unset downloads ``embedding_model``."""
    embedding_threads: int = 2
    """Threads the local provider's model may use for one batch."""
    embedding_model: str = DEFAULT_HASH_MODEL
    embedding_dim: int = 384
    embedding_dim_explicit: bool = False
    """EMBEDDING_DIM was set, so the OpenAI provider sends it as ``dimensions`` (text-embedding-3 models)."""
    embedding_batch_size: int = 128
    """Texts per provider request."""
    embedding_timeout: float = 30.0
    embedding_max_retries: int = 4
    openai_api_key: str | None = dataclasses.field(default=None, repr=False)
    openai_base_url: str | None = None
    embedding_next_provider: str | None = None
    """The model to move the database to (docs/model-migration.md); unset: no move. ``EMBEDDING_NEXT_MODEL``,
    ``_DIM`` and ``_MODEL_PATH`` mean for it what ``EMBEDDING_MODEL``, ``_DIM`` and ``_MODEL_PATH`` mean."""
    embedding_next_model: str | None = None
    embedding_next_dim: int | None = None
    embedding_next_dim_explicit: bool = False
    embedding_next_model_path: Path | None = None
    model_backfill_rate: float = 250.0
    """Memories the background re-embedding writes per second at most (0: as fast as the embedder goes). At 250 a
    backfill of 100k memories takes 7 minutes and the searches meanwhile stay within 1.5x (docs/benchmarks.md)."""
    model_backfill_batch: int = 256
    """Memories the re-embedding reads, embeds and writes per transaction."""

    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    server_processes: int = dataclasses.field(default_factory=available_cores)
    """Server processes ``serve`` runs on the one port (``app.processes``): the cores this process may use (its
    CPU affinity and its container's CPU limit, ``config.cores``). An in-process ``MemoryServer`` (tests,
    embedding) is always one."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = DEFAULT_METRICS_PORT
    """None (``METRICS_PORT=off``) disables the metrics endpoint; 0 picks a free port, as GRPC_PORT=0 does."""
    grpc_max_message_bytes: int = 8 * 1024 * 1024
    grpc_max_concurrent_rpcs: int = 1000
    """Calls in progress past this answer RESOURCE_EXHAUSTED at once instead of queueing without bound."""
    shutdown_grace: float = 20.0
    """Seconds in-flight calls get to finish after SIGTERM."""
    grpc_keepalive_time: float = 10.0
    """Seconds between HTTP/2 keepalive pings on a connection, from the server and from the Python client."""
    grpc_keepalive_timeout: float = 5.0
    """Seconds a ping may go unanswered before the peer is taken for dead and its calls (Hold streams) end."""
    health_check_interval: float = 1.0
    """Seconds between the health probes of PostgreSQL that turn the gRPC health status NOT_SERVING and back."""
    auth_tokens: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    """Bearer tokens accepted in the ``authorization`` metadata; empty disables auth."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mutual TLS)."""
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` lines, or ``json``: one object per line, with an access log line per call at INFO."""
    slow_call_seconds: float | None = None
    """Calls slower than this are logged at WARNING with their search plan (never their text); unset: off."""
    otel_traces_endpoint: str | None = None
    """OTLP/HTTP URL spans go to, from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (plus
    ``/v1/traces``); unset: tracing off."""
    search_recall_sample: float = 0.01
    """Share of index searches re-run exactly in the background to estimate recall (``memory_search_recall``)."""
    search_recall_budget: float = 0.02
    """Share of one database connection's time those re-runs may take in each server process: an exact scan costs
    what the table holds, so at a high search rate the share of searches alone would keep a connection busy."""

    max_text_bytes: int = 32 * 1024
    """Largest memory value (and search query) accepted, in UTF-8 bytes."""
    search_max_top_k: int = 200
    list_max_page_size: int = 1000
    embed_max_texts: int = 256
    vector_index: IndexKind = "hnsw"
    """The approximate index: ``hnsw`` (a graph up to a watermark and an exact tail, see ``hnsw_tail_rows``) or
    ``ivfflat``."""
    search_target_recall: float = 0.95
    """Recall@10 the index's calibration chooses probes (ef_search) for."""
    search_calibration_queries: int = 400
    """Queries a calibration measures on (half choose, half check): points made from sampled memories until real
    searches replace them, and how many recent searches of each kind an instance keeps for that. 400 rather than
    200: the choice is made on a 95% lower bound, which a larger sample brings closer to the recall it bounds, so
    the setting overshoots less (docs/benchmarks.md, "How many queries a calibration measures on")."""
    ivfflat_probes: int | None = None
    """Probes for every approximate search on ivfflat; unset takes the calibrated probes."""
    hnsw_ef_search: int | None = None
    """ef_search for every approximate search on HNSW; unset takes the calibrated value."""
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_tail_rows: int = 5000
    """Rows written since the HNSW graph was built that are searched exactly (the tail) before index care builds
    the graph again over them; 0: every row goes into the graph as it is written (pgvector's per-row insert).
    Each tail row costs every index search about 1 us of CPU at 384 dimensions (bench.hnsw_tail_search)."""
    hnsw_graph_insert_rows: int = 30_000
    """An HNSW graph of this many rows or more takes its tail by inserting the rows into it (about 1.7 ms of
    database CPU each) instead of being built again (0.26 ms a row of the whole graph on two cores, for every
    ``hnsw_tail_rows`` written); 0: always rebuild. See ``search.hnsw_tail``."""
    index_check_interval: float = 60.0
    """How often each instance checks whether the vector index is due for a rebuild or a calibration."""
    exact_search_max_rows: int = 20_000
    """Below this many rows there is no vector index and every search is exact."""
    search_narrow_filter_rows: int = 5000
    """A filter matching fewer rows than this is searched exactly through the btree indexes, not through ivfflat."""
    bm25_k1: float = 1.2
    """BM25 term-frequency saturation."""
    bm25_b: float = 0.75
    """BM25 document-length normalisation (0 = none, 1 = full)."""
    text_max_scored: int = 2000
    """Most memories one text query scores; terms are taken rarest first until their documents reach it."""
    text_stats_interval: float = 10.0
    """How often each instance checks whether BM25's corpus statistics are due for a refresh."""
    text_index: bool = True
    """TEXT and HYBRID searches rank with the in-memory text index (exact BM25 top-k); off: with the SQL statement."""
    text_index_interval: float = 0.2
    """How often the text index applies new changes in the background (searches apply them too before ranking)."""
    text_index_max_mb: int = 2048
    """Most memory the text index may hold per server process; a larger corpus is ranked by the SQL statement."""
    hybrid_alpha: float | None = None
    """Vector weight in weighted hybrid fusion; unset: 0.5 with a semantic provider, 0.2 with the hash embedder."""
    purge_interval: float = 60.0

    lease_min_ttl: float = 1.0
    lease_max_ttl: float = 3600.0
    lease_max_wait: float = 300.0
    lease_quota: int = 1000
    """Leases one caller may hold at a time."""

    bulk_max_items_per_request: int = 1000
    """Items one BulkStore request may carry; larger requests are refused, not silently split."""
    bulk_batch_rows: int = 1000
    """Rows BulkStore writes per transaction (and acknowledges per ack)."""
    bulk_queue_depth: int = 2
    """Requests, and batches, BulkStore buffers between receive, embed and write: its backpressure bound."""

    history_versions: bool = True
    """Record a version and a change-log entry for every change; off (for comparison benchmarks, or a store that
    wants no history) leaves History, as-of reads and Watch with nothing new to show."""
    history_retention: float = 30 * 86400.0
    """Seconds superseded versions, tombstones and change-log entries are kept before the background purge."""
    watch_poll_interval: float = 1.0
    """Seconds between change-feed polls when no NOTIFY wakes it (a lost notification costs at most this)."""

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    def next_embedding(self) -> Settings | None:
        """These settings with the next model as the embedding model, to build its provider; None without one."""
        if self.embedding_next_provider is None:
            return None
        return dataclasses.replace(
            self,
            embedding_provider=self.embedding_next_provider,
            embedding_model=self.embedding_next_model or _DEFAULT_MODELS[self.embedding_next_provider],
            embedding_dim=self.embedding_next_dim or _DEFAULT_DIMS[self.embedding_next_provider],
            embedding_dim_explicit=self.embedding_next_dim_explicit,
            embedding_model_path=self.embedding_next_model_path,
            embedding_next_provider=None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings; raise ConfigError with one line on the first bad value."""
        reader = EnvReader(os.environ if env is None else env)
        api_key = reader.text("OPENAI_API_KEY")
        base_url = reader.http_url("OPENAI_BASE_URL")
        # Naming an endpoint or a key says which provider is meant, as much as EMBEDDING_PROVIDER would.
        implied = "openai" if api_key or base_url else "hash"
        provider = reader.choice("EMBEDDING_PROVIDER", EMBEDDING_PROVIDERS, implied)
        default_model = _DEFAULT_MODELS[provider]
        default_dim = _DEFAULT_DIMS[provider]
        d = cls()  # the defaults, written once: on the fields above
        values: dict[str, Any] = dict(
            database_url=reader.postgres_url("DATABASE_URL"),
            database_read_url=reader.postgres_url("DATABASE_READ_URL"),
            database_pool_min=reader.integer("DATABASE_POOL_MIN", d.database_pool_min, minimum=1),
            database_pool_max=reader.integer("DATABASE_POOL_MAX", d.database_pool_max, minimum=1),
            migrate_on_start=reader.boolean("MIGRATE_ON_START", d.migrate_on_start),
            embedding_provider=provider,
            embedding_model=reader.text("EMBEDDING_MODEL") or default_model,
            embedding_dim=reader.integer("EMBEDDING_DIM", default_dim, minimum=1, maximum=16000),
            embedding_dim_explicit=reader.text("EMBEDDING_DIM") is not None,
            embedding_batch_size=reader.integer(
                "EMBEDDING_BATCH_SIZE", d.embedding_batch_size, minimum=1, maximum=2048
            ),
            embedding_timeout=reader.duration("EMBEDDING_TIMEOUT", d.embedding_timeout),
            embedding_max_retries=reader.integer(
                "EMBEDDING_MAX_RETRIES", d.embedding_max_retries, minimum=0, maximum=20
            ),
            openai_api_key=api_key,
            openai_base_url=base_url,
            embedding_model_path=reader.path("EMBEDDING_MODEL_PATH"),
            embedding_threads=reader.integer("EMBEDDING_THREADS", d.embedding_threads, minimum=1, maximum=64),
            **_next_model(reader),
            model_backfill_rate=reader.number("MODEL_BACKFILL_RATE", d.model_backfill_rate, minimum=0.0, maximum=1e9),
            model_backfill_batch=reader.integer(
                "MODEL_BACKFILL_BATCH", d.model_backfill_batch, minimum=1, maximum=10_000
            ),
            grpc_host=reader.text("GRPC_HOST") or d.grpc_host,
            grpc_port=reader.integer("GRPC_PORT", d.grpc_port, minimum=0, maximum=65535),
            server_processes=reader.integer("SERVER_PROCESSES", d.server_processes, minimum=1, maximum=256),
            metrics_host=reader.text("METRICS_HOST") or d.metrics_host,
            metrics_port=reader.port_or_off("METRICS_PORT", DEFAULT_METRICS_PORT),
            grpc_max_concurrent_rpcs=reader.integer(
                "GRPC_MAX_CONCURRENT_RPCS", d.grpc_max_concurrent_rpcs, minimum=1, maximum=1_000_000
            ),
            grpc_max_message_bytes=reader.integer(
                "GRPC_MAX_MESSAGE_BYTES", d.grpc_max_message_bytes, minimum=64 * 1024, maximum=1 << 30
            ),
            shutdown_grace=reader.duration("SHUTDOWN_GRACE", d.shutdown_grace),
            grpc_keepalive_time=reader.duration("GRPC_KEEPALIVE_TIME", d.grpc_keepalive_time),
            grpc_keepalive_timeout=reader.duration("GRPC_KEEPALIVE_TIMEOUT", d.grpc_keepalive_timeout),
            health_check_interval=reader.duration("HEALTH_CHECK_INTERVAL", d.health_check_interval),
            auth_tokens=reader.token_list("AUTH_TOKENS"),
            tls_cert_file=reader.path("TLS_CERT_FILE"),
            tls_key_file=reader.path("TLS_KEY_FILE"),
            tls_client_ca_file=reader.path("TLS_CLIENT_CA_FILE"),
            log_level=reader.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), d.log_level, upper=True),
            log_format=reader.choice("LOG_FORMAT", LOG_FORMATS, d.log_format),
            slow_call_seconds=reader.optional_number("SLOW_CALL_SECONDS", minimum=0.0, maximum=86400.0),
            otel_traces_endpoint=_otel_endpoint(reader, env if env is not None else os.environ),
            search_recall_sample=reader.number(
                "SEARCH_RECALL_SAMPLE", d.search_recall_sample, minimum=0.0, maximum=1.0
            ),
            search_recall_budget=reader.number(
                "SEARCH_RECALL_BUDGET", d.search_recall_budget, minimum=0.001, maximum=1.0
            ),
            max_text_bytes=reader.integer("MAX_TEXT_BYTES", d.max_text_bytes, minimum=16, maximum=1 << 20),
            search_max_top_k=reader.integer("SEARCH_MAX_TOP_K", d.search_max_top_k, minimum=1, maximum=10_000),
            list_max_page_size=reader.integer("LIST_MAX_PAGE_SIZE", d.list_max_page_size, minimum=1, maximum=100_000),
            embed_max_texts=reader.integer("EMBED_MAX_TEXTS", d.embed_max_texts, minimum=1, maximum=10_000),
            vector_index=cast(IndexKind, reader.choice("VECTOR_INDEX", ("ivfflat", "hnsw"), d.vector_index)),
            search_target_recall=reader.number(
                "SEARCH_TARGET_RECALL", d.search_target_recall, minimum=0.5, maximum=1.0
            ),
            search_calibration_queries=reader.integer(
                "SEARCH_CALIBRATION_QUERIES", d.search_calibration_queries, minimum=10, maximum=10_000
            ),
            ivfflat_probes=reader.optional_integer("IVFFLAT_PROBES", minimum=1, maximum=32768),
            hnsw_ef_search=reader.optional_integer("HNSW_EF_SEARCH", minimum=1, maximum=1000),
            hnsw_m=reader.integer("HNSW_M", d.hnsw_m, minimum=2, maximum=100),
            hnsw_ef_construction=reader.integer(
                "HNSW_EF_CONSTRUCTION", d.hnsw_ef_construction, minimum=4, maximum=1000
            ),
            hnsw_tail_rows=reader.integer("HNSW_TAIL_ROWS", d.hnsw_tail_rows, minimum=0, maximum=10_000_000),
            hnsw_graph_insert_rows=reader.integer(
                "HNSW_GRAPH_INSERT_ROWS", d.hnsw_graph_insert_rows, minimum=0, maximum=1_000_000_000
            ),
            index_check_interval=reader.duration("INDEX_CHECK_INTERVAL", d.index_check_interval),
            exact_search_max_rows=reader.integer("EXACT_SEARCH_MAX_ROWS", d.exact_search_max_rows, minimum=0),
            search_narrow_filter_rows=reader.integer(
                "SEARCH_NARROW_FILTER_ROWS", d.search_narrow_filter_rows, minimum=0
            ),
            bm25_k1=reader.number("BM25_K1", d.bm25_k1, minimum=0.0, maximum=10.0),
            bm25_b=reader.number("BM25_B", d.bm25_b, minimum=0.0, maximum=1.0),
            text_max_scored=reader.integer("TEXT_MAX_SCORED", d.text_max_scored, minimum=100, maximum=10_000_000),
            text_stats_interval=reader.duration("TEXT_STATS_INTERVAL", d.text_stats_interval),
            text_index=reader.boolean("TEXT_INDEX", d.text_index),
            text_index_interval=reader.duration("TEXT_INDEX_INTERVAL", d.text_index_interval),
            text_index_max_mb=reader.integer("TEXT_INDEX_MAX_MB", d.text_index_max_mb, minimum=1, maximum=1_000_000),
            hybrid_alpha=reader.optional_number("SEARCH_HYBRID_ALPHA", minimum=0.0, maximum=1.0),
            purge_interval=reader.duration("PURGE_INTERVAL", d.purge_interval),
            lease_min_ttl=reader.duration("LEASE_MIN_TTL", d.lease_min_ttl),
            lease_max_ttl=reader.duration("LEASE_MAX_TTL", d.lease_max_ttl),
            lease_max_wait=reader.duration("LEASE_MAX_WAIT", d.lease_max_wait),
            lease_quota=reader.integer("LEASE_QUOTA", d.lease_quota, minimum=1),
            bulk_max_items_per_request=reader.integer(
                "BULK_MAX_ITEMS_PER_REQUEST", d.bulk_max_items_per_request, minimum=1, maximum=100_000
            ),
            bulk_batch_rows=reader.integer("BULK_BATCH_ROWS", d.bulk_batch_rows, minimum=1, maximum=100_000),
            bulk_queue_depth=reader.integer("BULK_QUEUE_DEPTH", d.bulk_queue_depth, minimum=1, maximum=64),
            history_versions=reader.boolean("HISTORY_VERSIONS", d.history_versions),
            history_retention=reader.duration("HISTORY_RETENTION", d.history_retention),
            watch_poll_interval=reader.duration("WATCH_POLL_INTERVAL", d.watch_poll_interval),
        )
        data_dir = reader.path("MEMORY_SERVICE_DATA_DIR")
        if data_dir is not None:
            values["data_dir"] = data_dir
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; single fields are checked while parsing."""
        if self.database_pool_max < self.database_pool_min:
            raise ConfigError(
                "DATABASE_POOL_MAX is expected to be at least DATABASE_POOL_MIN "
                f"(got {self.database_pool_max} < {self.database_pool_min})"
            )
        if self.lease_max_ttl < self.lease_min_ttl:
            raise ConfigError(
                "LEASE_MAX_TTL is expected to be at least LEASE_MIN_TTL "
                f"(got {self.lease_max_ttl} < {self.lease_min_ttl})"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE are expected together (got only one of them)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("TLS_CLIENT_CA_FILE is expected only with TLS_CERT_FILE and TLS_KEY_FILE")
        for name, path in (
            ("TLS_CERT_FILE", self.tls_cert_file),
            ("TLS_KEY_FILE", self.tls_key_file),
            ("TLS_CLIENT_CA_FILE", self.tls_client_ca_file),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} is expected to name a readable file (got {str(path)!r})")
        if self.embedding_model_path is not None and not self.embedding_model_path.is_dir():
            raise ConfigError(
                f"EMBEDDING_MODEL_PATH is expected to name a model directory (got {str(self.embedding_model_path)!r})"
            )
        if self.embedding_next_provider is None and (self.embedding_next_model or self.embedding_next_dim):
            raise ConfigError(
                "EMBEDDING_NEXT_MODEL and EMBEDDING_NEXT_DIM are expected with EMBEDDING_NEXT_PROVIDER "
                "(got no provider)"
            )
        if self.embedding_next_model_path is not None and not self.embedding_next_model_path.is_dir():
            raise ConfigError(
                "EMBEDDING_NEXT_MODEL_PATH is expected to name a model directory "
                f"(got {str(self.embedding_next_model_path)!r})"
            )
        if self.embedding_provider == "openai" and not (self.openai_api_key or self.openai_base_url):
            raise ConfigError(
                "EMBEDDING_PROVIDER=openai is expected with OPENAI_API_KEY or OPENAI_BASE_URL (got neither)"
            )
        if self.embedding_next_provider == "openai" and not (self.openai_api_key or self.openai_base_url):
            raise ConfigError(
                "EMBEDDING_NEXT_PROVIDER=openai is expected with OPENAI_API_KEY or OPENAI_BASE_URL (got neither)"
            )


def _next_model(reader: EnvReader) -> dict[str, Any]:
    provider = reader.text("EMBEDDING_NEXT_PROVIDER")
    if provider is not None:
        provider = reader.choice("EMBEDDING_NEXT_PROVIDER", EMBEDDING_PROVIDERS, "hash")
    return dict(
        embedding_next_provider=provider,
        embedding_next_model=reader.text("EMBEDDING_NEXT_MODEL"),
        embedding_next_dim=reader.optional_integer("EMBEDDING_NEXT_DIM", minimum=1, maximum=16000),
        embedding_next_dim_explicit=reader.text("EMBEDDING_NEXT_DIM") is not None,
        embedding_next_model_path=reader.path("EMBEDDING_NEXT_MODEL_PATH"),
    )


def _otel_endpoint(reader: EnvReader, env: Mapping[str, str]) -> str | None:
    endpoint = endpoint_from(env)
    if endpoint is None:
        return None
    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    if scheme not in ("http", "https"):
        name = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            if reader.text("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            else ("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        raise ConfigError(f"{name} is expected to be an http:// or https:// URL (got {reader.text(name)!r})")
    return endpoint
