"""A semantic embedding model run in-process on ONNX Runtime (sentence-transformers models such as all-MiniLM-L6-v2).

The model is a directory holding an ONNX export (``model.onnx`` or ``onnx/model.onnx``) and its ``tokenizer.json``:
either ``EMBEDDING_MODEL_PATH``, or a copy downloaded once by model name from the Hugging Face hub into the data
directory. Inference runs on one worker thread (ONNX Runtime releases the GIL), so the event loop keeps serving
while a batch is embedded and two batches never compete for the same cores.

Needs the ``local`` extra: ``pip install 'memory-service[local]'``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memory_service.embeddings.base import normalise_rows
from memory_service.errors import StartupError

log = logging.getLogger(__name__)

# Texts per ONNX run: padding is to the longest text of a run, so texts are sorted by length and run in small
# groups; a long text then pads only its own group.
_RUN_SIZE = 16
_DEFAULT_MAX_TOKENS = 256
_ONNX_FILES = ("model.onnx", "onnx/model.onnx")
_DOWNLOAD_PATTERNS = ["*.json", "*.txt", "onnx/model.onnx", "1_Pooling/*"]


def _import_runtime() -> tuple[Any, Any]:
    try:
        import onnxruntime
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise StartupError(
            "EMBEDDING_PROVIDER=local needs onnxruntime and tokenizers: pip install 'memory-service[local]'"
        ) from exc
    return onnxruntime, Tokenizer


def model_directory(model: str, model_path: Path | None, data_dir: Path) -> Path:
    """The directory to load: ``model_path`` as given, or a download of ``model`` kept under ``data_dir``."""
    if model_path is not None:
        return model_path
    target = data_dir / "models" / model.replace("/", "--")
    if _onnx_file(target) is not None and (target / "tokenizer.json").is_file():
        return target
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise StartupError(
            "EMBEDDING_PROVIDER=local downloads models with huggingface_hub: pip install 'memory-service[local]', "
            "or set EMBEDDING_MODEL_PATH to a model directory"
        ) from exc
    log.info("downloading embedding model %s into %s", model, target)
    try:
        snapshot_download(repo_id=model, local_dir=target, allow_patterns=_DOWNLOAD_PATTERNS)
    except Exception as exc:
        raise StartupError(
            f"could not download embedding model {model!r} ({type(exc).__name__}: {exc}); "
            "set EMBEDDING_MODEL_PATH to a local copy of it"
        ) from exc
    return target


def _onnx_file(directory: Path) -> Path | None:
    for name in _ONNX_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


class LocalEmbedder:
    name = "local"
    semantic = True

    def __init__(self, *, model: str, directory: Path, dimension: int, threads: int, max_batch: int = 64) -> None:
        onnxruntime, tokenizer_class = _import_runtime()
        onnx_file = _onnx_file(directory)
        if onnx_file is None or not (directory / "tokenizer.json").is_file():
            raise StartupError(
                f"{directory} is expected to hold model.onnx (or onnx/model.onnx) and tokenizer.json "
                "of a sentence-transformers model"
            )
        self.model = model
        self.dimension = dimension
        self.max_batch = max_batch
        self._max_tokens = self._token_limit(directory)
        self._mean_pooling = not _read_json(directory / "1_Pooling" / "config.json").get("pooling_mode_cls_token")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = tokenizer_class.from_file(str(directory / "tokenizer.json"))
        # The upstream tokenizer.json may pin truncation and fixed-length padding (all-MiniLM: 128); the model's
        # own limit and padding to the longest text of a run are what sentence-transformers uses.
        padding = self._tokenizer.padding or {}
        self._tokenizer.enable_truncation(self._max_tokens)
        self._tokenizer.enable_padding(pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]"))
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-embedder")
        produced = self.embed_now(["dimension probe"]).shape[1]
        if produced != dimension:
            raise StartupError(
                f"EMBEDDING_DIM is {dimension} but {model} produces {produced}-dimensional vectors; "
                f"set EMBEDDING_DIM={produced}"
            )

    @staticmethod
    def _token_limit(directory: Path) -> int:
        configured = _read_json(directory / "sentence_bert_config.json").get("max_seq_length")
        if configured is None:
            configured = _read_json(directory / "tokenizer_config.json").get("model_max_length", _DEFAULT_MAX_TOKENS)
        # Some configs say "unlimited" with a huge number; BERT-class position tables stop at 512.
        return int(min(configured, 512))

    async def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.embed_now, list(texts))

    def embed_now(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), 0), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), _RUN_SIZE):
            run = order[start : start + _RUN_SIZE]
            vectors = self._run([texts[i] for i in run])
            if out.shape[1] == 0:
                out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            out[run] = vectors
        return normalise_rows(out)

    def _run(self, texts: list[str]) -> npt.NDArray[np.float32]:
        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        output = np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
        if output.ndim == 2:  # an export that pools inside the graph
            return output
        if not self._mean_pooling:
            return output[:, 0, :]
        weights = mask[:, :, None].astype(np.float32)
        pooled: npt.NDArray[np.float32] = (output * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled

    async def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
