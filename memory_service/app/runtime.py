"""Everything behind the transport: database, embedder, domain services and background work.

The gRPC servicers and the CLI both drive a Runtime; it knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from memory_service.app import loops, moves
from memory_service.app.database_place import DatabasePlace
from memory_service.config.settings import Settings
from memory_service.embeddings.factory import hybrid_alpha
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import StartupError
from memory_service.generations.state import REFRESH_SECONDS, Generations
from memory_service.history.feed import ChangeFeed
from memory_service.history.service import History
from memory_service.leases.manager import LeaseManager
from memory_service.memories import purge
from memory_service.memories.binding import ModelBinding
from memory_service.memories.ingest import BulkIngest
from memory_service.memories.stats import Stats, collect
from memory_service.memories.store import MemoryStore
from memory_service.metrics import Metrics
from memory_service.observability.tracing import Tracing
from memory_service.search import SearchEngine
from memory_service.search.index_care import IndexCare
from memory_service.search.observe import SearchObserver
from memory_service.search.query_sample import QuerySample
from memory_service.search.recall_check import RecallCheck
from memory_service.search.text_search import TextSearch
from memory_service.search.text_stats import TextStats
from memory_service.search.tuning import TextRanking
from memory_service.storage import isolation_sql, settings_sql
from memory_service.storage.database import Database, check_reachable
from memory_service.storage.migrations import apply_migrations
from memory_service.tenants.tokens import Tokens

log = logging.getLogger(__name__)

WATCH_PAGE_ROWS = 500
"""Changes one watcher reads per query: what it holds in memory at most."""


def _version_at_least(version: str, wanted: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= wanted


class Runtime:
    """Owns every long-lived component; ``start`` builds them in dependency order, ``close`` tears them down."""

    def __init__(self, settings: Settings, metrics: Metrics, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self._recall: RecallCheck | None = None
        self.place = DatabasePlace(settings)
        self._db: Database | None = None
        self._read_db: Database | None = None
        self._embedder: EmbeddingService | None = None
        self._memories: MemoryStore | None = None
        self._search: SearchEngine | None = None
        self._index: IndexCare | None = None
        self._text_stats: TextStats | None = None
        self._leases: LeaseManager | None = None
        self._bulk: BulkIngest | None = None
        self._binding: ModelBinding | None = None
        self._history: History | None = None
        self._feed: ChangeFeed | None = None
        self._tokens: Tokens | None = None
        self._moves: moves.ModelMoves | None = None
        self.postgres_version = ""
        self.pgvector_version = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.stopping = asyncio.Event()
        """Set when shutdown begins: streams stop taking new work (BulkStore ends after committing what it has)."""

    @property
    def dsn(self) -> str:
        return self.place.dsn

    @property
    def db(self) -> Database:
        return _started(self._db)

    @property
    def binding(self) -> ModelBinding:
        return _started(self._binding)

    @property
    def embedder(self) -> EmbeddingService:
        return _started(self._embedder)

    @property
    def memories(self) -> MemoryStore:
        return _started(self._memories)

    @property
    def search(self) -> SearchEngine:
        return _started(self._search)

    @property
    def index(self) -> IndexCare:
        return _started(self._index)

    @property
    def text_stats(self) -> TextStats:
        return _started(self._text_stats)

    @property
    def leases(self) -> LeaseManager:
        return _started(self._leases)

    @property
    def bulk(self) -> BulkIngest:
        """The BulkStore pipeline; it keeps no per-stream state, so one serves every stream."""
        return _started(self._bulk)

    @property
    def moves(self) -> moves.ModelMoves:
        """The database's embedding generations as this instance sees them (docs/model-migration.md)."""
        return _started(self._moves)

    @property
    def tokens(self) -> Tokens:
        """The tokens table and AUTH_TOKENS: resolves each call's access."""
        return _started(self._tokens)

    @property
    def history(self) -> History:
        return _started(self._history)

    @property
    def feed(self) -> ChangeFeed:
        """The change stream; its frontier poller runs only with background work on."""
        return _started(self._feed)

    async def start(self, *, background: bool = True) -> None:
        """Build every component in dependency order; ``background`` also starts the loops and the change feed."""
        try:
            db = await self._open_database()
            await self._check_isolation(db)
            self._tokens = Tokens(db, self.settings.auth_tokens, metrics=self.metrics)
            self._leases = LeaseManager(db, self.settings, self.metrics)
            await self._leases.start()
            binding = self._new_binding(db)
            generations = await moves.start_generations(db, binding, self.settings, self.metrics)
            self._embedder = embedder = generations.current
            self.metrics.init_embedding(embedder.provider.name)
            self._build_write_path(db, self._embedder, binding, generations)
            seen = QuerySample(self.settings.search_calibration_queries)  # this instance's searches, to calibrate on
            index = await self._start_index_care(db, seen)
            self._moves = moves.ModelMoves(generations, index, self._leases, self.settings, self.stopping)
            self._text_stats = TextStats(db)
            await self._text_stats.maintain()
            await self._build_search(db, self._embedder, index, hybrid_alpha(self.settings, embedder.provider), seen)
            self.moves.follow(self.search, index)
            if background:
                await self._start_background()
        except BaseException:
            await self.close()
            raise

    async def start_index_care(self) -> IndexCare:
        """Start only what index maintenance needs (``memory-service reindex``): the database and the index care."""
        try:
            seen = QuerySample(self.settings.search_calibration_queries)
            return await self._start_index_care(await self._open_database(), seen)
        except BaseException:
            await self.close()
            raise

    async def _open_database(self) -> Database:
        """Find (or start) the database, migrate it, open the pool and read the server's versions."""
        settings = self.settings
        dsn = await self.place.open()
        await check_reachable(dsn, named_by=self.place.named_by)
        if settings.migrate_on_start:
            applied = await apply_migrations(dsn)
            log.info("migrations: %s", ", ".join(applied) if applied else "up to date")
        self._db = db = await Database.connect(
            dsn, min_size=settings.database_pool_min, max_size=settings.database_pool_max, on_query=self._on_query
        )
        db.on_wait = self.metrics.pool_wait.observe
        self.metrics.watch_pool(db.pool_size, db.pool_idle, settings.database_pool_max, lambda: db.refusing)
        async with db.connection() as conn:
            self.postgres_version, self.pgvector_version = await settings_sql.server_versions(conn)
        log.info(
            "PostgreSQL %s, pgvector %s (iterative index scans %s)",
            self.postgres_version,
            self.pgvector_version,
            "available" if self._iterative_scan else "unavailable: filtered searches fall back to exact scans",
        )
        return db

    async def _check_isolation(self, db: Database) -> None:
        """Refuse to serve when row-level security would not confine the calls of scoped tokens (docs/security.md)."""
        async with db.connection() as conn:
            problem = await isolation_sql.isolation_problem(conn)
        if problem is not None:
            raise StartupError(f"tenant isolation is not in force, refusing to start: {problem}")

    @property
    def _iterative_scan(self) -> bool:
        """Whether pgvector keeps scanning an index until enough rows pass a filter (0.8+)."""
        return _version_at_least(self.pgvector_version, (0, 8))

    def _new_binding(self, db: Database) -> ModelBinding:
        """The binding of this configuration; checked against the database's generations (moves.start_generations)."""
        location, start_over = self.place.where()
        self._binding = ModelBinding(
            db,
            model=self.settings.embedding_model,
            dimension=self.settings.embedding_dim,
            location=location,
            start_over=start_over,
        )
        return self._binding

    def _build_write_path(
        self, db: Database, embedder: EmbeddingService, binding: ModelBinding, generations: Generations
    ) -> None:
        """Store, BulkStore, History and the change feed; during a move of models they write both generations."""
        settings = self.settings
        self._memories = MemoryStore(db, embedder, binding, history=settings.history_versions, generations=generations)
        self._history = History(db, self.metrics, retention=timedelta(seconds=settings.history_retention))
        self._feed = ChangeFeed(
            db, self.dsn, self.metrics, poll_interval=settings.watch_poll_interval, page_rows=WATCH_PAGE_ROWS
        )
        self._bulk = BulkIngest(
            db,
            embedder,
            binding,
            self.metrics,
            batch_rows=settings.bulk_batch_rows,
            queue_depth=settings.bulk_queue_depth,
            max_items_per_request=settings.bulk_max_items_per_request,
            stopping=self.stopping,
            history=settings.history_versions,
            generations=generations,
        )

    async def _start_index_care(self, db: Database, seen: QuerySample) -> IndexCare:
        self._index = IndexCare.from_settings(
            db,
            self.dsn,
            self.settings,
            iterative_scan=self._iterative_scan,
            seen=seen,
            metrics=self.metrics,
            configured_setting=self._configured_setting,
        )
        await self._index.refresh()
        return self._index

    async def _build_search(
        self, db: Database, embedder: EmbeddingService, index: IndexCare, alpha: float, seen: QuerySample
    ) -> None:
        """The search engine, on the read replica when one is configured."""
        settings = self.settings
        read_db = db
        if settings.database_read_url:
            await check_reachable(settings.database_read_url, named_by="named by DATABASE_READ_URL")
            self._read_db = read_db = await Database.connect(
                settings.database_read_url, min_size=1, max_size=settings.database_pool_max, on_query=self._on_query
            )
            read_db.on_wait = self.metrics.pool_wait.observe
        self._recall = RecallCheck(
            read_db, self.metrics, sample=settings.search_recall_sample, budget=settings.search_recall_budget
        )
        ranking = TextRanking(k1=settings.bm25_k1, b=settings.bm25_b, max_scored=settings.text_max_scored)
        text_search = TextSearch(read_db, ranking, max_mb=settings.text_index_max_mb) if settings.text_index else None
        if text_search is not None:
            await text_search.load_if_small()  # a large table loads in the background (_start_background)
        self._search = SearchEngine(
            read_db,
            embedder,
            index,
            self.metrics,
            iterative_scan=self._iterative_scan,
            default_probes=self._configured_setting,
            narrow_filter_rows=settings.search_narrow_filter_rows,
            text_ranking=ranking,
            hybrid_alpha=alpha,
            seen=seen,
            observer=SearchObserver(self.metrics, self._recall),
            text_search=text_search,
            generations=self.moves.generations,
        )

    @property
    def _configured_setting(self) -> int | None:
        """The operator's probes (ef_search for HNSW) for every index search; None leaves it to calibration."""
        return self.settings.hnsw_ef_search if self.settings.vector_index == "hnsw" else self.settings.ivfflat_probes

    @property
    def _on_query(self) -> Callable[[Any], None] | None:
        """Tracing's hook on every SQL statement, when tracing is on."""
        return self.tracing.on_query if self.tracing is not None else None

    async def _start_background(self) -> None:
        """The periodic loops (embedding generation and backfill, purge, index, text statistics, history retention)
        and the change feed's poller."""
        settings = self.settings
        self._spawn("model_generation", REFRESH_SECONDS, self.moves.refresh)
        self._spawn("model_backfill", REFRESH_SECONDS, self.moves.backfill.run)
        text_search = self.search.text_search
        if text_search is not None:  # its first step loads the index when start-up did not
            self._spawn("text_index", settings.text_index_interval, text_search.follow)
        self._spawn("purge", settings.purge_interval, self._purge)
        self._spawn("index_maintenance", settings.index_check_interval, lambda: self.moves.maintain_indexes(self.index))
        self._spawn("text_statistics", settings.text_stats_interval, self.text_stats.maintain)
        self._spawn("history_retention", settings.purge_interval, self.history.purge)
        self._spawn("quota_counts", purge.QUOTA_FOLD_INTERVAL, purge.quota_folder(self.db, self.tokens.quota_grants))
        if self._recall is not None:
            self._recall.start()
        await self.feed.start()

    def _spawn(self, name: str, interval: float, work: Callable[[], Awaitable[object]]) -> None:
        self._tasks.append(asyncio.create_task(loops.every(interval, name, work, self.metrics), name=name))

    async def _purge(self) -> int:
        """Purge expired memories (returning how many) and evict old embedding-cache entries."""
        purged = await purge.purge_expired(self.db, self.metrics, history=self.settings.history_versions)
        await purge.evict_embedding_cache(self.db)
        await purge.fold_scope_counts(self.db)
        return purged

    async def stats(self) -> Stats:
        return await collect(
            self.db,
            self.index,
            embedding_model=self.embedder.model,
            dimension=self.embedder.dimension,
            postgres_version=self.postgres_version,
            pgvector_version=self.pgvector_version,
            iterative_scan=self.search.iterative_scan,
            move=await self.moves.status(),
        )

    def begin_shutdown(self) -> None:
        """Stop work that would otherwise outlive a drain (lease Hold streams, BulkStore streams)."""
        self.stopping.set()
        if self._feed is not None:
            self._feed.begin_shutdown()
        if self._leases is not None:
            self._leases.begin_shutdown()

    async def close(self) -> None:
        """Stop background work, close the embedder, then the pools, then the embedded database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._recall is not None:
            await self._recall.close()
        if self._feed is not None:
            await self._feed.close()
        if self._leases is not None:
            await self._leases.close()  # releases this instance's Hold leases while the pool is still open
        if self._moves is not None:
            await self._moves.close()  # every model's provider
        elif self._embedder is not None:
            await self._embedder.close()
        for db in (self._read_db, self._db):
            if db is not None:
                await db.close()
        await self.place.close()


T = TypeVar("T")


def _started(component: T | None) -> T:
    if component is None:
        raise RuntimeError("the runtime is not started")
    return component
