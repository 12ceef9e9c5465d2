"""The embedded search backend: tantivy BM25 over pre-tokenised Chinese plus exact kNN in numpy.

It needs no server, answers in a few milliseconds at 10,000 entries, and persists its vectors so a
restart does not re-encode the corpus. Elasticsearch (knowledge_base/elasticsearch_backend.py)
provides the same ``rank`` for production clusters.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import tantivy

from knowledge_base.embedder import Embedder
from knowledge_base.loader import Corpus
from knowledge_base.schema import Entry
from knowledge_base.search import Query, Rankings
from knowledge_base.text import TextProcessor
from knowledge_base.units import Layout, layout

log = logging.getLogger(__name__)

# Field weights of the lexical ranker: what a resident asks matches question variants best.
_LEXICAL_FIELDS = (("words", 1.0), ("chars", 0.5), ("answer", 0.3))
# What ``EmbeddedBackend.save`` writes into its directory.
VECTORS_FILE = "vectors.npy"
LEXICAL_DIR = "lexical"


def entry_texts(entry: Entry) -> list[str]:
    """The texts whose vectors stand for an entry: its title and every way of asking it."""
    return [entry.title, *entry.questions]


def lexical_documents(entry: Entry, text: TextProcessor, asked_too: tuple[str, ...] = ()) -> dict[str, str]:
    """The token streams of an entry; ``asked_too`` adds its knowledge points' ways of asking."""
    asked = text.normalise(" ".join([entry.title, *entry.questions, *entry.tags, *asked_too]))
    answer = text.normalise(" ".join([entry.spoken, entry.answer, *entry.steps]), correct=False)
    return {
        "words": " ".join(text.words(asked)),
        "chars": " ".join(text.char_ngrams(asked)),
        "pinyin": " ".join(text.pinyin_bigrams(asked)),
        "answer": " ".join(text.words(answer)),
    }


class EmbeddedBackend:
    def __init__(
        self,
        entries: list[Entry],
        text: TextProcessor,
        embedder: Embedder,
        vectors: np.ndarray,
        owners: np.ndarray,
        *,
        question_rows: np.ndarray | None = None,
        asked_too: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.text = text
        self.embedder = embedder
        self._ids = [e.id for e in entries]
        self._vectors = vectors
        self._owners = owners  # row -> entry position, rows grouped by entry in ascending order
        self._starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        # Passage rows refine an answer inside an entry; only question rows rank the entries.
        self._passage_rows = None if question_rows is None else np.flatnonzero(~question_rows)
        self._asked_too = asked_too or {}
        self._entries = entries
        self._saved: Path | None = None  # the directory ``save`` wrote the vectors and lexical index to
        self._index, self._schema = self._build_lexical(self._documents())

    # -- building ---------------------------------------------------------------------------------
    def _documents(self) -> list[dict[str, str]]:
        return [lexical_documents(e, self.text, self._asked_too.get(e.id, ())) for e in self._entries]

    def __getstate__(self) -> dict:
        """Pickled for another process (a knowledge base built off the serving process, knowledge_base/
        build_worker.py), without the model and the text processor, which the receiving process attaches
        (``text``, ``embedder``). A backend ``save``d to a directory pickles only where it is: the receiving
        process maps its vectors and opens its lexical index there. Otherwise the lexical documents go
        instead of the in-RAM index, which is rebuilt on arrival."""
        drop = ("_index", "_schema", "text", "embedder")
        if self._saved is not None:
            drop += ("_vectors",)
        state = {k: v for k, v in self.__dict__.items() if k not in drop}
        if self._saved is None:
            state["_lexical"] = self._documents()
        return {**state, "text": None, "embedder": None}

    def __setstate__(self, state: dict) -> None:
        documents = state.pop("_lexical", None)
        self.__dict__.update(state)
        if documents is not None:
            self._index, self._schema = self._build_lexical(documents)
        else:
            self._open_saved()

    def save(self, directory: Path) -> None:
        """Write the vectors and the lexical index into ``directory`` (new), for another process to open without
        rebuilding anything: the vectors as a ``.npy`` it maps (``np.load(mmap_mode="r")``), the BM25 index as a
        tantivy index directory (``tantivy.Index.open``)."""
        directory.mkdir(parents=True)
        np.save(directory / VECTORS_FILE, np.ascontiguousarray(self._vectors, dtype=np.float32))
        (directory / LEXICAL_DIR).mkdir()
        self._build_lexical(self._documents(), directory / LEXICAL_DIR)
        self._saved = directory

    def _open_saved(self) -> None:
        """Map the saved vectors and open the saved lexical index; ValueError when they are not what was saved."""
        directory = self._saved
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")  # ValueError when the file is short
        if vectors.ndim != 2 or len(vectors) != len(self._owners):
            raise ValueError(f"{directory / VECTORS_FILE} has {vectors.shape} vectors, the layout {len(self._owners)} rows")
        index = tantivy.Index.open(str(directory / LEXICAL_DIR))
        index.reload()
        documents = index.searcher().num_docs
        if documents != len(self._ids):
            raise ValueError(f"{directory / LEXICAL_DIR} has {documents} documents, the knowledge base {len(self._ids)} entries")
        self._vectors, self._index, self._schema = vectors, index, index.schema

    @staticmethod
    def _build_lexical(documents: list[dict[str, str]], path: Path | None = None) -> tuple[tantivy.Index, tantivy.Schema]:
        builder = tantivy.SchemaBuilder()
        for name in ("words", "chars", "pinyin", "answer"):
            builder.add_text_field(name, stored=False, tokenizer_name="whitespace")
        builder.add_unsigned_field("pos", stored=True, indexed=False)
        schema = builder.build()
        # In RAM for a knowledge base built in this process: rebuilding is cheaper than a second cache to keep
        # valid. On disk (``path``) for one built in the worker, which the serving process opens.
        index = tantivy.Index(schema) if path is None else tantivy.Index(schema, path=str(path), reuse=False)
        writer = index.writer(heap_size=50_000_000, num_threads=1)
        for pos, fields in enumerate(documents):
            doc = tantivy.Document()
            for name, value in fields.items():
                doc.add_text(name, value)
            doc.add_unsigned("pos", pos)
            writer.add_document(doc)
        writer.commit()
        writer.wait_merging_threads()
        index.reload()
        return index, schema

    # -- ranking ----------------------------------------------------------------------------------
    def _search(self, clauses: list[tantivy.Query], allowed: set[str], depth: int) -> list[tuple[str, float]]:
        if not clauses:
            return []
        searcher = self._index.searcher()
        query = tantivy.Query.boolean_query([(tantivy.Occur.Should, c) for c in clauses])
        # Over-fetch so that filtering by region still leaves ``depth`` results.
        limit = min(len(self._ids), depth * 4 if len(allowed) < len(self._ids) else depth)
        out = []
        for score, address in searcher.search(query, max(limit, 1)).hits:
            entry_id = self._ids[searcher.doc(address)["pos"][0]]
            if entry_id in allowed:
                out.append((entry_id, float(score)))
                if len(out) >= depth:
                    break
        return out

    def _terms(self, field: str, tokens: list[str], boost: float) -> list[tantivy.Query]:
        queries = []
        for token in dict.fromkeys(tokens):  # unique, order kept
            q = tantivy.Query.term_query(self._schema, field, token)
            queries.append(tantivy.Query.boost_query(q, boost) if boost != 1.0 else q)
        return queries

    def rank(self, query: Query, allowed: set[str], depth: int) -> Rankings:
        lexical_clauses = []
        for field, boost in _LEXICAL_FIELDS:
            tokens = query.char_ngrams if field == "chars" else query.words
            lexical_clauses += self._terms(field, tokens, boost)
        lexical = self._search(lexical_clauses, allowed, depth)
        pinyin = self._search(self._terms("pinyin", query.pinyin, 1.0), allowed, depth)
        dense = self._dense(query.normalised, allowed, depth)
        return Rankings(lexical=lexical, pinyin=pinyin, dense=dense)

    def _dense(self, text: str, allowed: set[str], depth: int) -> list[tuple[str, float]]:
        qv = self.embedder.encode_one(text)
        sims = self._vectors @ qv
        if self._passage_rows is not None and len(self._passage_rows):
            sims[self._passage_rows] = -np.inf
        per_entry = np.maximum.reduceat(sims, self._starts)  # best variant of each entry
        order = np.argsort(-per_entry)
        out = []
        for pos in order:
            entry_id = self._ids[int(self._owners[self._starts[pos]])]
            if entry_id in allowed:
                out.append((entry_id, float(per_entry[pos])))
                if len(out) >= depth:
                    break
        return out


# -- the on-disk vector cache -----------------------------------------------------------------------
# Bumped when the row layout changes (v2: knowledge points and passages have rows of their own;
# v3: a knowledge point's answer has one too).
_LAYOUT_VERSION = "v3"


def _cache_key(corpus: Corpus, embedder: Embedder) -> str:
    return f"{corpus.fingerprint}-{embedder.fingerprint}-{_LAYOUT_VERSION}"


def mark_current(index_dir: Path, name: str) -> None:
    """Record which index is current; running hubs poll this file to reload (atomic replace)."""
    current = index_dir / "CURRENT"
    if current.exists() and current.read_text() == name:
        return
    index_dir.mkdir(parents=True, exist_ok=True)
    tmp = index_dir / f"CURRENT.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # each writer its own
    tmp.write_text(name)
    tmp.replace(current)


def current_generation(index_dir: Path) -> str | None:
    try:
        return (index_dir / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def encode_corpus(
    corpus: Corpus,
    embedder: Embedder,
    index_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 64,
    reuse: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, Path]:
    """Vectors for every row of the corpus layout (units.py), from the cache when corpus and model are unchanged.

    ``reuse``: vectors already known by text (the running knowledge base's, ``known_vectors``): only the
    texts not in it are encoded, so publishing one changed figure does not re-encode the whole corpus."""
    target = index_dir / _cache_key(corpus, embedder)
    if (target / "manifest.json").exists():
        return _read_cache(index_dir, target)
    index_dir.mkdir(parents=True, exist_ok=True)
    # Several processes may need the same cache at once (replicas starting after a publication, setup
    # beside a running hub): one encodes, the others wait for it and read its result.
    with open(index_dir / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "manifest.json").exists():
            return _read_cache(index_dir, target)
        return _encode_into(target, corpus, embedder, index_dir, progress, batch, reuse)


def _read_cache(index_dir: Path, target: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    vectors = np.load(target / "vectors.npy")
    owners = np.load(target / "owners.npy")
    mark_current(index_dir, target.name)
    return vectors, owners, target


def _encode_into(target: Path, corpus: Corpus, embedder: Embedder, index_dir: Path,
                 progress: Callable[[int, int], None] | None, batch: int,
                 reuse: Mapping[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, Path]:
    rows = layout(corpus)
    texts = rows.texts
    owners_list = rows.row_entry
    started = time.perf_counter()
    # Without vectors handed in, the last cache of the same model gives those of every text it has:
    # an edited pack re-encodes only the texts it changed, not the whole corpus (12k texts, ~10 min).
    known = reuse if reuse is not None else previous_vectors(index_dir, embedder)
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    fresh: dict[str, np.ndarray] = {}
    for i in range(0, len(missing), batch):
        fresh.update(zip(missing[i : i + batch], embedder.encode(missing[i : i + batch])))
        if progress:
            progress(min(i + batch, len(missing)), len(missing))
    if texts:
        vectors = np.vstack([fresh[t] if t in fresh else known[t] for t in texts]).astype(np.float32, copy=False)
    else:
        vectors = np.zeros((0, embedder.dimension), np.float32)
    owners = np.asarray(owners_list, dtype=np.int64)
    # a directory of this writer's own (a process without the lock, an older version, must not find it)
    tmp = index_dir / f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    np.save(tmp / "vectors.npy", vectors)
    np.save(tmp / "owners.npy", owners)
    (tmp / TEXTS_FILE).write_text(json.dumps(texts, ensure_ascii=False))
    (tmp / "manifest.json").write_text(
        json.dumps(
            {
                "entries": len(corpus.entries),
                "points": len(corpus.points),
                "texts": len(texts),
                "encoded": len(missing),
                "model": embedder.model_name,
                "corpus_fingerprint": corpus.fingerprint,
                "seconds": round(time.perf_counter() - started, 2),
            },
            ensure_ascii=False,
        )
    )
    _install(tmp, target)
    mark_current(index_dir, target.name)
    log.info("encoded %d of %d texts of %d entries in %.1f s", len(missing), len(texts), len(corpus.entries),
             time.perf_counter() - started)
    return vectors, owners, target


TEXTS_FILE = "texts.json"  # the text of each row of vectors.npy, so a later corpus can reuse them


def _install(tmp: Path, target: Path) -> None:
    """Move a finished cache directory into place. A complete cache another process put there first
    stays (a hub may be reading it; the vectors are the same) and ours is dropped; an incomplete one
    (no manifest: left by a crash) is replaced."""
    if target.exists() and not (target / "manifest.json").exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "manifest.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


REUSED_CACHES = 3  # the newest caches of a model whose vectors an edited corpus may reuse


def previous_vectors(index_dir: Path, embedder: Embedder) -> dict[str, np.ndarray]:
    """The vectors of the most recently written caches of this model and layout (``REUSED_CACHES``), by
    text, the newer one's where two hold a text; {} if none. Several: the newest may be another corpus's (a
    test's or a script's few entries beside the packs), which must not make the packs' 12k texts encoded again.

    Only a cache that lists its texts (``texts.json``, written since this was added) can be reused, and
    only when its rows and texts agree; anything unreadable is ignored (the texts are then encoded)."""
    suffix = f"-{embedder.fingerprint}-{_LAYOUT_VERSION}"
    try:
        candidates = [d for d in index_dir.iterdir() if d.name.endswith(suffix) and (d / TEXTS_FILE).exists()]
    except FileNotFoundError:
        return {}
    known: dict[str, np.ndarray] = {}
    reused = 0
    for directory in sorted(candidates, key=lambda d: (d / TEXTS_FILE).stat().st_mtime, reverse=True):
        try:
            texts = json.loads((directory / TEXTS_FILE).read_text(encoding="utf-8"))
            vectors = np.load(directory / "vectors.npy")
        except (OSError, ValueError) as exc:
            log.warning("vector cache %s not reused: %s", directory.name, exc)
            continue
        if len(texts) != len(vectors) or vectors.ndim != 2 or vectors.shape[1] != embedder.dimension:
            log.warning("vector cache %s not reused: %d texts for %d vectors", directory.name, len(texts), len(vectors))
            continue
        for text, vector in zip(texts, vectors):
            known.setdefault(text, vector)
        reused += 1
        if reused == REUSED_CACHES:
            break
    return known


def known_vectors(corpus: Corpus, embedder: Embedder, index_dir: Path) -> dict[str, np.ndarray]:
    """The cached vector of every text of ``corpus`` (encoded before by ``encode_corpus``), by text; {} if none."""
    target = index_dir / _cache_key(corpus, embedder)
    try:
        vectors = np.load(target / "vectors.npy")
    except FileNotFoundError:
        return {}
    texts = layout(corpus).texts
    if len(texts) != len(vectors):
        return {}
    return dict(zip(texts, vectors))


def asked_by_points(rows: Layout) -> dict[str, tuple[str, ...]]:
    """Per entry, every way its knowledge points are asked: the lexical rankers index them with the entry."""
    out: dict[str, tuple[str, ...]] = {}
    for unit in rows.units:
        if unit.kind == "point":
            out[unit.entry.id] = out.get(unit.entry.id, ()) + unit.texts
    return out


def build_embedded_backend(
    corpus: Corpus, text: TextProcessor, embedder: Embedder, index_dir: Path, **kwargs
) -> EmbeddedBackend:
    vectors, owners, _ = encode_corpus(corpus, embedder, index_dir, **kwargs)
    rows = layout(corpus)
    return EmbeddedBackend(
        corpus.entries, text, embedder, vectors, owners,
        question_rows=np.asarray(rows.row_is_question, dtype=bool), asked_too=asked_by_points(rows),
    )
