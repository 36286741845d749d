"""Builds the configured provider; each provider's dependencies are imported only when it is chosen."""

from __future__ import annotations

import logging

from memory_service.config.settings import Settings
from memory_service.embeddings.base import EmbeddingProvider
from memory_service.embeddings.hashing import HashEmbedder
from memory_service.metrics import Metrics

log = logging.getLogger(__name__)

# Weighted hybrid fusion's vector weight when SEARCH_HYBRID_ALPHA is unset (docs/search-quality.md has the runs):
# a semantic model finds what the words miss and earns an equal say; the hash embedder only repeats the words,
# less precisely than BM25, so it breaks ties and catches misspellings without outvoting the text ranking.
SEMANTIC_ALPHA = 0.5
LEXICAL_ALPHA = 0.2


def hybrid_alpha(settings: Settings, provider: EmbeddingProvider) -> float:
    if settings.hybrid_alpha is not None:
        return settings.hybrid_alpha
    return SEMANTIC_ALPHA if provider.semantic else LEXICAL_ALPHA


def create_provider(settings: Settings, metrics: Metrics) -> EmbeddingProvider:
    if settings.embedding_provider == "openai":
        # Imported here: the openai SDK takes longer to import than the rest of the service, and most runs
        # (the CLI, the hash embedder) never need it.
        from memory_service.embeddings.openai_provider import OpenAIEmbedder

        log.info(
            "embedding with %s (%d dimensions) at %s",
            settings.embedding_model,
            settings.embedding_dim,
            settings.openai_base_url or "api.openai.com",
        )
        return OpenAIEmbedder(
            model=settings.embedding_model,
            dimension=settings.embedding_dim,
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            send_dimensions=settings.embedding_dim_explicit,
            max_batch=settings.embedding_batch_size,
            timeout=settings.embedding_timeout,
            max_retries=settings.embedding_max_retries,
            metrics=metrics,
        )
    if settings.embedding_provider == "local":
        from memory_service.embeddings.local_provider import LocalEmbedder, model_directory

        directory = model_directory(settings.embedding_model, settings.embedding_model_path, settings.data_dir)
        log.info(
            "embedding in-process with %s (%d dimensions) from %s on %d threads",
            settings.embedding_model,
            settings.embedding_dim,
            directory,
            settings.embedding_threads,
        )
        return LocalEmbedder(
            model=settings.embedding_model,
            directory=directory,
            dimension=settings.embedding_dim,
            threads=settings.embedding_threads,
            max_batch=min(settings.embedding_batch_size, 64),
        )
    log.info(
        "no embedding provider configured: using the local hash embedder (%s, %d dimensions); it matches words "
        "and word pieces, not meaning. Set EMBEDDING_PROVIDER=local, OPENAI_API_KEY or OPENAI_BASE_URL for "
        "semantic search.",
        settings.embedding_model,
        settings.embedding_dim,
    )
    return HashEmbedder(model=settings.embedding_model, dimension=settings.embedding_dim)
