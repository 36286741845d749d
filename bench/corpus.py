"""The shape every benchmark corpus takes, synthetic (``bench.datasets``) or real (``bench.minilm``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass
class Corpus:
    vectors: npt.NDArray[np.float32]
    texts: list[str]
    topics: npt.NDArray[np.int64]
    scope_ids: npt.NDArray[np.int64]
    importance: npt.NDArray[np.float32]
    """Uniform in [0, 1): ``min_importance = 0.99`` keeps about 1% of the rows, with no index to help."""
    centres: npt.NDArray[np.float32]
    vocabulary: list[list[str]]
    noise: float = 0.6
    """The rows' noise, which queries drawn from this corpus get too (``queries``)."""
    query_vectors: npt.NDArray[np.float32] | None = None
    """Queries that come with the data (real ones, for ``minilm``); None: ``queries`` draws them."""
    query_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)
