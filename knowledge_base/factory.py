"""Assemble a ready ``KnowledgeBase`` from its ``KnowledgeBaseConfig``: corpus, text processing, embedder, backend."""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import numpy as np

from knowledge_base.config import KnowledgeBaseConfig
from knowledge_base.embedder import Embedder
from knowledge_base.loader import Corpus, CorpusError, load_corpus
from knowledge_base.search import Calibration, KnowledgeBase
from knowledge_base.text import TextProcessor

log = logging.getLogger(__name__)


def open_knowledge_base(
    config: KnowledgeBaseConfig,
    *,
    embedder: Embedder | None = None,
    progress: Callable[[int, int], None] | None = None,
    corpus: Corpus | None = None,
    reuse: Mapping[str, np.ndarray] | None = None,
    text: TextProcessor | None = None,
) -> KnowledgeBase:
    """``embedder``: one already loaded (a reload keeps the model); ``progress(done, total)`` while encoding.

    ``corpus``: serve this corpus instead of the data files (the records published in the hub's database);
    ``reuse``: vectors known by text (``embedded.known_vectors``), so only new texts are encoded;
    ``text``: the running knowledge base's text processor, whose memo of normalised texts is reused."""
    if not isinstance(config, KnowledgeBaseConfig):  # e.g. the hub's Settings, as before issue 16
        raise TypeError(f"open_knowledge_base takes a KnowledgeBaseConfig (Settings.knowledge_base_config()), "
                        f"not {type(config).__name__}")
    where = config.data_dir if corpus is None else "the published records"
    corpus = load_corpus(config.data_dir) if corpus is None else corpus
    if corpus.errors:
        listing = "\n".join(f"  {p}" for p in corpus.errors[:20])
        raise CorpusError(f"{len(corpus.errors)} problem(s) in {where}:\n{listing}")
    if where == config.data_dir:
        for problem in corpus.problems:
            log.warning("%s", problem)
    elif corpus.problems:  # a publication: the console lists each record's problems; the log says how many
        log.warning("%d reminder(s) in the published records (not served differently): e.g. %s",
                    len(corpus.problems), corpus.problems[0])
    text = text or TextProcessor()
    # One inference thread: under concurrent chats, parallel requests use the cores better than
    # torch's intra-op threads fighting over them.
    embedder = embedder or Embedder.from_config(config)
    if reuse:
        from knowledge_base.embedded import encode_corpus

        encode_corpus(corpus, embedder, config.index_dir, progress=progress, reuse=reuse)  # both backends then find it cached
        if config.backend == "elasticsearch":
            encode_corpus(corpus, embedder, config.index_dir / "es-vectors", reuse=reuse)
    if config.backend == "elasticsearch":
        from knowledge_base.elasticsearch_backend import ElasticsearchBackend

        backend = ElasticsearchBackend.from_config(config, corpus, text, embedder)
    else:
        from knowledge_base.embedded import build_embedded_backend

        backend = build_embedded_backend(corpus, text, embedder, config.index_dir, progress=progress)
    kb = KnowledgeBase(
        corpus,
        backend,
        text,
        abstain_threshold=config.abstain_threshold,
        top_k=config.top_k,
        default_region=config.default_region,
        calibration=Calibration(dense_mid=config.confidence_midpoint),
        embedder=embedder,
    )
    attach_answerer(kb, config.index_dir)
    return kb


def attach_answerer(kb: KnowledgeBase, index_dir) -> None:
    """The answer stage needs a vector per unit row: the embedded index's own, or the same cache for ES."""
    from knowledge_base.answers import Answerer, UnitIndex
    from knowledge_base.embedded import encode_corpus
    from knowledge_base.unit_classifier import UnitClassifier
    from knowledge_base.units import layout

    vectors, _owners, _ = encode_corpus(kb.corpus, kb.embedder, index_dir)
    kb.answerer = Answerer(kb, UnitIndex(layout(kb.corpus), vectors, kb.text), classifier=UnitClassifier.load())
