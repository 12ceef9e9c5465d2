"""Fit the answer stage's unit scorer on the development split of the answer-quality set.

Two fits, both on the development split only (the held-out quarter is never used here):

1. the unit classifier (knowledge_base/unit_classifier.py) on the corpus's ways of asking and the
   development questions with the unit that answers them, saved to ``unit_classifier.npz``;
2. the reranker: for every development question the answer stage's candidates (the units of the
   best entries, with their features) are labelled by whether they answer it (the item's
   ``expect``); a listwise logistic regression over the features gives the weights that
   knowledge_base/answers.py reads from ``reranker.json``.

A classifier scores the questions it was trained on too well, so the reranker would learn to trust
it more than it deserves on a new question. The reranker therefore sees *out-of-fold* classifier
scores: the development questions are cut into ``FOLDS`` parts by hash, and each part is scored by a
classifier fitted without it. The report gives top-1 by cross-validation over the same parts.

    .venv/bin/xiaozhi kb fit-reranker
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np

from knowledge_base.answer_eval import load_items, unit_matches
from knowledge_base.answers import FEATURES, WEIGHTS_PATH
from knowledge_base.evaluation import DEFAULT_DEV_SET, load_dev_set
from knowledge_base.questions import parse
from knowledge_base.unit_classifier import CLASSIFIER_PATH, entry_of, fit_unit_classifier, training_rows

FOLDS = 5


def collect(kb, items: list[dict], region: str,
            seen: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Feature rows, labels, and per question the row indexes of its candidates (in scored order).

    ``seen``: appended per question: its text, its labels and its candidates' unit ids (row order)."""
    answerer = kb.answerer
    rows, labels, groups = [], [], []
    for item in items:
        if item["out_of_scope"] or not item["expect"]:
            continue
        parsed = parse(item["q"])
        region_used, _ = answerer._region_for(parsed, _context(region))
        for question in parsed.questions[:1]:
            found = answerer.candidates(question, parsed, region_used)
            group = []
            for c in found.candidates:
                answer = {"unit": c.unit.id, "point": c.unit.point.id if c.unit.point else None,
                          "entry": c.unit.entry.id}
                group.append(len(rows))
                rows.append([c.features[f] for f in FEATURES])
                labels.append(int(any(unit_matches(answer, e) for e in item["expect"])))
            groups.append(group)
            if seen is not None:
                seen.append({"q": item["q"], "expect": item["expect"], "units": [c.unit.id for c in found.candidates]})
    return np.asarray(rows, dtype=np.float64), np.asarray(labels), groups


def _context(region: str):
    from knowledge_base.answers import Context

    return Context(deployment_region=region)


def top1(weights: np.ndarray, x: np.ndarray, y: np.ndarray, groups: list[list[int]]) -> float:
    hits = 0
    for group in groups:
        if group:
            hits += int(y[group][int(np.argmax(x[group] @ weights))] == 1)
    return hits / max(1, len(groups))


def _listwise_loss(w: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]], l2: float):
    """Negative log-likelihood that the softmax over a question's candidates picks a right one."""
    loss, grad = l2 * float(w @ w), 2 * l2 * w
    for x, y in groups:
        s = x @ w
        s = s - s.max()
        p = np.exp(s)
        p /= p.sum()
        right = float((p * y).sum())
        loss -= np.log(right + 1e-12)
        grad = grad - ((p * y) / (right + 1e-12) - p) @ x
    return loss, grad


def clarify_threshold(weights: np.ndarray, x, y, groups, max_rate: float = 0.08) -> float:
    """The largest softmax share below which asking still stays under ``max_rate`` of the questions,
    among those where asking helps: the best answer there is wrong more often than right."""
    shares, right = [], []
    for group in groups:
        if not group:
            continue
        s = x[group] @ weights
        p = np.exp(s - s.max())
        p /= p.sum()
        best = int(np.argmax(p))
        shares.append(float(p[best]))
        right.append(bool(y[group][best]))
    order = sorted(zip(shares, right))
    limit = int(max_rate * len(order))
    chosen = 0.0
    for i, (share, _ok) in enumerate(order[:limit]):
        below = [ok for _s, ok in order[: i + 1]]
        if sum(below) / len(below) < 0.5:
            chosen = share
    return round(chosen, 4)


def fold_of(question: str) -> int:
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) // 4 % FOLDS  # // 4: independent of the held-out hash


def labelled_questions(items: list[dict]) -> list[tuple[str, str]]:
    """(question, unit id) pairs of in-scope items: each question the message asks, with its unit."""
    out = []
    for item in items:
        if item["out_of_scope"] or not item["expect"]:
            continue
        questions = parse(item["q"]).questions or [item["q"]]
        out.extend(zip(questions, item["expect"]))
    return out


def entry_labelled_questions(path: Path = DEFAULT_DEV_SET) -> list[tuple[str, str]]:
    """(question, entry id) pairs from the knowledge base's own development set (tests/data/kb_dev.yaml:
    residents' wording labelled with the entry that answers it; the classifier knows entries as units).
    Questions to abstain on are left out. Each question the message asks takes the first (best) entry,
    except a multi-question message with one entry per question, whose questions take theirs in order."""
    out = []
    for query in load_dev_set(path):
        if query.should_abstain:
            continue
        questions = parse(query.q).questions or [query.q]
        if query.kind == "multi" and len(query.expect) == len(questions):
            out.extend(zip(questions, query.expect))
        else:
            out.extend((question, query.expect[0]) for question in questions)
    return out


def _fit_weights(groups: list[tuple[np.ndarray, np.ndarray]], l2: float) -> np.ndarray:
    from scipy.optimize import minimize

    trainable = [(x, y) for x, y in groups if y.any()]
    return minimize(_listwise_loss, np.zeros(len(FEATURES)), args=(trainable, l2), jac=True, method="L-BFGS-B").x


def fit(kb, region: str = "330100", path: Path = WEIGHTS_PATH, l2: float = 0.01,
        classifier_path: Path = CLASSIFIER_PATH, say=print, misses: Path | None = None) -> dict:
    """Fit the classifier and the reranker (see the module's text); write both next to the code.

    ``misses``: a JSON file of the development questions that cross-validation answers with a unit
    their labels do not name (what was asked, the labels, the unit chosen, whether a right unit was
    among the candidates at all): where the knowledge or its ways of asking need work."""
    items = [i for i in load_items() if i["split"] == "dev"]
    answerer = kb.answerer
    units = answerer.units.layout.units
    entries = entry_of(units)
    # The knowledge base's entry-level labelled questions are no answer-set question: every fold learns them.
    extra = entry_labelled_questions()
    # Out-of-fold features: part k's questions are scored by a classifier that never saw them.
    x_parts, y_parts, groups, seen = [], [], [], []
    offset = 0
    for k in range(FOLDS):
        train = [i for i in items if fold_of(i["q"]) != k]
        part = [i for i in items if fold_of(i["q"]) == k]
        say(f"fold {k + 1}/{FOLDS}: classifiers on the corpus, {len(train)} development questions "
            f"and {len(extra)} labelled entry questions")
        answerer.classifier = fit_unit_classifier(*training_rows(units, labelled_questions(train) + extra), entries)
        x, y, g = collect(kb, part, region, seen)
        x_parts.append(x)
        y_parts.append(y)
        groups.extend([[offset + r for r in group] for group in g])
        offset += len(y)
    x, y = np.vstack(x_parts), np.concatenate(y_parts)
    # cross-validated top-1 over the same parts: weights fitted on four parts, counted on the fifth
    sizes = [sum(1 for i in items if fold_of(i["q"]) == k and not i["out_of_scope"] and i["expect"]) for k in range(FOLDS)]
    starts = np.cumsum([0, *sizes])
    hits = 0
    missed = []
    for k in range(FOLDS):
        test = groups[starts[k]:starts[k + 1]]
        train = groups[:starts[k]] + groups[starts[k + 1]:]
        w = _fit_weights([(x[g], y[g].astype(np.float64)) for g in train if g], l2)
        hits += top1(w, x, y, test) * len(test)
        for n, g in enumerate(test, start=starts[k]):
            best = int(np.argmax(x[g] @ w)) if g else 0
            if g and not y[g[best]]:
                missed.append({"q": seen[n]["q"], "expect": seen[n]["expect"], "chosen": seen[n]["units"][best],
                               "reachable": bool(y[g].any())})
    if misses is not None:
        misses.write_text(json.dumps(missed, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    weights = _fit_weights([(x[g], y[g].astype(np.float64)) for g in groups if g], l2)
    say("final classifier on the corpus and every development question")
    classifier = fit_unit_classifier(*training_rows(units, labelled_questions(items) + extra), entries)
    classifier.save(classifier_path)
    answerer.classifier = classifier
    reachable = sum(1 for g in groups if g and y[g].any()) / max(1, len(groups))
    report = {
        "fitted": dt.date.today().isoformat(),
        "on": f"tests/data/answer_set.yaml dev split: {len(groups)} questions, {len(y)} candidates",
        "method": f"conditional logit (softmax over each question's candidates), L2 {l2}; "
                  f"unit classifier scores out of fold ({FOLDS} parts)",
        "top1_dev_cross_validated": round(hits / max(1, len(groups)), 4),
        "right_unit_among_candidates_dev": round(reachable, 4),
        "clarify_share": clarify_threshold(weights, x, y, groups),
        "classifier": {"units": len(classifier.unit_ids), "entries": len(classifier.entries.unit_ids),
                       "entry_labelled_questions": len(extra), "ngrams": len(classifier.idf),
                       "weights": int(classifier.coef.nnz + classifier.entries.coef.nnz), "trained_on": classifier.trained_on},
        "weights": {f: round(float(w), 4) for f, w in zip(FEATURES, weights)},
    }
    try:  # the answer stage's own abstain threshold is chosen by a separate grid on the dev split; keep it
        previous = json.loads(path.read_text(encoding="utf-8"))
        report.update({k: previous[k] for k in ("abstain_below", "abstain_below_note") if k in previous})
    except (FileNotFoundError, ValueError):
        pass
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report
