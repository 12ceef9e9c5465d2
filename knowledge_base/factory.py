"""Assemble a ready ``KnowledgeBase`` from the settings: corpus, text processing, embedder, backend."""

from __future__ import annotations

import logging
from typing import Callable

from knowledge_base.embedder import Embedder
from knowledge_base.loader import CorpusError, load_corpus
from knowledge_base.search import Calibration, KnowledgeBase
from knowledge_base.text import TextProcessor
from xiaozhi.settings import Settings

log = logging.getLogger(__name__)


def open_knowledge_base(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KnowledgeBase:
    corpus = load_corpus(settings.kb_data_dir)
    if corpus.errors:
        listing = "\n".join(f"  {p}" for p in corpus.errors[:20])
        raise CorpusError(f"{len(corpus.errors)} problem(s) in {settings.kb_data_dir}:\n{listing}")
    for problem in corpus.problems:
        log.warning("%s", problem)
    text = TextProcessor()
    # One inference thread: under concurrent chats, parallel requests use the cores better than
    # torch's intra-op threads fighting over them.
    embedder = embedder or Embedder(
        settings.effective_embedding_model, prefix=settings.embedding_query_prefix, threads=settings.embedding_threads
    )
    if settings.kb_backend == "elasticsearch":
        from knowledge_base.elasticsearch_backend import ElasticsearchBackend

        backend = ElasticsearchBackend.from_settings(settings, corpus, text, embedder)
    else:
        from knowledge_base.embedded import build_embedded_backend

        backend = build_embedded_backend(corpus, text, embedder, settings.kb_index_dir, progress=progress)
    kb = KnowledgeBase(
        corpus,
        backend,
        text,
        abstain_threshold=settings.kb_abstain_threshold,
        top_k=settings.kb_top_k,
        default_region=settings.default_region,
        calibration=Calibration(dense_mid=settings.kb_confidence_midpoint),
        embedder=embedder,
    )
    attach_answerer(kb, settings.kb_index_dir)
    return kb


def attach_answerer(kb: KnowledgeBase, index_dir) -> None:
    """The answer stage needs a vector per unit row: the embedded index's own, or the same cache for ES."""
    from knowledge_base.answers import Answerer, UnitIndex
    from knowledge_base.embedded import encode_corpus
    from knowledge_base.units import layout

    vectors, _owners, _ = encode_corpus(kb.corpus, kb.embedder, index_dir)
    kb.answerer = Answerer(kb, UnitIndex(layout(kb.corpus), vectors, kb.text))
