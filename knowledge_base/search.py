"""The knowledge-base interface every channel uses: region-aware hybrid search with an abstain decision.

``KnowledgeBase.search`` normalises the question (synonyms, homophones), asks a backend for
three rankings (BM25 over words and characters, BM25 over pinyin, dense vectors), fuses them by
reciprocal rank, keeps only the entries that apply to the resident's region, and decides
whether the best one is good enough to answer with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from knowledge_base.loader import Corpus
from knowledge_base.schema import NATIONAL, Entry, Region
from knowledge_base.text import TextProcessor

RRF_K = 60  # the constant of Cormack et al.; ranks beyond ~60 contribute little


@dataclass
class Query:
    """A question prepared once for every ranker."""

    raw: str
    normalised: str
    words: list[str]
    char_ngrams: list[str]
    pinyin: list[str]


@dataclass
class Rankings:
    """Each ranker's ordered entry ids with its own scores (higher is better)."""

    lexical: list[tuple[str, float]] = field(default_factory=list)
    pinyin: list[tuple[str, float]] = field(default_factory=list)
    dense: list[tuple[str, float]] = field(default_factory=list)


class SearchBackend(Protocol):
    """What the embedded engine and Elasticsearch both provide."""

    def rank(self, query: Query, allowed: set[str], depth: int) -> Rankings: ...


@dataclass
class Hit:
    entry: Entry
    score: float
    dense: float | None
    lexical_rank: int | None
    dense_rank: int | None
    pinyin_rank: int | None

    def as_dict(self) -> dict:
        return {**self.entry.citation(), "score": round(self.score, 4), "dense": self.dense}


@dataclass
class SearchResult:
    query: str
    normalised: str
    region_code: str
    hits: list[Hit]
    confidence: float
    abstain: bool

    @property
    def best(self) -> Hit | None:
        return self.hits[0] if self.hits else None

    def as_dict(self) -> dict:
        return {
            "query": self.query,
            "normalised": self.normalised,
            "region_code": self.region_code,
            "confidence": round(self.confidence, 4),
            "abstain": self.abstain,
            "results": [h.as_dict() for h in self.hits],
        }


def reciprocal_rank_fusion(*rankings: list[tuple[str, float]], k: int = RRF_K) -> dict[str, float]:
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (entry_id, _score) in enumerate(ranking, start=1):
            fused[entry_id] = fused.get(entry_id, 0.0) + 1.0 / (k + rank)
    return fused


def _in_place_of(ranking: list[tuple[str, float]], stand_in: dict[str, str]) -> list[tuple[str, float]]:
    """A ranking with each replaced entry named by the local entry that replaces it; an entry named twice
    keeps its better (first) place."""
    out, seen = [], set()
    for entry_id, score in ranking:
        entry_id = stand_in.get(entry_id, entry_id)
        if entry_id not in seen:
            seen.add(entry_id)
            out.append((entry_id, score))
    return out


class RegionResolver:
    """Which entries apply to a resident of a region: national ones, unless a local one replaces them."""

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = entries
        self.regions: dict[str, Region] = {NATIONAL.code: NATIONAL}
        for e in entries:
            self.regions.setdefault(e.region.code, e.region)
        self._cache: dict[str, tuple[frozenset[str], dict[str, str]]] = {}

    def chain(self, region_code: str | None) -> list[str]:
        """The region and its ancestors known to the corpus, most specific first, ending with national."""
        code = region_code or ""
        if code and code not in self.regions and len(code) == 6 and code.isdigit():
            # GB/T 2260 codes nest: a district without a pack of its own (西湖区 330106) takes its
            # city's (330100), a city without one its province's (330000).
            for enclosing in (code[:4] + "00", code[:2] + "0000"):
                if enclosing in self.regions:
                    code = enclosing
                    break
        chain: list[str] = []
        while code and code in self.regions and code != NATIONAL.code and code not in chain:
            chain.append(code)
            code = self.regions[code].parent or ""
        chain.append(NATIONAL.code)
        return chain

    def allowed(self, region_code: str | None) -> frozenset[str]:
        return self._resolve(region_code)[0]

    def stand_ins(self, region_code: str | None) -> dict[str, str]:
        """Each entry a local one replaces for this region (and each less specific local entry that
        replaces the same one), with the local entry that answers in its place."""
        return self._resolve(region_code)[1]

    def _resolve(self, region_code: str | None) -> tuple[frozenset[str], dict[str, str]]:
        key = region_code or ""
        if key not in self._cache:
            chain = self.chain(region_code)
            specificity = {code: i for i, code in enumerate(chain)}  # 0 = most specific
            applicable = [e for e in self._entries if e.region.code in specificity]
            hidden: set[str] = set()
            winner: dict[str, Entry] = {}
            rivals: dict[str, list[str]] = {}  # replaced entry -> the local entries that replace it
            for e in applicable:
                if e.overrides is None:
                    continue
                hidden.add(e.overrides)
                rivals.setdefault(e.overrides, []).append(e.id)
                held = winner.get(e.overrides)
                if held is None or specificity[e.region.code] < specificity[held.region.code]:
                    if held is not None:
                        hidden.add(held.id)
                    winner[e.overrides] = e
                else:
                    hidden.add(e.id)
            # the replaced entry and every less specific local entry replacing it answer as the winner
            stand_in = {r: winner[replaced].id for replaced, ids in rivals.items() for r in (replaced, *ids)
                        if r != winner[replaced].id}
            self._cache[key] = (frozenset(e.id for e in applicable if e.id not in hidden), stand_in)
        return self._cache[key]

    def label(self, region_code: str | None) -> str:
        region = self.regions.get(region_code or "")
        return region.label if region else NATIONAL.label


@dataclass
class Calibration:
    """Maps ranker evidence to a 0..1 confidence.

    Fitted for the offline e5-small model on tests/data/kb_dev.yaml with two-fold cross-validation
    (docs/retrieval-quality.md): e5 cosines bunch near the top of the range, so the midpoint sits
    high. Another embedding model needs its own midpoint (XIAOZHI_KB_CONFIDENCE_MIDPOINT).
    """

    dense_mid: float = 0.938  # cosine of the best entry at which confidence is 0.5
    dense_slope: float = 40.0
    agreement_bonus: float = 0.10  # the lexical and dense rankers name the same best entry


class KnowledgeBase:
    def __init__(
        self,
        corpus: Corpus,
        backend: SearchBackend,
        text: TextProcessor,
        *,
        abstain_threshold: float = 0.5,
        top_k: int = 5,
        default_region: str = "",
        calibration: Calibration | None = None,
        embedder=None,
    ) -> None:
        self.corpus = corpus
        self.backend = backend
        self.text = text
        self.abstain_threshold = abstain_threshold
        self.top_k = top_k
        self.default_region = default_region
        self.calibration = calibration or Calibration()
        self.embedder = embedder  # kept so a reload reuses the loaded model
        self.entries = corpus.by_id()
        self.regions = RegionResolver(corpus.entries)
        self.answerer = None  # knowledge_base.answers.Answerer, attached by the factory

    def retire(self) -> None:
        """This base is served no more: break its reference cycle (it and its answer stage point at each other)
        so that reference counting frees it, also where the garbage collector no longer walks it (a hub freezes
        its knowledge base: xiaozhi/hub/infra/collector.py). Whoever still holds it gets search, not answers."""
        self.answerer = None

    def prepare(self, question: str) -> Query:
        normalised = self.text.normalise(question)
        return Query(
            raw=question,
            normalised=normalised,
            words=self.text.words(normalised),
            char_ngrams=self.text.char_ngrams(normalised),
            pinyin=self.text.pinyin_bigrams(normalised),
        )

    def prefetch(self, question: str) -> None:
        """Start the expensive part of a search (the query vector) ahead of the search itself."""
        if self.embedder is not None:
            normalised = self.text.normalise(question)
            if normalised.strip():
                self.embedder.encode_one(normalised)

    def search(self, question: str, *, region: str | None = None, k: int | None = None) -> SearchResult:
        region_code = region if region is not None else self.default_region
        k = k or self.top_k
        query = self.prepare(question)
        if not query.normalised.strip():
            return SearchResult(question, "", region_code, [], 0.0, True)
        rankings = self.rank(query, region_code, depth=max(50, k * 4))
        fused = reciprocal_rank_fusion(rankings.lexical, rankings.pinyin, rankings.dense)
        dense_scores = dict(rankings.dense)
        ranks = {
            name: {eid: i for i, (eid, _) in enumerate(ranking, start=1)}
            for name, ranking in (
                ("lexical", rankings.lexical),
                ("dense", rankings.dense),
                ("pinyin", rankings.pinyin),
            )
        }
        ordered = sorted(fused.items(), key=lambda kv: (-kv[1], -dense_scores.get(kv[0], 0.0)))[:k]
        hits = [
            Hit(
                entry=self.entries[eid],
                score=score,
                dense=round(dense_scores[eid], 4) if eid in dense_scores else None,
                lexical_rank=ranks["lexical"].get(eid),
                dense_rank=ranks["dense"].get(eid),
                pinyin_rank=ranks["pinyin"].get(eid),
            )
            for eid, score in ordered
        ]
        confidence = self._confidence(hits)
        return SearchResult(
            query=question,
            normalised=query.normalised,
            region_code=region_code,
            hits=hits,
            confidence=confidence,
            abstain=not hits or confidence < self.abstain_threshold,
        )

    def rank(self, query: Query, region_code: str | None, depth: int) -> Rankings:
        """The backend's rankings over the entries that apply to the region. An entry a local one replaces
        is still ranked, in the local entry's name: the replaced national entry's ways of asking (and its
        knowledge points', which the answer stage keeps answerable) find the local entry, whose own
        wording is narrower ("12393要加区号吗" is asked of the national 12393 entry, which Hangzhou's
        hotline entry replaces there)."""
        stand_in = self.regions.stand_ins(region_code)
        allowed = set(self.regions.allowed(region_code)) | stand_in.keys()
        found = self.backend.rank(query, allowed, depth)
        if not stand_in:
            return found
        return Rankings(lexical=_in_place_of(found.lexical, stand_in), pinyin=_in_place_of(found.pinyin, stand_in),
                        dense=_in_place_of(found.dense, stand_in))

    def _confidence(self, hits: list[Hit]) -> float:
        if not hits:
            return 0.0
        cal = self.calibration
        best = hits[0]
        top_dense = best.dense if best.dense is not None else 0.0
        confidence = 1.0 / (1.0 + math.exp(-cal.dense_slope * (top_dense - cal.dense_mid)))
        if best.lexical_rank == 1 and best.dense_rank == 1:
            confidence = min(1.0, confidence + cal.agreement_bonus)
        return confidence

    def entry(self, entry_id: str, region: str | None = None) -> Entry | None:
        """An entry by id; with a region, the local entry that replaces it there, if one does."""
        found = self.entries.get(entry_id)
        if found is None or not region:
            return found
        allowed = self.regions.allowed(region)
        if entry_id in allowed:
            return found
        replacements = [e for e in self.corpus.entries if e.overrides == entry_id and e.id in allowed]
        return replacements[0] if replacements else found
