"""Embeddings from any OpenAI-compatible server (OpenAI, Ollama, vLLM, text-embeddings-inference).

Retries are ours rather than the SDK's, so each attempt is counted in metrics and the backoff honours the
server's Retry-After within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import openai

from memory_service.embeddings.base import normalise_rows
from memory_service.errors import EmbeddingUnavailable, FailedPrecondition
from memory_service.metrics import Metrics

log = logging.getLogger(__name__)

_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)
_MAX_BACKOFF = 10.0


class OpenAIEmbedder:
    name = "openai"
    semantic = True

    def __init__(
        self,
        *,
        model: str,
        dimension: int,
        api_key: str | None,
        base_url: str | None,
        send_dimensions: bool,
        max_batch: int,
        timeout: float,
        max_retries: int,
        metrics: Metrics,
        backoff_base: float = 0.25,
    ) -> None:
        self.model = model
        self.dimension = dimension
        self.max_batch = max_batch
        self._send_dimensions = send_dimensions
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._metrics = metrics
        # Local servers (Ollama, TEI) need no key, but the SDK insists on one.
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused", base_url=base_url, timeout=timeout, max_retries=0
        )

    async def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                if self._send_dimensions:
                    response = await self._client.embeddings.create(
                        model=self.model, input=list(texts), encoding_format="float", dimensions=self.dimension
                    )
                else:
                    response = await self._client.embeddings.create(
                        model=self.model, input=list(texts), encoding_format="float"
                    )
            except _RETRYABLE as exc:
                self._observe(started, "retryable_error")
                if attempt >= self._max_retries:
                    raise EmbeddingUnavailable(
                        f"embedding provider unavailable after {attempt + 1} attempts: {_describe(exc)}"
                    ) from exc
                delay = self._backoff(attempt, exc)
                log.warning("embedding request failed (%s); retrying in %.2fs", _describe(exc), delay)
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except openai.APIStatusError as exc:
                self._observe(started, "refused")
                raise FailedPrecondition(f"embedding provider refused the request: {_describe(exc)}") from exc
            self._observe(started, "ok")
            return self._to_array(response, len(texts))

    def _observe(self, started: float, outcome: str) -> None:
        self._metrics.embedding_requests.labels(self.name, outcome).inc()
        self._metrics.embedding_latency.labels(self.name).observe(time.perf_counter() - started)

    def _backoff(self, attempt: int, exc: Exception) -> float:
        retry_after = None
        if isinstance(exc, openai.APIStatusError):
            header: str | None = exc.response.headers.get("retry-after")
            try:
                retry_after = float(header) if header is not None else None
            except ValueError:
                retry_after = None
        if retry_after is not None:
            return min(max(retry_after, 0.0), _MAX_BACKOFF)
        delay: float = self._backoff_base * (2**attempt) * (0.5 + random.random())
        return min(delay, _MAX_BACKOFF)

    def _to_array(self, response: openai.types.CreateEmbeddingResponse, expected: int) -> npt.NDArray[np.float32]:
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != expected:
            raise EmbeddingUnavailable(f"embedding provider returned {len(data)} vectors for {expected} texts")
        vectors = np.asarray([item.embedding for item in data], dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            got = vectors.shape[1] if vectors.ndim == 2 else "ragged"
            raise FailedPrecondition(
                f"embedding model {self.model} returned vectors of dimension {got}, "
                f"but EMBEDDING_DIM is {self.dimension}"
            )
        if not np.isfinite(vectors).all():
            raise EmbeddingUnavailable("embedding provider returned non-finite values")
        return normalise_rows(vectors)

    async def close(self) -> None:
        await self._client.close()


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")
