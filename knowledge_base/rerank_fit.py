"""Fit the answer stage's unit scorer on the development split of the answer-quality set.

For every development question the answer stage's candidates (the units of the best entries, with
their features) are labelled by whether they answer it (the item's ``expect``); a logistic
regression over the features gives the weights that knowledge_base/answers.py reads from
``reranker.json``. The held-out quarter is never used here.

    .venv/bin/xiaozhi kb fit-reranker
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from knowledge_base.answer_eval import load_items, unit_matches
from knowledge_base.answers import FEATURES, WEIGHTS_PATH
from knowledge_base.questions import parse


def collect(kb, items: list[dict], region: str) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Feature rows, labels, and per question the row indexes of its candidates (in scored order)."""
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


def fit(kb, region: str = "330100", path: Path = WEIGHTS_PATH, l2: float = 0.01) -> dict:
    """A conditional-logit (listwise) fit: the weights that best pick a right unit per question."""
    from scipy.optimize import minimize

    items = [i for i in load_items() if i["split"] == "dev"]
    x, y, groups = collect(kb, items, region)
    trainable = [(x[g], y[g].astype(np.float64)) for g in groups if g and y[g].any()]
    reachable = len(trainable) / max(1, len(groups))
    result = minimize(_listwise_loss, np.zeros(len(FEATURES)), args=(trainable, l2), jac=True, method="L-BFGS-B")
    weights = result.x
    current = np.asarray([kb.answerer.weights.get(f, 0.0) for f in FEATURES])
    report = {
        "fitted": dt.date.today().isoformat(),
        "on": f"tests/data/answer_set.yaml dev split: {len(groups)} questions, {len(y)} candidates",
        "method": "conditional logit (softmax over each question's candidates), L2 " + str(l2),
        "top1_dev_before": round(top1(current, x, y, groups), 4),
        "top1_dev_after": round(top1(weights, x, y, groups), 4),
        "right_unit_among_candidates_dev": round(reachable, 4),
        "clarify_share": clarify_threshold(weights, x, y, groups),
        "weights": {f: round(float(w), 4) for f, w in zip(FEATURES, weights)},
    }
    try:  # the answer stage's own abstain threshold is chosen by a separate grid on the dev split; keep it
        previous = json.loads(path.read_text(encoding="utf-8"))
        report.update({k: previous[k] for k in ("abstain_below", "abstain_below_note") if k in previous})
    except (FileNotFoundError, ValueError):
        pass
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report
