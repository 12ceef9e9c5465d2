"""What the knowledge base needs to be opened: data, caches, embedding model, ranking, backend.

The knowledge base reads no environment and imports nothing of the hub: whoever opens it hands it a
``KnowledgeBaseConfig`` (the hub builds it from its settings in one place,
``xiaozhi.settings.Settings.knowledge_base_config``). docs/architecture.md#boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("embedded", "elasticsearch")


@dataclass(frozen=True)
class ElasticsearchConfig:
    """An Elasticsearch 8.x cluster and the alias the knowledge base searches (the production backend)."""

    url: str
    index: str
    analyzer: str
    timeout_s: float
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # instead of user name and password
    ca_certs: Path | None = None  # CA bundle of the cluster's TLS certificate


@dataclass(frozen=True)
class KnowledgeBaseConfig:
    """Everything ``open_knowledge_base`` reads.

    data_dir: the YAML entries (docs/knowledge-base.md).
    index_dir: vectors and index generations, shared by checkouts (``<cache>/kb-index``).
    embedding_model: a SentenceTransformer path or name.
    embedding_query_prefix: put before every text (e5 wants ``"query: "``).
    embedding_threads: inference threads for query embedding.
    embedding_backend: ``auto``, ``onnx`` or ``torch`` (knowledge_base/embedder.py).
    backend: ``embedded`` (tantivy BM25 + exact kNN) or ``elasticsearch`` (then ``elasticsearch`` is required).
    abstain_threshold: below this confidence (0..1) a search abstains.
    confidence_midpoint: dense similarity at which confidence is 0.5.
    top_k: how many ranked entries a search returns.
    default_region: GB/T 2260 code used when a query names none ("": national only).
    """

    data_dir: Path
    index_dir: Path
    embedding_model: str
    embedding_query_prefix: str
    embedding_threads: int
    backend: str
    abstain_threshold: float
    confidence_midpoint: float
    top_k: int
    default_region: str
    elasticsearch: ElasticsearchConfig | None = None
    embedding_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"knowledge-base backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.backend == "elasticsearch" and self.elasticsearch is None:
            raise ValueError("the elasticsearch backend needs an ElasticsearchConfig (the cluster's URL and alias)")
