"""About 100k real all-MiniLM-L6-v2 vectors: sentence-level pieces of the SciFact corpus, embedded once and cached.

Synthetic clusters say little about how an ivfflat index does on real embeddings, and SciFact's 5,183 abstracts
are too few rows to measure a 100k-row table. Cut into titles, single sentences and two-sentence windows (and
three-sentence windows for the last 10%), they give about 100k texts of natural language whose vectors overlap
the way real memories do (a window shares a sentence with its neighbours, sentences of one abstract share a
topic).

    python -m bench.minilm --limit 2000     # time the model on this machine first
    python -m bench.minilm                  # embed every piece into the cache (minutes: ~200 short texts/s)

The vectors come from the project's own local provider (``memory_service.embeddings.local_provider``) with the
model in ``../shared/models/all-MiniLM-L6-v2``, so they are the vectors the service itself would store. They are
written to ``~/.cache/memory-service-bench/`` (``BENCH_CACHE_DIR`` overrides it), in chunks, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.corpus import Corpus
from memory_service.embeddings.local_provider import LocalEmbedder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "all-MiniLM-L6-v2"
CACHE_NAME = "scifact-pieces-all-MiniLM-L6-v2-v1.npz"
# Pieces embedded per cached chunk: a few seconds of work lost at most when a run is interrupted.
_CHUNK = 4096
# A sentence ends at . ! or ? followed by space and a capital or digit ("e.g. the" does not split).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_MIN_PIECE_CHARS = 20
# Pieces kept out of every corpus and used as queries, beside the 300 SciFact claims: queries near the data that
# are not stored rows themselves.
HELD_OUT = 200
TARGET_PIECES = 100_000 + HELD_OUT


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "memory-service-bench"))


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def pieces(data: Path = DATA) -> list[str]:
    """Every title, sentence and two-sentence window of the corpus, in corpus order, without duplicates; then
    three-sentence windows until there are ``TARGET_PIECES``.

    Later pieces are only ever appended, so a cache of an earlier list is a prefix of this one and is extended,
    not recomputed."""
    seen: set[str] = set()
    out: list[str] = []

    def add(text: str) -> None:
        text = " ".join(text.split())
        if len(text) >= _MIN_PIECE_CHARS and text not in seen:
            seen.add(text)
            out.append(text)

    documents: list[list[str]] = []
    with (data / "corpus.jsonl").open() as handle:
        for line in handle:
            doc = json.loads(line)
            add(doc["title"])
            sentences = [s for s in _SENTENCE_END.split(doc["text"]) if s.strip()]
            documents.append(sentences)
            for sentence in sentences:
                add(sentence)
            for a, b in itertools.pairwise(sentences):
                add(a + " " + b)
    for sentences in documents:
        for start in range(len(sentences) - 2):
            if len(out) >= TARGET_PIECES:
                return out
            add(" ".join(sentences[start : start + 3]))
    return out


def scifact_queries(data: Path = DATA) -> tuple[npt.NDArray[np.float32], list[str]]:
    """The 300 SciFact test claims: their published MiniLM vectors and their texts."""
    stored = np.load(data / "all-MiniLM-L6-v2.npz")
    texts = {}
    with (data / "queries.jsonl").open() as handle:
        for line in handle:
            query = json.loads(line)
            texts[query["_id"]] = query["text"]
    ids = [str(i) for i in stored["query_ids"]]
    return stored["query_vectors"].astype(np.float32), [texts[i] for i in ids]


def embed(
    texts: list[str],
    *,
    threads: int = 1,
    partial: Path | None = None,
    prefix: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Vectors of ``texts``, ``_CHUNK`` at a time; ``prefix`` holds those of the first texts already, and with
    ``partial`` the chunks an interrupted run finished are reused."""
    embedder = LocalEmbedder(model="all-MiniLM-L6-v2", directory=MODEL, dimension=384, threads=threads)
    done: list[npt.NDArray[np.float32]] = [] if prefix is None else [prefix]
    if partial is not None and partial.exists():
        with np.load(partial) as stored:
            if stored["count"] == len(texts):
                done = [stored["vectors"][i : i + _CHUNK] for i in range(0, len(stored["vectors"]), _CHUNK)]
    started, start_row = time.perf_counter(), sum(len(c) for c in done)
    for begin in range(start_row, len(texts), _CHUNK):
        done.append(embedder.embed_now(texts[begin : begin + _CHUNK]))
        finished = begin + len(done[-1])
        rate = (finished - start_row) / (time.perf_counter() - started)
        print(f"  embedded {finished}/{len(texts)} pieces ({rate:.0f}/s)", flush=True)
        if partial is not None:
            _save(partial, vectors=np.concatenate(done), count=np.int64(len(texts)))
    return np.concatenate(done).astype(np.float32)


def _save(path: Path, **arrays: object) -> None:
    """Write-then-rename, so a cache file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)  # type: ignore[arg-type]
    temporary.replace(path)


def load() -> tuple[npt.NDArray[np.float32], list[str]]:
    """The cached vectors and their texts; raises FileNotFoundError (with the command) when not built yet."""
    path = cache_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist yet: build it once with `python -m bench.minilm`")
    with np.load(path) as stored:
        texts = stored["texts"]
        if texts.dtype.kind == "U":  # the first caches: a fixed-width array, four bytes per character of the longest
            return stored["vectors"].astype(np.float32), [str(t) for t in texts]
        return stored["vectors"].astype(np.float32), texts.tobytes().decode().split("\n")


def available_rows() -> int:
    """How many rows ``scifact_corpus`` can give (0 before the cache is built)."""
    if not cache_path().exists():
        return 0
    with np.load(cache_path()) as stored:
        return len(stored["vectors"]) - HELD_OUT


def scifact_corpus(rows: int, *, scopes: int = 100, seed: int = 7) -> Corpus:
    """``rows`` pieces drawn at random (``scope_id = row % scopes``), with 500 queries: the SciFact claims and the
    held-out pieces, mixed, so any prefix of them has both kinds."""
    vectors, texts = load()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    held, kept = order[:HELD_OUT], order[HELD_OUT:]
    if rows > len(kept):
        raise ValueError(f"the minilm corpus has {len(kept)} rows, fewer than {rows}")
    kept = kept[:rows]
    claim_vectors, claim_texts = scifact_queries()
    query_vectors = np.concatenate([claim_vectors, vectors[held]])
    query_texts = claim_texts + [texts[i] for i in held]
    mixed = rng.permutation(len(query_texts))
    return Corpus(
        vectors=vectors[kept],
        texts=[texts[i] for i in kept],
        topics=np.zeros(rows, dtype=np.int64),
        scope_ids=np.arange(rows, dtype=np.int64) % scopes,
        importance=rng.uniform(0, 1, size=rows).astype(np.float32),
        centres=np.zeros((0, vectors.shape[1]), dtype=np.float32),
        vocabulary=[],
        query_vectors=query_vectors[mixed],
        query_texts=[query_texts[i] for i in mixed],
    )


def build(*, threads: int = 1) -> Path:
    texts = pieces()
    prefix = None
    if cache_path().exists():
        vectors, cached = load()
        if cached == texts:
            return cache_path()
        if cached == texts[: len(cached)]:
            prefix = vectors
    print(f"{len(texts)} pieces of SciFact, {0 if prefix is None else len(prefix)} embedded already", flush=True)
    partial = cache_dir() / (CACHE_NAME + ".partial.npz")
    vectors = embed(texts, threads=threads, partial=partial, prefix=prefix)
    # One UTF-8 buffer, newline-separated (pieces have their whitespace collapsed, so hold no newline).
    _save(cache_path(), vectors=vectors, texts=np.frombuffer("\n".join(texts).encode(), dtype=np.uint8))
    partial.unlink(missing_ok=True)
    return cache_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="only time the model on this many pieces; nothing is cached")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (the machine is shared)")
    args = parser.parse_args()
    if args.limit:
        texts = pieces()[: args.limit]
        started = time.perf_counter()
        embed(texts, threads=args.threads)
        print(f"{len(texts)} pieces in {time.perf_counter() - started:.1f}s")
        return
    print(f"cached in {build(threads=args.threads)}")


if __name__ == "__main__":
    main()
