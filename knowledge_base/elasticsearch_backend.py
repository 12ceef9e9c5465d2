"""The production search backend: the same ``rank`` as the embedded engine, served by Elasticsearch 8.x.

Layout of the index (one concrete index ``<alias>-<corpus fingerprint>-<UTC time>`` behind the
alias named by ``XIAOZHI_ES_INDEX``):

* **One document per question variant.** An entry is asked in several ways (its title and each
  of ``questions``); the embedded backend keeps one vector per variant and takes the best one.
  Elasticsearch 8.x can hold several vectors per document only as nested objects, and nested
  kNN with a ``knn.filter`` on the parent, ``inner_hits`` and version-dependent score modes is
  awkward; a flat document per variant works on every 8.x from 8.4 on. Document ``<id>~0`` is
  the entry document (title vector plus every text field); ``<id>~1..n`` carry only the vector of
  question *n* and the keyword fields. The kNN search over-fetches ``depth * most variants``
  documents and the application keeps the best variant of each entry, exactly as the embedded
  backend does.
* **Lexical fields.** ``words``/``chars``/``pinyin``/``answer_words`` hold the token streams the
  embedded backend indexes, produced by the same ``TextProcessor`` and analysed by the built-in
  ``whitespace`` analyser, so tokenisation is identical across backends and no Chinese plugin is
  needed for ranking. ``title``/``questions``/``answer`` hold the raw Chinese with the configured
  analyser (``ik_max_word`` searched with ``ik_smart``, ``smartcn`` or ``cjk``); they serve
  operators (Kibana, ad-hoc queries) and, when ``analysed_weight > 0``, join the lexical ranker.
  Only entry documents have text fields, so variant documents do not skew BM25 statistics.
* **Vectors** are ``dense_vector`` with cosine similarity, indexed as plain ``hnsw`` (float) rather
  than the 8.14+ default ``int8_hnsw``: the answer/abstain calibration in ``search.py`` works on raw
  cosines, and int8 quantisation moves them by more than its slope tolerates. Elasticsearch
  reports a cosine kNN score as ``(1 + cos) / 2``; ``rank`` turns it back into the cosine.

Fusion stays in the application (``KnowledgeBase`` does reciprocal-rank fusion), so no paid RRF
licence is needed; the three rankers go to the cluster as one ``_msearch`` round trip. Region
restriction is a ``terms`` filter on ``entry_id`` applied in the BM25 queries and inside
``knn.filter`` (so kNN finds the k best *allowed* documents, not k documents later thinned out).

Reindexing never interrupts searches: a new concrete index is built and refreshed beside the live
one, then the alias moves in one atomic ``_aliases`` call, then the old index is deleted. The
index mapping's ``_meta`` records the corpus fingerprint and embedding model, so a restart with the
same data and model reuses the live index.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
from elasticsearch import (
    ApiError,
    AuthenticationException,
    AuthorizationException,
    Elasticsearch,
    NotFoundError,
    TransportError,
)
from elasticsearch import (
    ConnectionError as EsConnectionError,
)
from elasticsearch.helpers import BulkIndexError, bulk

from knowledge_base.embedded import asked_by_points, encode_corpus, entry_texts, lexical_documents, mark_current
from knowledge_base.config import KnowledgeBaseConfig
from knowledge_base.units import layout
from knowledge_base.embedder import Embedder
from knowledge_base.loader import Corpus
from knowledge_base.schema import Entry
from knowledge_base.search import Query, Rankings
from knowledge_base.text import TextProcessor

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when the mapping or the documents change: forces a reindex
# Same field weights as the embedded backend's lexical ranker.
_LEXICAL_FIELDS = (("words", "words", 1.0), ("chars", "chars", 0.5), ("answer_words", "words", 0.3))
# Index-time analyser -> search-time analyser (IK indexes fine-grained, searches coarse).
_SEARCH_ANALYZER = {"ik_max_word": "ik_smart"}
_MAX_KNN_CANDIDATES = 10_000  # Elasticsearch's limit on num_candidates (and k)


class KnowledgeBaseUnavailable(RuntimeError):
    """The Elasticsearch cluster cannot serve the knowledge base; the message says what to do."""


class ElasticsearchBackend:
    """``SearchBackend`` over an Elasticsearch 8.x alias. Build it with ``from_config`` (or ``open``)."""

    def __init__(
        self,
        client: Elasticsearch,
        alias: str,
        corpus: Corpus,
        text: TextProcessor,
        embedder: Embedder,
        *,
        analyzer: str = "cjk",
        shards: int = 1,
        replicas: int | None = None,
        analysed_weight: float = 0.0,
        vector_cache_dir: Path | None = None,
        bulk_chunk: int = 500,
        bulk_timeout_s: float = 120.0,
        url: str = "",
        on_swap: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.alias = alias
        self.text = text
        self.embedder = embedder
        self.analyzer = analyzer
        self.shards = shards
        self.replicas = replicas
        self.analysed_weight = analysed_weight
        self.vector_cache_dir = vector_cache_dir
        self.bulk_chunk = bulk_chunk
        self.bulk_timeout_s = bulk_timeout_s
        self.url = url or "the Elasticsearch cluster"
        self.on_swap = on_swap  # called with the new index name once the alias has moved
        self._set_corpus(corpus)

    def _set_corpus(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self._ids = frozenset(e.id for e in corpus.entries)
        self._max_variants = max((len(entry_texts(e)) for e in corpus.entries), default=1)

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def make_client(
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        timeout_s: float = 10.0,
    ) -> Elasticsearch:
        kwargs: dict[str, Any] = {"request_timeout": timeout_s, "max_retries": 2, "retry_on_timeout": True}
        if api_key:
            kwargs["api_key"] = api_key
        elif username:
            kwargs["basic_auth"] = (username, password or "")
        if ca_certs:
            kwargs["ca_certs"] = ca_certs
        return Elasticsearch(url, **kwargs)

    @classmethod
    def from_config(
        cls,
        config: KnowledgeBaseConfig,
        corpus: Corpus,
        text: TextProcessor,
        embedder: Embedder,
        *,
        progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> "ElasticsearchBackend":
        """Connect to ``config.elasticsearch``; reuse the alias if it holds this corpus, else reindex."""
        es = config.elasticsearch
        if es is None:
            raise ValueError("config.elasticsearch is not set: no cluster to connect to")
        client = cls.make_client(
            es.url,
            username=es.username,
            password=es.password,
            api_key=es.api_key,
            ca_certs=str(es.ca_certs) if es.ca_certs else None,
            timeout_s=es.timeout_s,
        )
        index_dir = Path(config.index_dir)
        # Vectors are cached apart from the embedded backend's generations, and the hub's reload
        # marker (index_dir/CURRENT) moves only after the alias has: a hub that reloads on it
        # then finds the alias current instead of starting a second reindex.
        kwargs.setdefault("vector_cache_dir", index_dir / "es-vectors")
        kwargs.setdefault("on_swap", lambda name: mark_current(index_dir, name))
        backend = cls(client, es.index, corpus, text, embedder, analyzer=es.analyzer, url=es.url, **kwargs)
        backend.ensure_index(progress=progress)
        return backend

    # -- identity of what the index holds ---------------------------------------------------------
    @property
    def embedding_fingerprint(self) -> str:
        return self.embedder.fingerprint

    def expected_meta(self, corpus: Corpus | None = None) -> dict[str, Any]:
        corpus = corpus or self.corpus
        return {
            "app": "xiaozhi-kb",
            "schema_version": SCHEMA_VERSION,
            "corpus_fingerprint": corpus.fingerprint,
            "embedding_model": self.embedder.model_name,
            "embedding_fingerprint": self.embedding_fingerprint,
            "dims": self.embedder.dimension,
            "analyzer": self.analyzer,
        }

    _IDENTITY = ("schema_version", "corpus_fingerprint", "embedding_fingerprint", "dims", "analyzer")

    def current_indices(self) -> list[str]:
        """The concrete indices the alias points at (normally one)."""
        try:
            return sorted(self._call(lambda: self.client.indices.get_alias(name=self.alias)).body)
        except NotFoundError:
            return []

    def index_meta(self, index: str) -> dict[str, Any]:
        mapping = self._call(lambda: self.client.indices.get_mapping(index=index)).body
        return (mapping.get(index, {}).get("mappings") or {}).get("_meta") or {}

    def is_current(self) -> bool:
        """True if the alias points at exactly one index built from this corpus, model and analyser."""
        indices = self.current_indices()
        if len(indices) != 1:
            return False
        meta = self.index_meta(indices[0])
        want = self.expected_meta()
        return all(meta.get(k) == want[k] for k in self._IDENTITY)

    def ensure_index(self, *, progress: Callable[[int, int], None] | None = None) -> bool:
        """Reindex unless the alias already serves this corpus; returns True if it reindexed."""
        if self.is_current():
            log.info("elasticsearch alias %s already serves corpus %s", self.alias, self.corpus.fingerprint)
            return False
        self.reindex(progress=progress)
        return True

    # -- mapping and documents --------------------------------------------------------------------
    def mapping(self, corpus: Corpus | None = None) -> dict[str, Any]:
        analysed: dict[str, Any] = {"type": "text", "analyzer": self.analyzer}
        if self.analyzer in _SEARCH_ANALYZER:
            analysed["search_analyzer"] = _SEARCH_ANALYZER[self.analyzer]
        tokens = {"type": "text", "analyzer": "whitespace"}
        return {
            "dynamic": "strict",
            "_meta": self.expected_meta(corpus),
            "properties": {
                "entry_id": {"type": "keyword"},
                "topic": {"type": "keyword"},
                "region_code": {"type": "keyword"},
                "kind": {"type": "keyword"},  # "entry" (variant 0, has the text fields) or "variant"
                "variant": {"type": "short"},
                "variant_text": {"type": "text", "index": False},
                "title": dict(analysed),
                "questions": dict(analysed),
                "answer": dict(analysed),
                "words": dict(tokens),
                "chars": dict(tokens),
                "pinyin": dict(tokens),
                "answer_words": dict(tokens),
                "vector": {
                    "type": "dense_vector",
                    "dims": self.embedder.dimension,
                    "index": True,
                    "similarity": "cosine",
                    "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100},
                },
            },
        }

    def index_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number_of_shards": self.shards, "refresh_interval": "-1"}
        if self.replicas is not None:
            out["number_of_replicas"] = self.replicas
        return out

    def _vectors(self, corpus: Corpus, progress) -> np.ndarray:
        """One vector per entry text, in ``entry_texts`` order; cached on disk like the embedded backend's."""
        if self.vector_cache_dir is not None:
            vectors, _owners, _ = encode_corpus(corpus, self.embedder, Path(self.vector_cache_dir), progress=progress)
            rows = layout(corpus)
            return vectors[[i for i, u in enumerate(rows.row_unit) if rows.units[u].kind == "entry"]]
        texts = [t for e in corpus.entries for t in entry_texts(e)]
        if not texts:
            return np.zeros((0, self.embedder.dimension), np.float32)
        return self.embedder.encode(texts)

    def documents(self, index: str, corpus: Corpus, vectors: np.ndarray) -> Iterator[dict[str, Any]]:
        # Knowledge points' ways of asking join their entry's lexical fields, as in the embedded
        # backend; their vectors stay with the answer stage (KnowledgeBase.units), not in the cluster.
        asked_too = asked_by_points(layout(corpus))
        row = 0
        for entry in corpus.entries:
            for variant, variant_text in enumerate(entry_texts(entry)):
                doc: dict[str, Any] = {
                    "_index": index,
                    "_id": f"{entry.id}~{variant}",
                    "entry_id": entry.id,
                    "topic": entry.topic_name,
                    "region_code": entry.region.code,
                    "kind": "entry" if variant == 0 else "variant",
                    "variant": variant,
                    "variant_text": variant_text,
                    "vector": vectors[row].tolist(),
                }
                if variant == 0:
                    doc.update(self._text_fields(entry, asked_too.get(entry.id, ())))
                row += 1
                yield doc

    def _text_fields(self, entry: Entry, asked_too: tuple[str, ...] = ()) -> dict[str, Any]:
        lexical = lexical_documents(entry, self.text, asked_too)
        return {
            "title": entry.title,
            "questions": list(entry.questions),
            "answer": "\n".join([entry.spoken, entry.answer, *entry.steps]),
            "words": lexical["words"],
            "chars": lexical["chars"],
            "pinyin": lexical["pinyin"],
            "answer_words": lexical["answer"],
        }

    # -- reindex through an alias swap ------------------------------------------------------------
    def new_index_name(self, corpus: Corpus) -> str:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S%f")
        return f"{self.alias}-{corpus.fingerprint[:8]}-{stamp}".lower()

    def reindex(self, corpus: Corpus | None = None, *, progress: Callable[[int, int], None] | None = None) -> str:
        """Build a new concrete index, load it, refresh it, move the alias to it atomically, drop the old one.

        Searches keep answering from the old index until the alias moves; if anything fails before
        that, the new index is deleted and the alias is left as it was. Returns the new index name.
        """
        corpus = corpus or self.corpus
        started = time.perf_counter()
        if self._call(lambda: self.client.indices.exists(index=self.alias)) and not self._call(
            lambda: self.client.indices.exists_alias(name=self.alias)
        ):
            raise KnowledgeBaseUnavailable(
                f"{self.alias!r} on {self.url} is a concrete index, not an alias: delete it "
                f"(DELETE /{self.alias}) or set XIAOZHI_ES_INDEX to another name"
            )
        vectors = self._vectors(corpus, progress)
        index = self.new_index_name(corpus)
        try:
            self._call(
                lambda: self.client.indices.create(index=index, mappings=self.mapping(corpus), settings=self.index_settings())
            )
        except ApiError as exc:
            raise KnowledgeBaseUnavailable(self._describe_create_error(exc)) from exc
        try:
            expected = sum(len(entry_texts(e)) for e in corpus.entries)
            loaded, _ = self._call(
                lambda: bulk(
                    self.client.options(request_timeout=self.bulk_timeout_s),
                    self.documents(index, corpus, vectors),
                    chunk_size=self.bulk_chunk,
                    max_retries=2,
                )
            )
            self._call(
                lambda: self.client.indices.put_settings(index=index, settings={"index": {"refresh_interval": None}})
            )
            self._call(lambda: self.client.indices.refresh(index=index))
            count = self._call(lambda: self.client.count(index=index)).body["count"]
            if loaded != expected or count != expected:
                raise KnowledgeBaseUnavailable(
                    f"index {index} holds {count} documents after loading {loaded}; expected {expected}"
                )
            old = self.current_indices()
            actions = [{"remove": {"index": o, "alias": self.alias}} for o in old]
            actions.append({"add": {"index": index, "alias": self.alias}})
            self._call(lambda: self.client.indices.update_aliases(actions=actions))
        except BaseException as exc:
            try:
                self.client.indices.delete(index=index, ignore_unavailable=True)
            except Exception:  # the cluster went away: the operator deletes the leftover by hand
                log.warning("could not delete the unfinished index %s", index)
            if isinstance(exc, BulkIndexError):
                first = exc.errors[0] if exc.errors else {}
                raise KnowledgeBaseUnavailable(
                    f"bulk indexing into {index} failed for {len(exc.errors)} document(s); first: {first}"
                ) from exc
            raise
        self._set_corpus(corpus)  # only now: until the alias moved, searches were on the old data
        if self.on_swap is not None:
            try:
                self.on_swap(index)
            except OSError as exc:
                log.warning("alias moved to %s but the reload marker could not be written: %s", index, exc)
        for o in old:
            try:
                self.client.indices.delete(index=o, ignore_unavailable=True)
            except ApiError as exc:  # the alias has moved already: a leftover costs disk, not answers
                log.warning("could not delete the old index %s: %s", o, exc)
        log.info(
            "elasticsearch: %d documents of %d entries indexed into %s, alias %s moved in %.1f s",
            expected,
            len(corpus.entries),
            index,
            self.alias,
            time.perf_counter() - started,
        )
        return index

    def _describe_create_error(self, exc: ApiError) -> str:
        reason = str(exc)
        if "analyzer" in reason and self.analyzer in reason:
            return (
                f"Elasticsearch at {self.url} has no analyser {self.analyzer!r}: install its plugin on every node "
                f"(analysis-ik for ik_max_word, analysis-smartcn for smartcn) or set XIAOZHI_ES_ANALYZER=cjk. "
                f"({reason})"
            )
        return f"Elasticsearch at {self.url} refused to create the knowledge-base index: {reason}"

    # -- ranking ----------------------------------------------------------------------------------
    def _id_filter(self, allowed: set[str]) -> dict[str, Any] | None:
        """A terms filter on entry_id: the allowed ids, or the excluded ones when those are fewer."""
        permitted = self._ids & allowed
        if len(permitted) == len(self._ids):
            return None
        excluded = self._ids - permitted
        if len(excluded) < len(permitted):
            return {"bool": {"must_not": [{"terms": {"entry_id": sorted(excluded)}}]}}
        return {"terms": {"entry_id": sorted(permitted)}}

    def _lexical_body(self, clauses: list[dict], id_filter: dict | None, depth: int) -> dict[str, Any]:
        filters: list[dict] = [{"term": {"kind": "entry"}}]
        if id_filter is not None:
            filters.append(id_filter)
        return {
            "size": depth,
            "_source": ["entry_id"],
            "track_total_hits": False,
            "query": {"bool": {"should": clauses, "minimum_should_match": 1, "filter": filters}},
        }

    @staticmethod
    def _match(field: str, tokens: list[str], boost: float) -> dict[str, Any] | None:
        unique = list(dict.fromkeys(tokens))  # each token once, as the embedded backend does
        if not unique:
            return None
        return {"match": {field: {"query": " ".join(unique), "analyzer": "whitespace", "boost": boost}}}

    def searches(self, query: Query, allowed: set[str], depth: int) -> dict[str, dict[str, Any]]:
        """The request bodies of the three rankers (named), for ``_msearch``."""
        id_filter = self._id_filter(allowed)
        out: dict[str, dict[str, Any]] = {}
        lexical = []
        for field, stream, boost in _LEXICAL_FIELDS:
            clause = self._match(field, query.char_ngrams if stream == "chars" else query.words, boost)
            if clause is not None:
                lexical.append(clause)
        if lexical and self.analysed_weight > 0 and query.normalised.strip():
            lexical.append(
                {
                    "multi_match": {
                        "query": query.normalised,
                        "fields": ["title", "questions", "answer^0.5"],
                        "boost": self.analysed_weight,
                    }
                }
            )
        if lexical:
            out["lexical"] = self._lexical_body(lexical, id_filter, depth)
        pinyin = self._match("pinyin", query.pinyin, 1.0)
        if pinyin is not None:
            out["pinyin"] = self._lexical_body([pinyin], id_filter, depth)
        k = min(_MAX_KNN_CANDIDATES, max(1, depth * self._max_variants))
        knn: dict[str, Any] = {
            "field": "vector",
            "query_vector": self.embedder.encode_one(query.normalised).tolist(),
            "k": k,
            "num_candidates": min(_MAX_KNN_CANDIDATES, max(k * 2, 100)),
        }
        if id_filter is not None:
            knn["filter"] = id_filter
        out["dense"] = {"size": k, "_source": ["entry_id"], "track_total_hits": False, "knn": knn}
        return out

    def rank(self, query: Query, allowed: set[str], depth: int) -> Rankings:
        if not (self._ids & allowed) or depth <= 0:
            return Rankings()
        bodies = self.searches(query, allowed, depth)
        names = list(bodies)
        request: list[dict[str, Any]] = []
        for name in names:
            request += [{}, bodies[name]]
        response = self._call(lambda: self.client.msearch(index=self.alias, searches=request)).body
        rankings = Rankings()
        for name, item in zip(names, response["responses"]):
            if "error" in item:
                if "index_not_found" in str(item["error"]):
                    raise KnowledgeBaseUnavailable(
                        f"the knowledge-base alias {self.alias!r} does not exist on {self.url}: "
                        "run `xiaozhi kb index` to build it"
                    )
                raise KnowledgeBaseUnavailable(
                    f"Elasticsearch at {self.url} failed the {name} search on {self.alias}: {item['error']}"
                )
            hits = item["hits"]["hits"]
            if name == "dense":
                rankings.dense = self._best_variant(hits, allowed, depth)
            else:
                ranked = [(h["_source"]["entry_id"], float(h["_score"])) for h in hits]
                setattr(rankings, name, [(e, s) for e, s in ranked if e in allowed][:depth])
        return rankings

    @staticmethod
    def _best_variant(hits: list[dict], allowed: set[str], depth: int) -> list[tuple[str, float]]:
        """Collapse variant hits to entries; hits come best first, so an entry's first hit is its best."""
        out: dict[str, float] = {}
        for h in hits:
            entry_id = h["_source"]["entry_id"]
            if entry_id in allowed and entry_id not in out:
                out[entry_id] = 2.0 * float(h["_score"]) - 1.0  # ES cosine score is (1 + cos) / 2
                if len(out) >= depth:
                    break
        return list(out.items())

    # -- errors -----------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run a client call, turning unreachable / unauthenticated / timed out into KnowledgeBaseUnavailable."""
        try:
            return fn()
        except EsConnectionError as exc:
            raise KnowledgeBaseUnavailable(
                f"cannot reach Elasticsearch at {self.url}: {exc.message if hasattr(exc, 'message') else exc}. "
                "Check that the cluster is running and XIAOZHI_ES_URL (scheme, host, port) is right, "
                "or set XIAOZHI_KB_BACKEND=embedded to run without it."
            ) from exc
        except AuthenticationException as exc:
            raise KnowledgeBaseUnavailable(
                f"Elasticsearch at {self.url} rejected the credentials: set XIAOZHI_ES_USERNAME and "
                "XIAOZHI_ES_PASSWORD to a user with the privileges listed in docs/deploy-elasticsearch.md"
            ) from exc
        except AuthorizationException as exc:
            raise KnowledgeBaseUnavailable(
                f"the Elasticsearch user lacks a privilege on {self.alias}*: {exc}. "
                "Grant the index privileges listed in docs/deploy-elasticsearch.md"
            ) from exc
        except TransportError as exc:  # timeouts and other transport failures
            raise KnowledgeBaseUnavailable(
                f"Elasticsearch at {self.url} did not answer in time ({exc}); check the cluster's health"
            ) from exc
