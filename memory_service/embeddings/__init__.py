"""Embedding providers behind one small interface, and the cache in front of them."""

from memory_service.embeddings.base import EmbeddingProvider
from memory_service.embeddings.factory import create_provider

__all__ = ["EmbeddingProvider", "create_provider"]
