"""A local embedder with no network and no model: signed feature hashing of word and character n-grams.

It is lexical, not semantic: texts that share words and word pieces land close together, synonyms do not. It is
the default so the service works out of the box; configure an OpenAI-compatible provider for semantic search.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from memory_service.embeddings.base import normalise_rows

_WORD = re.compile(r"\w+", re.UNICODE)
_NO_CONTENT = "\x00empty"
# Batches larger than this are hashed in a worker thread so the event loop keeps serving other calls.
_INLINE_BATCH = 16


class HashEmbedder:
    name = "hash"
    semantic = False

    def __init__(self, *, model: str, dimension: int, max_batch: int = 512) -> None:
        self.model = model
        self.dimension = dimension
        self.max_batch = max_batch

    async def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if len(texts) <= _INLINE_BATCH:
            return self.embed_now(texts)
        return await asyncio.to_thread(self.embed_now, texts)

    def embed_now(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            self._accumulate(out[row], text)
            if not out[row].any():
                # Features that all cancel out (vanishingly rare): fall back to the fixed direction.
                self._accumulate(out[row], _NO_CONTENT)
        return normalise_rows(out)

    def _accumulate(self, row: npt.NDArray[np.float32], text: str) -> None:
        words = _WORD.findall(text.lower())
        if not words:
            # Emoji and punctuation carry no word characters; their symbols are the only content there is, and a
            # text of nothing but spaces still gets one fixed direction. A zero vector would have no cosine.
            words = [ch for ch in text if not ch.isspace()] or [_NO_CONTENT]
        features: list[tuple[bytes, float]] = []
        for word in words:
            features.append((b"w:" + word.encode(), 1.0))
            padded = f"<{word}>".encode()
            # Character trigrams let "deploy" and "deployment" share most of their features.
            features.extend((b"c:" + padded[i : i + 3], 0.5) for i in range(max(1, len(padded) - 2)))
        features.extend((f"b:{a} {b}".encode(), 0.7) for a, b in itertools.pairwise(words))
        dim = self.dimension
        for feature, weight in features:
            digest = zlib.crc32(feature)
            # The low bits pick the bucket, the top bit the sign, so collisions cancel out on average.
            row[digest % dim] += weight if digest & 0x80000000 else -weight

    async def close(self) -> None:
        return None
