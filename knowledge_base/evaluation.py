"""Measure how well the knowledge base finds the right entry, and when it should stay silent.

The development set (``tests/data/kb_dev.yaml``) is a list of questions as residents ask them, each
labelled with the entry ids that answer it (best first) or with ``abstain`` when nothing in the
corpus does. ``evaluate`` runs every question through ``KnowledgeBase.search`` and reports:

* top-1 / top-3 accuracy and MRR over the answerable questions, judged on the ranking alone
  (whether or not the search abstained), so ranking quality and the abstain decision can be
  tuned separately;
* abstain precision and recall, with "should abstain" as the positive class;
* the "answered correctly" rate: the search did not abstain and its first hit is acceptable,
  which is what a resident actually experiences.

Everything is broken down per topic (of the first expected entry; ``out_of_scope`` for abstain
questions) and per kind of phrasing (colloquial, elderly, typo, ...).

``calibration_points`` exposes the evidence ``KnowledgeBase._confidence`` combines, labelled, so
the abstain threshold (and the calibration constants) can be fitted; ``fit_abstain_threshold``
does the former.

Run against the real knowledge base with ``xiaozhi kb eval [dev-set.yaml]`` (``main``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from knowledge_base.config import KnowledgeBaseConfig

ABSTAIN = "abstain"
OUT_OF_SCOPE = "out_of_scope"
KINDS = ("colloquial", "elderly", "typo", "homophone", "multi", OUT_OF_SCOPE, "clean")
DEFAULT_DEV_SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "kb_dev.yaml"
# Deeper than the served top_k (5) so that MRR still credits a right entry ranked 6th..10th.
EVAL_DEPTH = 10

LABEL_CORRECT = "correct"
LABEL_INCORRECT = "incorrect"
LABEL_SHOULD_ABSTAIN = "should_abstain"


class DevSetError(ValueError):
    """The development set file is malformed; the message lists every problem found."""


# ---------------------------------------------------------------------------------------------
# The development set


@dataclass(frozen=True)
class DevQuery:
    q: str
    expect: tuple[str, ...]  # acceptable entry ids, best first; empty when the KB must abstain
    kind: str
    region: str | None = None  # GB/T 2260 code; None: national baseline only

    @property
    def should_abstain(self) -> bool:
        return not self.expect


_ALLOWED_KEYS = {"q", "expect", "kind", "region"}


def load_dev_set(path: str | Path, *, known_ids: Iterable[str] | None = None) -> list[DevQuery]:
    """Read and validate a development set; every problem is collected into one ``DevSetError``.

    ``known_ids`` (the corpus's entry ids), when given, also catches labels that name no entry,
    which would otherwise silently count as misses.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DevSetError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DevSetError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, list) or not doc:
        raise DevSetError(f"{path}: expected a non-empty list of queries at the top level")

    known = set(known_ids) if known_ids is not None else None
    queries: list[DevQuery] = []
    problems: list[str] = []
    seen: dict[tuple[str, str | None], int] = {}
    for index, item in enumerate(doc, start=1):
        where = f"item {index}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with q, expect, kind, got {type(item).__name__}")
            continue
        if isinstance(item.get("q"), str):
            where += f" ({item['q'][:30]!r})"
        item_problems: list[str] = []
        unknown_keys = set(item) - _ALLOWED_KEYS
        if unknown_keys:
            item_problems.append(f"unknown field(s) {sorted(unknown_keys)}; allowed: {sorted(_ALLOWED_KEYS)}")

        q = item.get("q")
        if not isinstance(q, str) or not q.strip():
            # A bare number such as 123456 is read by YAML as an int: say how to keep it text.
            hint = " (quote it so YAML reads it as text)" if isinstance(q, (int, float)) else ""
            item_problems.append(f"q must be a non-empty string{hint}")

        expect_raw = item.get("expect")
        expect: tuple[str, ...] = ()
        if expect_raw == ABSTAIN:
            expect = ()
        elif isinstance(expect_raw, list) and expect_raw and all(isinstance(e, str) and e for e in expect_raw):
            expect = tuple(expect_raw)
            if len(set(expect)) != len(expect):
                item_problems.append(f"expect lists an id twice: {list(expect)}")
            if known is not None:
                missing = [e for e in expect if e not in known]
                if missing:
                    item_problems.append(f"expect names unknown entry id(s) {missing}")
        else:
            item_problems.append(f'expect must be a non-empty list of entry ids or "{ABSTAIN}", got {expect_raw!r}')

        kind = item.get("kind")
        if kind not in KINDS:
            item_problems.append(f"kind must be one of {list(KINDS)}, got {kind!r}")
        elif kind == OUT_OF_SCOPE and expect_raw != ABSTAIN:
            item_problems.append(f'kind {OUT_OF_SCOPE} must have expect: "{ABSTAIN}"')

        region = item.get("region")
        if region is not None:
            if isinstance(region, int):
                item_problems.append(f'region must be a quoted 6-digit code such as "330100", got {region!r}')
            elif not (isinstance(region, str) and len(region) == 6 and region.isdigit()):
                item_problems.append(f"region must be a 6-digit GB/T 2260 code, got {region!r}")

        if not item_problems:
            key = (q.strip(), region)
            if key in seen:
                item_problems.append(f"duplicate of item {seen[key]}")
            else:
                seen[key] = index
        if item_problems:
            problems.extend(f"{where}: {p}" for p in item_problems)
            continue
        queries.append(DevQuery(q=q.strip(), expect=expect, kind=kind, region=region))

    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise DevSetError(f"{len(problems)} problem(s) in {path}:\n{listing}")
    return queries


# ---------------------------------------------------------------------------------------------
# Scoring


def hit_ids(result: Any) -> list[str]:
    """The ranked entry ids of a ``SearchResult`` (or anything with ``hits[i].entry.id``)."""
    return [h.entry.id for h in result.hits]


def reciprocal_rank(ranked: Sequence[str], expect: Iterable[str]) -> float:
    """1/rank of the first acceptable id, 0 when none is ranked."""
    wanted = set(expect)
    for rank, entry_id in enumerate(ranked, start=1):
        if entry_id in wanted:
            return 1.0 / rank
    return 0.0


@dataclass
class QueryOutcome:
    """What happened to one question."""

    query: DevQuery
    topic: str
    ranked: list[str]
    confidence: float
    abstained: bool
    latency_ms: float = 0.0

    @property
    def top1_correct(self) -> bool:
        return bool(self.ranked) and self.ranked[0] in self.query.expect

    @property
    def top3_correct(self) -> bool:
        return any(e in self.query.expect for e in self.ranked[:3])

    @property
    def rr(self) -> float:
        return reciprocal_rank(self.ranked, self.query.expect)

    @property
    def answered_correctly(self) -> bool:
        return not self.abstained and self.top1_correct

    @property
    def handled_correctly(self) -> bool:
        """The right behaviour: a correct answer, or silence where none exists."""
        return self.abstained if self.query.should_abstain else self.answered_correctly

    @property
    def failure_reason(self) -> str | None:
        if self.query.should_abstain:
            return None if self.abstained else "answered an out-of-scope question"
        if self.answered_correctly:
            return None
        if not self.abstained:
            return "answered with a wrong entry"
        return "abstained (top-1 was right)" if self.top1_correct else "abstained, top-1 wrong"

    def as_failure(self) -> dict:
        rank = None
        for i, entry_id in enumerate(self.ranked, start=1):
            if entry_id in self.query.expect:
                rank = i
                break
        return {
            "query": self.query.q,
            "region": self.query.region,
            "kind": self.query.kind,
            "expected": list(self.query.expect) or ABSTAIN,
            "got": self.ranked[:3],
            "expected_rank": rank,
            "confidence": round(self.confidence, 4),
            "abstained": self.abstained,
            "reason": self.failure_reason,
        }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass
class Metrics:
    """The scores of one group of questions. Rates are None when their denominator is empty."""

    n: int
    answerable: int
    should_abstain: int
    top1: float | None
    top3: float | None
    mrr: float | None
    answered_correctly: float | None  # over answerable questions
    handled_correctly: float | None  # over all questions: right answer, or abstained when it should
    abstain_precision: float | None
    abstain_recall: float | None
    abstained: int

    @classmethod
    def of(cls, outcomes: Sequence[QueryOutcome]) -> "Metrics":
        answerable = [o for o in outcomes if not o.query.should_abstain]
        negatives = [o for o in outcomes if o.query.should_abstain]
        predicted = [o for o in outcomes if o.abstained]
        true_pos = sum(1 for o in negatives if o.abstained)
        return cls(
            n=len(outcomes),
            answerable=len(answerable),
            should_abstain=len(negatives),
            top1=_ratio(sum(o.top1_correct for o in answerable), len(answerable)),
            top3=_ratio(sum(o.top3_correct for o in answerable), len(answerable)),
            mrr=(sum(o.rr for o in answerable) / len(answerable)) if answerable else None,
            answered_correctly=_ratio(sum(o.answered_correctly for o in answerable), len(answerable)),
            handled_correctly=_ratio(sum(o.handled_correctly for o in outcomes), len(outcomes)),
            abstain_precision=_ratio(true_pos, len(predicted)),
            abstain_recall=_ratio(true_pos, len(negatives)),
            abstained=len(predicted),
        )


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class EvalReport:
    overall: Metrics
    by_topic: dict[str, Metrics]
    by_kind: dict[str, Metrics]
    outcomes: list[QueryOutcome]

    @property
    def latencies_ms(self) -> list[float]:
        return [o.latency_ms for o in self.outcomes]

    @property
    def failures(self) -> list[dict]:
        return [o.as_failure() for o in self.outcomes if not o.handled_correctly]

    def worst_failures(self, n: int = 20) -> list[dict]:
        """The failures that hurt residents most first.

        A confident wrong answer is worse than a silence, so wrong answers and answered
        out-of-scope questions come first (most confident first); then abstentions, those whose
        right entry was not even ranked before those that only lacked confidence.
        """

        def severity(o: QueryOutcome) -> tuple:
            if not o.abstained:
                return (0, -o.confidence)
            return (1, -(1.0 - o.rr), o.confidence)

        bad = sorted((o for o in self.outcomes if not o.handled_correctly), key=severity)
        return [o.as_failure() for o in bad[:n]]

    def latency_summary(self) -> dict[str, float | None]:
        lat = self.latencies_ms
        return {
            "mean": statistics.fmean(lat) if lat else None,
            "p50": _percentile(lat, 50),
            "p95": _percentile(lat, 95),
            "max": max(lat) if lat else None,
        }

    def as_dict(self) -> dict:
        return {
            "overall": asdict(self.overall),
            "by_topic": {k: asdict(v) for k, v in self.by_topic.items()},
            "by_kind": {k: asdict(v) for k, v in self.by_kind.items()},
            "latency_ms": self.latency_summary(),
            "failures": self.failures,
        }

    def as_table(self) -> str:
        header = (
            "| group | n | top-1 | top-3 | MRR | answered ✓ | handled ✓ | abstain P | abstain R |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )

        def fmt(x: float | None) -> str:
            return "–" if x is None else f"{x:.3f}"

        def row(name: str, m: Metrics) -> str:
            cells = [
                name,
                str(m.n),
                fmt(m.top1),
                fmt(m.top3),
                fmt(m.mrr),
                fmt(m.answered_correctly),
                fmt(m.handled_correctly),
                fmt(m.abstain_precision),
                fmt(m.abstain_recall),
            ]
            return "| " + " | ".join(cells) + " |"

        lines = [header, row("**overall**", self.overall)]
        lines += [row(f"topic: {t}", m) for t, m in self.by_topic.items()]
        lines += [row(f"kind: {k}", m) for k, m in self.by_kind.items()]
        lat = self.latency_summary()
        if lat["mean"] is not None:
            lines.append("")
            lines.append(
                f"latency ms: mean {lat['mean']:.1f}, p50 {lat['p50']:.1f}, p95 {lat['p95']:.1f}, max {lat['max']:.1f}"
            )
        return "\n".join(lines)


def score(outcomes: Sequence[QueryOutcome]) -> EvalReport:
    """Aggregate per-question outcomes; pure arithmetic, no knowledge base needed."""
    topics: dict[str, list[QueryOutcome]] = {}
    kinds: dict[str, list[QueryOutcome]] = {}
    for o in outcomes:
        topics.setdefault(o.topic, []).append(o)
        kinds.setdefault(o.query.kind, []).append(o)
    # Stable, readable order: topics by size, kinds in the vocabulary's order.
    by_topic = {t: Metrics.of(v) for t, v in sorted(topics.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
    by_kind = {k: Metrics.of(kinds[k]) for k in KINDS if k in kinds}
    return EvalReport(overall=Metrics.of(outcomes), by_topic=by_topic, by_kind=by_kind, outcomes=list(outcomes))


def _topic_lookup(kb: Any) -> Callable[[str], str | None]:
    def topic_of(entry_id: str) -> str | None:
        entry = kb.entry(entry_id)
        return entry.topic_name if entry is not None else None

    return topic_of


def _check_labels(queries: Sequence[DevQuery], topic_of: Callable[[str], str | None]) -> None:
    unknown = sorted({e for q in queries for e in q.expect if topic_of(e) is None})
    if unknown:
        raise DevSetError(f"the development set names entries the knowledge base does not have: {unknown}")


def _region(query: DevQuery) -> str:
    # "" (national) rather than None: None would fall back to the deployment's default region,
    # and the numbers must not depend on how the machine running them is configured.
    return query.region or ""


def outcome_of(query: DevQuery, result: Any, topic: str, latency_ms: float = 0.0) -> QueryOutcome:
    return QueryOutcome(
        query=query,
        topic=topic,
        ranked=hit_ids(result),
        confidence=float(result.confidence),
        abstained=bool(result.abstain),
        latency_ms=latency_ms,
    )


def evaluate(kb: Any, queries: Sequence[DevQuery], *, k: int = EVAL_DEPTH) -> EvalReport:
    """Search every question and score the results (see the module docstring for the metrics)."""
    topic_of = _topic_lookup(kb)
    _check_labels(queries, topic_of)
    outcomes = []
    for query in queries:
        start = time.perf_counter()
        result = kb.search(query.q, region=_region(query), k=k)
        latency_ms = (time.perf_counter() - start) * 1000.0
        topic = OUT_OF_SCOPE if query.should_abstain else (topic_of(query.expect[0]) or "unknown")
        outcomes.append(outcome_of(query, result, topic, latency_ms))
    return score(outcomes)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class CalibrationPoint:
    """The evidence ``KnowledgeBase._confidence`` combines for one question, and its label."""

    q: str
    region: str | None
    label: str  # correct | incorrect | should_abstain (correct = top-1 acceptable)
    top_id: str | None
    confidence: float
    top_dense: float  # dense cosine of the fused top hit (0 when the dense ranker missed it)
    dense_best: float  # the best dense cosine of any allowed entry
    dense_second: float
    dense_margin: float  # dense_best - dense_second
    dense_rank: int | None  # ranks of the fused top hit in each ranker (1 = first)
    lexical_rank: int | None
    pinyin_rank: int | None
    agreement: bool  # the lexical and dense rankers both put the top hit first

    def as_dict(self) -> dict:
        return asdict(self)


def calibration_points(kb: Any, queries: Sequence[DevQuery], *, k: int = EVAL_DEPTH) -> list[CalibrationPoint]:
    """Label every question and collect the features the confidence is computed from.

    The dense runner-up score is not carried by the hits (they are in fused order), so the
    backend's rankings are asked for again exactly as ``KnowledgeBase.search`` asks for them.
    """
    topic_of = _topic_lookup(kb)
    _check_labels(queries, topic_of)
    points = []
    for query in queries:
        region = _region(query)
        result = kb.search(query.q, region=region, k=k)
        prepared = kb.prepare(query.q)
        dense: list[tuple[str, float]] = []
        if prepared.normalised.strip():
            dense = kb.rank(prepared, region, depth=max(50, k * 4)).dense
        dense_best = dense[0][1] if dense else 0.0
        dense_second = dense[1][1] if len(dense) > 1 else 0.0
        best = result.hits[0] if result.hits else None
        if query.should_abstain:
            label = LABEL_SHOULD_ABSTAIN
        elif best is not None and best.entry.id in query.expect:
            label = LABEL_CORRECT
        else:
            label = LABEL_INCORRECT
        points.append(
            CalibrationPoint(
                q=query.q,
                region=query.region,
                label=label,
                top_id=best.entry.id if best else None,
                confidence=float(result.confidence),
                top_dense=float(best.dense) if best is not None and best.dense is not None else 0.0,
                dense_best=float(dense_best),
                dense_second=float(dense_second),
                dense_margin=float(dense_best - dense_second),
                dense_rank=best.dense_rank if best else None,
                lexical_rank=best.lexical_rank if best else None,
                pinyin_rank=best.pinyin_rank if best else None,
                agreement=bool(best and best.lexical_rank == 1 and best.dense_rank == 1),
            )
        )
    return points


@dataclass
class ThresholdStats:
    """What abstaining below ``threshold`` (confidence < threshold) would do on the labelled points."""

    threshold: float
    answered_correctly: float | None  # correct and not abstained, over answerable points
    handled_correctly: float | None  # answered correctly or rightly abstained, over all points
    abstain_precision: float | None
    abstain_recall: float | None
    abstained: int


def threshold_stats(points: Sequence[CalibrationPoint], threshold: float) -> ThresholdStats:
    answerable = [p for p in points if p.label != LABEL_SHOULD_ABSTAIN]
    negatives = [p for p in points if p.label == LABEL_SHOULD_ABSTAIN]
    abstained = [p for p in points if p.confidence < threshold]
    true_pos = sum(1 for p in negatives if p.confidence < threshold)
    answered_ok = sum(1 for p in answerable if p.label == LABEL_CORRECT and p.confidence >= threshold)
    return ThresholdStats(
        threshold=threshold,
        answered_correctly=_ratio(answered_ok, len(answerable)),
        handled_correctly=_ratio(answered_ok + true_pos, len(points)),
        abstain_precision=_ratio(true_pos, len(abstained)),
        abstain_recall=_ratio(true_pos, len(negatives)),
        abstained=len(abstained),
    )


def candidate_thresholds(points: Sequence[CalibrationPoint]) -> list[float]:
    """Every threshold that changes a decision: midpoints between distinct confidences, plus the ends."""
    values = sorted({p.confidence for p in points})
    if not values:
        return []
    mids = [(a + b) / 2.0 for a, b in zip(values, values[1:])]
    return [0.0, *mids, values[-1] + 1e-9]


def sweep_thresholds(points: Sequence[CalibrationPoint]) -> list[ThresholdStats]:
    return [threshold_stats(points, t) for t in candidate_thresholds(points)]


def fit_abstain_threshold(
    points: Sequence[CalibrationPoint], *, min_precision: float = 0.9, objective: str = "answered"
) -> float:
    """The confidence threshold that maximises the objective while abstain precision >= min_precision.

    ``objective="answered"`` maximises the answered-correctly rate. Abstaining can only lower it,
    so on its own it would pick the smallest threshold that abstains at all; ties are therefore
    broken by abstain recall (then by the larger threshold), i.e. the fit abstains on as many
    out-of-scope questions as it can without losing a correct answer the optimum keeps.
    ``objective="handled"`` maximises right behaviour over all questions (correct answers plus
    correct abstentions), which trades the two against each other.

    A threshold that never abstains has no precision; it does not meet the constraint, because a
    knowledge base that answers every out-of-scope question is not acceptable. Raises
    ``ValueError`` when no threshold meets the constraint.
    """
    if objective not in ("answered", "handled"):
        raise ValueError(f"objective must be 'answered' or 'handled', got {objective!r}")
    feasible = [
        s
        for s in sweep_thresholds(points)
        if s.abstain_precision is not None and s.abstain_precision >= min_precision
    ]
    if not feasible:
        raise ValueError(f"no threshold reaches abstain precision {min_precision}")

    def key(s: ThresholdStats) -> tuple:
        main = s.answered_correctly if objective == "answered" else s.handled_correctly
        return (main or 0.0, s.abstain_recall or 0.0, s.threshold)

    return max(feasible, key=key).threshold


def feature_quartiles(points: Sequence[CalibrationPoint], feature: str = "top_dense") -> dict[str, dict]:
    """Min, quartiles and max of one feature per label: how well it separates the labels."""
    out: dict[str, dict] = {}
    for label in (LABEL_CORRECT, LABEL_INCORRECT, LABEL_SHOULD_ABSTAIN):
        values = [float(getattr(p, feature)) for p in points if p.label == label]
        out[label] = {
            "n": len(values),
            "min": min(values) if values else None,
            "q1": _percentile(values, 25),
            "median": _percentile(values, 50),
            "q3": _percentile(values, 75),
            "max": max(values) if values else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None, config: KnowledgeBaseConfig) -> int:
    """Evaluate the configured knowledge base on a development set and print the report."""
    import argparse
    import json

    from knowledge_base.factory import open_knowledge_base

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dev_set", nargs="?", default=str(DEFAULT_DEV_SET))
    parser.add_argument("--failures", type=int, default=20, help="how many of the worst failures to list")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    args = parser.parse_args(argv)

    kb = open_knowledge_base(config)
    queries = load_dev_set(args.dev_set, known_ids=kb.entries)
    report = evaluate(kb, queries)
    points = calibration_points(kb, queries)
    fits = {}
    for objective in ("answered", "handled"):
        try:
            t = fit_abstain_threshold(points, objective=objective)
            fits[objective] = asdict(threshold_stats(points, t))
        except ValueError as exc:
            fits[objective] = {"error": str(exc)}
    current = asdict(threshold_stats(points, kb.abstain_threshold))
    if args.json:
        doc = {
            **report.as_dict(),
            "top_dense_quartiles": feature_quartiles(points),
            "threshold_current": current,
            "threshold_fit": fits,
        }
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return 0
    print(report.as_table())
    print(f"\n## {args.failures} worst failures\n")
    for f in report.worst_failures(args.failures):
        print(json.dumps(f, ensure_ascii=False))
    print("\n## top dense score per label\n")
    for label, q in feature_quartiles(points).items():
        print(label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in q.items()}))
    print(f"\n## abstain threshold\n\ncurrent ({kb.abstain_threshold}): {current}")
    for objective, fit in fits.items():
        print(f"fit ({objective}): {fit}")
    return 0
