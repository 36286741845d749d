"""The interface every embedding provider implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt


class EmbeddingProvider(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    name: str
    """Short provider name for metrics and logs (``hash``, ``local``, ``openai``)."""
    semantic: bool
    """Whether its vectors carry meaning (a trained model) or only the words (the hash embedder)."""
    model: str
    dimension: int
    max_batch: int
    """Most texts one provider request may carry."""

    async def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One provider request: ``len(texts) <= max_batch``; returns shape ``(len(texts), dimension)``."""
        ...

    async def close(self) -> None: ...


def normalise_rows(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """L2-normalise each row so cosine similarity is a dot product; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalised: npt.NDArray[np.float32] = (vectors / norms).astype(np.float32, copy=False)
    return normalised
