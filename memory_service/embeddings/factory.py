"""Builds the configured provider."""

from __future__ import annotations

import logging

from memory_service.config import Settings
from memory_service.embeddings.base import EmbeddingProvider
from memory_service.embeddings.hashing import HashEmbedder
from memory_service.metrics import Metrics

log = logging.getLogger(__name__)


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
    log.info(
        "no embedding provider configured: using the local hash embedder (%s, %d dimensions); it matches words "
        "and word pieces, not meaning. Set OPENAI_API_KEY or OPENAI_BASE_URL for semantic search.",
        settings.embedding_model,
        settings.embedding_dim,
    )
    return HashEmbedder(model=settings.embedding_model, dimension=settings.embedding_dim)
