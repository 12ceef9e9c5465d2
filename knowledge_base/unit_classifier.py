"""A learned scorer of which unit a question asks for: the words that tell sibling questions apart.

The answer stage's other features measure how *alike* a question and a unit are (e5 cosines, shared
words). Residents' questions mostly land on the right area and then on a neighbouring knowledge point
(docs/retrieval-quality.md): "亲情账户最多绑几个人" and "亲情账户能被几个人绑" share almost every word.
A linear classifier over character n-grams, trained to pick each unit from all the others, learns
which few characters separate them (最多 / 被, 门诊 / 住院, 离职 / 到账).

It is trained on
* every way of asking of every entry and knowledge point (the corpus's own wording),
* labelled residents' questions: the development split of tests/data/answer_set.yaml (real messages
  with the point that answers them), never its held-out split, and
* the knowledge base's entry-level labelled questions (tests/data/kb_dev.yaml, each with the entry
  that answers it). An agency adds its own labelled questions to the same kind of file, and every
  refit learns from them.

A second classifier over the same rows, each labelled with its unit's *entry*, scores which area a
question is about (``entries``): most of the answer stage's misses lose to a point of another entry,
and the entry-level labels say most about that.

Fitted offline with the reranker (``xiaozhi kb fit-reranker``) and written as arrays to
``unit_classifier.npz`` beside the code (no pickled objects); the answer stage uses it when the file
is there (shipped: docs/retrieval-quality.md has its figures). The file holds
the n-gram vocabulary and idf, a sparse float32
weight matrix (weights below ``PRUNE`` dropped: about a tenth of them, the scores barely move) and
the unit ids it knows. A unit published since the fit (issue 18: staff add knowledge points between
refits) has no weights of its own: it is scored from the TF-IDF cosine between the question and the
centroid of its ways of asking, mapped onto the margin scale by a line fitted on the known units
(``fallback``), so it is neither preferred nor buried until a refit learns it. Scikit-learn
(TF-IDF + LinearSVC, one-vs-rest) does the fitting; scoring is one sparse product.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse.linalg  # noqa: F401  (sparse.linalg.norm)
from scipy import sparse

log = logging.getLogger(__name__)

CLASSIFIER_PATH = Path(__file__).resolve().parent / "unit_classifier.npz"
NGRAMS = (1, 3)
MIN_DF = 2
C = 0.5
PRUNE = 0.01
UNKNOWN = -1.5  # below almost every fitted score: a unit the classifier has not seen is not preferred
FORMAT = 1


def _vectorizer(vocabulary: dict[str, int] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, sublinear_tf=True,
                           min_df=1 if vocabulary is not None else MIN_DF, vocabulary=vocabulary)


@dataclass
class UnitClassifier:
    vocabulary: dict[str, int]
    idf: np.ndarray  # (n_features,)
    coef: sparse.csr_matrix  # (n_units, n_features) float32
    intercept: np.ndarray  # (n_units,)
    unit_ids: list[str]
    trained_on: str = ""  # a hash of the training rows, to tell a stale fit
    fallback: tuple[float, float] = (0.0, UNKNOWN)  # margin ~ a * cos(question, centroid) + b, for units fitted later
    # The same rows with each unit's *entry* as the class (same vocabulary): which area is asked. A
    # point's own margin competes with its siblings and its entry; the entry's margin pools every way of
    # asking of the entry and its points, and learns from entry-level labels (tests/data/kb_dev.yaml).
    entries: "UnitClassifier | None" = None

    def __post_init__(self) -> None:
        self._row = {u: i for i, u in enumerate(self.unit_ids)}
        self._analyzer = _vectorizer(self.vocabulary).build_analyzer()
        # unit id -> (its ways of asking, their centroid): a unit published after the fit is asked about
        # in every answer it is a candidate of; its centroid changes only when its ways of asking do
        self._centroid_of: dict[str, tuple[tuple[str, ...], sparse.csr_matrix]] = {}

    def transform(self, texts: list[str]) -> sparse.csr_matrix:
        """TF-IDF rows exactly as scikit-learn's fitted vectorizer makes them (sublinear tf, l2 norm)."""
        rows, cols, vals = [], [], []
        for r, text in enumerate(texts):
            counts: dict[int, int] = {}
            for gram in self._analyzer(text):
                j = self.vocabulary.get(gram)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if not counts:
                continue
            js = np.fromiter(counts, dtype=np.int64)
            v = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64))) * self.idf[js]
            v /= np.linalg.norm(v)
            rows.extend([r] * len(js))
            cols.extend(js.tolist())
            vals.extend(v.tolist())
        return sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), len(self.idf)), dtype=np.float64)

    def scores(self, question: str, unit_ids: Iterable[str],
               texts: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
        """The classifier's margin for each asked unit. A unit it was not fitted on is scored by
        ``fallback`` from its ways of asking (``texts``), or gets ``UNKNOWN`` without them."""
        ids = list(unit_ids)
        known = [u for u in ids if u in self._row]
        out = dict.fromkeys(ids, UNKNOWN)
        x = self.transform([question])
        if known:
            rows = [self._row[u] for u in known]
            values = (self.coef[rows] @ x.T).toarray().ravel() + self.intercept[rows]
            out.update(zip(known, (float(v) for v in values)))
        new = [u for u in ids if u not in self._row and texts and texts.get(u)]
        if new:
            a, b = self.fallback
            centroids = sparse.vstack([self._centroid(u, texts[u]) for u in new]).tocsr()
            cosines = (centroids @ x.T).toarray().ravel()
            out.update(zip(new, (float(a * c + b) for c in cosines)))
        return out

    def _centroid(self, unit_id: str, texts: Sequence[str]) -> sparse.csr_matrix:
        key = tuple(texts)
        known = self._centroid_of.get(unit_id)
        if known is not None and known[0] == key:
            return known[1]
        row = _centroids(self.transform, [key])
        self._centroid_of[unit_id] = (key, row)
        return row

    # -- storage ----------------------------------------------------------------------------------
    def save(self, path: Path = CLASSIFIER_PATH) -> None:
        vocab = sorted(self.vocabulary, key=self.vocabulary.get)
        with open(path, "wb") as f:
            np.savez_compressed(
                f, format=np.asarray(FORMAT), vocabulary=np.asarray(vocab), idf=self.idf.astype(np.float32),
                trained_on=np.asarray(self.trained_on), **_arrays(self, ""),
                **(_arrays(self.entries, "entry_") if self.entries is not None else {}),
            )

    @classmethod
    def load(cls, path: Path = CLASSIFIER_PATH) -> "UnitClassifier | None":
        """The shipped fit, or None when there is none (or it is of another format): the answer stage
        then scores without it, as before the classifier existed."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != FORMAT:
                    log.warning("unit classifier %s has format %s, expected %s: not used", path, int(z["format"]), FORMAT)
                    return None
                vocabulary = {str(g): i for i, g in enumerate(z["vocabulary"])}
                idf = z["idf"].astype(np.float64)

                def part(prefix: str) -> "UnitClassifier":
                    coef = sparse.csr_matrix((z[prefix + "data"], z[prefix + "indices"], z[prefix + "indptr"]),
                                             shape=tuple(z[prefix + "shape"]))
                    return cls(vocabulary, idf, coef, z[prefix + "intercept"].astype(np.float64),
                               [str(u) for u in z[prefix + "unit_ids"]], str(z["trained_on"]),
                               tuple(float(v) for v in z[prefix + "fallback"]))

                out = part("")
                if "entry_unit_ids" in z.files:  # a fit before the entry classifier existed has none
                    out.entries = part("entry_")
                return out
        except FileNotFoundError:
            return None


def _arrays(classifier: UnitClassifier, prefix: str) -> dict[str, np.ndarray]:
    """One classifier's own arrays (its weights, classes and fallback line) under ``prefix``."""
    coef = classifier.coef.tocsr()
    return {prefix + "data": coef.data.astype(np.float32), prefix + "indices": coef.indices.astype(np.int32),
            prefix + "indptr": coef.indptr.astype(np.int64), prefix + "shape": np.asarray(coef.shape),
            prefix + "intercept": classifier.intercept.astype(np.float32),
            prefix + "unit_ids": np.asarray(classifier.unit_ids),
            prefix + "fallback": np.asarray(classifier.fallback, dtype=np.float64)}


def _centroids(transform, groups: list[Sequence[str]]) -> sparse.csr_matrix:
    """One l2-normalised mean TF-IDF row per group of texts."""
    rows = []
    for texts in groups:
        mean = sparse.csr_matrix(transform(list(texts)).mean(axis=0))
        norm = sparse.linalg.norm(mean)
        rows.append(mean / norm if norm else mean)
    return sparse.vstack(rows).tocsr()


def fit_fallback(classifier: UnitClassifier, texts: list[str], ids: list[str], sample: int = 600,
                 seed: int = 0) -> tuple[float, float]:
    """The line from centroid cosine to margin, least squares over a sample of training texts
    against every known unit's centroid."""
    by_unit: dict[str, list[str]] = {}
    for text, unit_id in zip(texts, ids):
        by_unit.setdefault(unit_id, []).append(text)
    order = classifier.unit_ids
    centroids = _centroids(classifier.transform, [by_unit[u] for u in order])
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), size=min(sample, len(texts)), replace=False)
    x = classifier.transform([texts[i] for i in picked])
    cosines = (x @ centroids.T).toarray().ravel()
    margins = ((x @ classifier.coef.T).toarray() + classifier.intercept).ravel()
    a, b = np.polyfit(cosines, margins, 1)
    return float(a), float(b)


def training_rows(units, labelled: Iterable[tuple[str, str]] = ()) -> tuple[list[str], list[str]]:
    """(text, unit id) rows: every way of asking of every entry and point, then labelled questions
    whose unit exists. Passages are answers' sentences, not ways of asking: they are left out."""
    texts, ids = [], []
    known = set()
    for unit in units:
        if unit.kind == "passage":
            continue
        known.add(unit.id)
        for text in dict.fromkeys(unit.texts):
            texts.append(text)
            ids.append(unit.id)
    for question, unit_id in labelled:
        if unit_id in known:
            texts.append(question)
            ids.append(unit_id)
    return texts, ids


def entry_of(units) -> dict[str, str]:
    """Unit id -> the id of the entry it belongs to (an entry's own id for the entry)."""
    return {unit.id: unit.entry.id for unit in units if unit.kind != "passage"}


def _svm(x, labels: list[str]) -> tuple[sparse.csr_matrix, np.ndarray, list[str]]:
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=C).fit(x, labels)
    coef = np.asarray(svm.coef_, dtype=np.float32)
    intercept = np.asarray(svm.intercept_, dtype=np.float64)
    classes = [str(c) for c in svm.classes_]
    if len(classes) == 2:  # scikit-learn keeps one row for a two-class problem: the second class's margin
        coef = np.vstack([-coef, coef])
        intercept = np.concatenate([-intercept, intercept])
    coef[np.abs(coef) < PRUNE] = 0.0
    return sparse.csr_matrix(coef), intercept, classes


def fit_unit_classifier(texts: list[str], ids: list[str], entries: Mapping[str, str] | None = None) -> UnitClassifier:
    """Fit on (text, unit id) rows; with ``entries`` (unit id -> entry id, see ``entry_of``) also the
    entry classifier over the same rows, each labelled with its unit's entry."""
    vectorizer = _vectorizer()
    x = vectorizer.fit_transform(texts)
    vocabulary, idf = dict(vectorizer.vocabulary_), vectorizer.idf_.astype(np.float64)
    digest = hashlib.sha256("\x1e".join(f"{t}\x1f{i}" for t, i in zip(texts, ids)).encode()).hexdigest()[:16]
    classifier = UnitClassifier(vocabulary, idf, *_svm(x, ids), digest)
    classifier.fallback = fit_fallback(classifier, texts, ids)
    if entries is not None:
        entry_ids = [entries.get(i, i) for i in ids]
        classifier.entries = UnitClassifier(vocabulary, idf, *_svm(x, entry_ids), digest)
        classifier.entries.fallback = fit_fallback(classifier.entries, texts, entry_ids)
    return classifier
