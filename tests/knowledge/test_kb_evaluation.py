"""Unit tests for the retrieval metrics in knowledge_base.evaluation: fake results, no model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from knowledge_base import evaluation as ev
from knowledge_base.evaluation import (
    LABEL_CORRECT,
    LABEL_INCORRECT,
    LABEL_SHOULD_ABSTAIN,
    CalibrationPoint,
    DevQuery,
    DevSetError,
    QueryOutcome,
)

DEV_SET = Path(__file__).resolve().parent.parent / "data" / "kb_dev.yaml"


# ------------------------------------------------------------------ helpers


def fake_result(ids: list[str], *, confidence: float = 0.9, abstain: bool = False):
    hits = [SimpleNamespace(entry=SimpleNamespace(id=i)) for i in ids]
    return SimpleNamespace(hits=hits, confidence=confidence, abstain=abstain)


def outcome(expect, ranked, *, abstained=False, kind="clean", topic="t", confidence=0.9) -> QueryOutcome:
    query = DevQuery(q="q", expect=tuple(expect), kind=kind)
    return ev.outcome_of(query, fake_result(ranked, confidence=confidence, abstain=abstained), topic)


class FakeKB:
    """Answers from a fixed table; entries a..e belong to topic "t1", the rest to "t2"."""

    def __init__(self, table: dict[str, tuple[list[str], float, bool]]) -> None:
        self.table = table
        self.calls: list[tuple[str, str | None]] = []

    def search(self, question, *, region=None, k=None):
        self.calls.append((question, region))
        ids, confidence, abstain = self.table[question]
        return fake_result(ids, confidence=confidence, abstain=abstain)

    def entry(self, entry_id):
        if entry_id in {"a", "b", "c", "d", "e"}:
            return SimpleNamespace(topic_name="t1")
        if entry_id in {"x", "y", "z"}:
            return SimpleNamespace(topic_name="t2")
        return None


def point(label: str, confidence: float) -> CalibrationPoint:
    return CalibrationPoint(
        q="q",
        region=None,
        label=label,
        top_id=None,
        confidence=confidence,
        top_dense=0.0,
        dense_best=0.0,
        dense_second=0.0,
        dense_margin=0.0,
        dense_rank=None,
        lexical_rank=None,
        pinyin_rank=None,
        agreement=False,
    )


# ------------------------------------------------------------------ ranking metrics


def test_reciprocal_rank_uses_first_acceptable_id():
    assert ev.reciprocal_rank(["x", "a", "b"], ["a", "b"]) == 0.5
    assert ev.reciprocal_rank(["a"], ["a"]) == 1.0
    assert ev.reciprocal_rank(["x", "y", "z"], ["a"]) == 0.0
    assert ev.reciprocal_rank([], ["a"]) == 0.0


def test_mrr_top1_top3_of_known_rankings():
    outcomes = [
        outcome(["a"], ["a", "x", "y"]),  # rr 1
        outcome(["a"], ["x", "a", "y"]),  # rr 1/2
        outcome(["a"], ["x", "y", "z", "a"]),  # rr 1/4, outside top-3
        outcome(["a"], ["x", "y", "z"]),  # rr 0
    ]
    m = ev.Metrics.of(outcomes)
    assert m.mrr == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    assert m.top1 == pytest.approx(1 / 4)
    assert m.top3 == pytest.approx(2 / 4)


def test_any_expected_id_counts_as_a_hit():
    m = ev.Metrics.of([outcome(["a", "b"], ["b", "a"])])
    assert m.top1 == 1.0 and m.mrr == 1.0


def test_ranking_metrics_ignore_abstain_but_answered_correctly_does_not():
    outcomes = [
        outcome(["a"], ["a"], abstained=True),  # ranked right, but stayed silent
        outcome(["a"], ["a"], abstained=False),
        outcome(["a"], ["x", "a"], abstained=False),  # answered wrongly
    ]
    m = ev.Metrics.of(outcomes)
    assert m.top1 == pytest.approx(2 / 3)
    assert m.answered_correctly == pytest.approx(1 / 3)


def test_ranking_metrics_skip_should_abstain_queries():
    outcomes = [outcome(["a"], ["a"]), outcome([], ["x"]), outcome([], [])]
    m = ev.Metrics.of(outcomes)
    assert (m.n, m.answerable, m.should_abstain) == (3, 1, 2)
    assert m.top1 == 1.0 and m.mrr == 1.0


# ------------------------------------------------------------------ abstain metrics


def test_abstain_precision_and_recall_on_constructed_example():
    outcomes = [
        # should abstain: 4, of which 3 abstained (TP) and 1 answered (FN)
        outcome([], ["x"], abstained=True),
        outcome([], ["x"], abstained=True),
        outcome([], [], abstained=True),
        outcome([], ["x"], abstained=False),
        # answerable: 5, of which 1 abstained (FP)
        outcome(["a"], ["a"], abstained=True),
        outcome(["a"], ["a"]),
        outcome(["a"], ["a"]),
        outcome(["a"], ["b"]),
        outcome(["a"], ["a"]),
    ]
    m = ev.Metrics.of(outcomes)
    assert m.abstained == 4
    assert m.abstain_precision == pytest.approx(3 / 4)  # TP / (TP + FP)
    assert m.abstain_recall == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert m.answered_correctly == pytest.approx(3 / 5)
    assert m.handled_correctly == pytest.approx((3 + 3) / 9)


def test_undefined_rates_are_none_not_zero():
    m = ev.Metrics.of([outcome(["a"], ["a"])])
    assert m.abstain_precision is None  # nothing abstained
    assert m.abstain_recall is None  # nothing should have been
    empty = ev.Metrics.of([])
    assert empty.top1 is None and empty.mrr is None and empty.handled_correctly is None


def test_failure_reasons():
    assert outcome(["a"], ["a"]).failure_reason is None
    assert outcome(["a"], ["b"]).failure_reason == "answered with a wrong entry"
    assert outcome(["a"], ["a"], abstained=True).failure_reason == "abstained (top-1 was right)"
    assert outcome(["a"], ["b"], abstained=True).failure_reason == "abstained, top-1 wrong"
    assert outcome([], ["b"]).failure_reason == "answered an out-of-scope question"
    assert outcome([], ["b"], abstained=True).failure_reason is None


# ------------------------------------------------------------------ evaluate / report


def test_evaluate_groups_by_topic_and_kind_and_lists_failures():
    queries = [
        DevQuery("q1", ("a",), "colloquial"),
        DevQuery("q2", ("x", "y"), "typo", "330100"),
        DevQuery("q3", (), "out_of_scope"),
        DevQuery("q4", ("b",), "colloquial"),
    ]
    kb = FakeKB(
        {
            "q1": (["a", "x"], 0.95, False),
            "q2": (["a", "x"], 0.8, False),  # wrong top-1, right at 2
            "q3": (["y"], 0.2, True),
            "q4": (["b"], 0.3, True),  # right but abstained
        }
    )
    report = ev.evaluate(kb, queries)
    # Regions are passed explicitly; "" (national) when the query has none.
    assert kb.calls == [("q1", ""), ("q2", "330100"), ("q3", ""), ("q4", "")]
    assert set(report.by_topic) == {"t1", "t2", "out_of_scope"}
    assert report.by_topic["t2"].top1 == 0.0 and report.by_topic["t2"].mrr == 0.5
    assert report.by_topic["t1"].top1 == 1.0 and report.by_topic["t1"].answered_correctly == 0.5
    assert list(report.by_kind) == ["colloquial", "typo", "out_of_scope"]
    assert report.overall.abstain_precision == 0.5 and report.overall.abstain_recall == 1.0
    assert [f["query"] for f in report.failures] == ["q2", "q4"]
    assert report.worst_failures(1)[0]["query"] == "q2"  # a wrong answer outranks a silence
    assert all(lat >= 0 for lat in report.latencies_ms) and len(report.latencies_ms) == 4

    table = report.as_table()
    assert table.splitlines()[0].startswith("| group |")
    assert "| **overall** | 4 |" in table and "topic: t1" in table and "kind: typo" in table
    d = report.as_dict()
    assert d["overall"]["n"] == 4 and len(d["failures"]) == 2 and "p95" in d["latency_ms"]


def test_evaluate_rejects_labels_naming_unknown_entries():
    with pytest.raises(DevSetError, match="nope"):
        ev.evaluate(FakeKB({}), [DevQuery("q", ("nope",), "clean")])


# ------------------------------------------------------------------ thresholds


def test_threshold_stats_and_fit():
    points = [
        point(LABEL_CORRECT, 0.95),
        point(LABEL_CORRECT, 0.9),
        point(LABEL_CORRECT, 0.6),
        point(LABEL_INCORRECT, 0.5),
        point(LABEL_SHOULD_ABSTAIN, 0.3),
        point(LABEL_SHOULD_ABSTAIN, 0.55),
        point(LABEL_SHOULD_ABSTAIN, 0.7),
    ]
    s = ev.threshold_stats(points, 0.58)  # abstains on 0.3, 0.5, 0.55
    assert s.abstained == 3
    assert s.abstain_precision == pytest.approx(2 / 3)
    assert s.abstain_recall == pytest.approx(2 / 3)
    assert s.answered_correctly == pytest.approx(3 / 4)

    # Keeping every correct answer (threshold <= 0.6) with precision >= 0.9 allows abstaining on
    # 0.3 only (0.5 is an answerable query); the fit takes the largest such threshold.
    t = ev.fit_abstain_threshold(points, min_precision=0.9)
    assert 0.3 < t <= 0.5
    # A looser precision target lets it abstain up to just below the lowest correct answer.
    t = ev.fit_abstain_threshold(points, min_precision=0.6)
    stats = ev.threshold_stats(points, t)
    assert 0.55 < t <= 0.6
    assert stats.answered_correctly == pytest.approx(3 / 4) and stats.abstain_recall == pytest.approx(2 / 3)


def test_fit_handled_objective_trades_answers_for_abstentions():
    points = [point(LABEL_CORRECT, 0.9), point(LABEL_CORRECT, 0.5)] + [
        point(LABEL_SHOULD_ABSTAIN, c) for c in (0.6, 0.65, 0.7, 0.75)
    ]
    # "answered" keeps both correct answers, so it cannot abstain on anything above 0.5.
    with pytest.raises(ValueError):
        ev.fit_abstain_threshold(points, objective="answered")
    # "handled" gives up one answer to catch four out-of-scope questions.
    t = ev.fit_abstain_threshold(points, objective="handled", min_precision=0.8)
    assert 0.75 < t <= 0.9


def test_fit_never_picks_a_threshold_that_never_abstains():
    points = [point(LABEL_CORRECT, 0.2), point(LABEL_SHOULD_ABSTAIN, 0.9)]
    with pytest.raises(ValueError, match="precision"):
        ev.fit_abstain_threshold(points)


def test_feature_quartiles():
    points = [point(LABEL_CORRECT, c) for c in (1.0, 2.0, 3.0, 4.0, 5.0)]
    q = ev.feature_quartiles(points, "confidence")
    assert q[LABEL_CORRECT] == {"n": 5, "min": 1.0, "q1": 2.0, "median": 3.0, "q3": 4.0, "max": 5.0}
    assert q[LABEL_SHOULD_ABSTAIN]["n"] == 0 and q[LABEL_SHOULD_ABSTAIN]["median"] is None


def test_percentile_interpolates():
    assert ev._percentile([0.0, 10.0], 25) == 2.5
    assert ev._percentile([], 50) is None
    assert math.isclose(ev._percentile([3.0], 95), 3.0)


# ------------------------------------------------------------------ dev-set loading


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_valid_dev_set(tmp_path):
    path = write(
        tmp_path,
        """
- q: 医保码怎么弄
  expect: [ev-activate, ev-activate-wechat]
  kind: colloquial
- q: 今天天气
  expect: abstain
  kind: out_of_scope
- q: 杭州医保电话
  expect: [hz-xiaozhi-line]
  kind: clean
  region: "330100"
""",
    )
    queries = ev.load_dev_set(path)
    assert queries[0] == DevQuery("医保码怎么弄", ("ev-activate", "ev-activate-wechat"), "colloquial")
    assert queries[1].should_abstain and queries[1].expect == ()
    assert queries[2].region == "330100"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- q: x\n  expect: [a]\n  kind: slang\n", "kind must be one of"),
        ("- q: x\n  expect: []\n  kind: clean\n", "expect must be"),
        ("- q: x\n  expect: yes\n  kind: clean\n", "expect must be"),
        ("- q: x\n  kind: clean\n", "expect must be"),
        ("- q: ''\n  expect: [a]\n  kind: clean\n", "q must be a non-empty string"),
        ("- q: 123456\n  expect: abstain\n  kind: out_of_scope\n", "quote it"),
        ("- q: x\n  expect: [a]\n  kind: clean\n  region: 330100\n", "quoted 6-digit"),
        ("- q: x\n  expect: [a]\n  kind: clean\n  region: hz\n", "6-digit"),
        ("- q: x\n  expect: [a, a]\n  kind: clean\n", "twice"),
        ("- q: x\n  expect: [a]\n  kind: out_of_scope\n", "must have expect"),
        ("- q: x\n  expect: [a]\n  kind: clean\n  note: hi\n", "unknown field"),
        ("- q: x\n  expect: [a]\n  kind: clean\n- q: x\n  expect: [b]\n  kind: clean\n", "duplicate of item 1"),
        ("- just a string\n", "expected a mapping"),
        ("q: x\n", "non-empty list"),
        ("- q: [unclosed\n", "not valid YAML"),
    ],
)
def test_load_dev_set_errors(tmp_path, text, message):
    with pytest.raises(DevSetError, match=message):
        ev.load_dev_set(write(tmp_path, text))


def test_load_dev_set_reports_every_problem_with_its_item(tmp_path):
    path = write(
        tmp_path,
        "- q: ok\n  expect: [a]\n  kind: clean\n- q: bad1\n  expect: [a]\n  kind: nope\n"
        "- q: bad2\n  expect: [zzz]\n  kind: clean\n",
    )
    with pytest.raises(DevSetError) as info:
        ev.load_dev_set(path, known_ids={"a"})
    text = str(info.value)
    assert "2 problem(s)" in text
    assert "item 2 ('bad1')" in text and "item 3 ('bad2')" in text and "unknown entry id(s) ['zzz']" in text


def test_missing_file_is_a_dev_set_error(tmp_path):
    with pytest.raises(DevSetError, match="cannot read"):
        ev.load_dev_set(tmp_path / "missing.yaml")


def test_shipped_dev_set_is_valid_and_meets_its_brief():
    """The real development set loads, labels only existing entries, and has the promised shape."""
    from knowledge_base.loader import load_corpus

    corpus = load_corpus()
    by_id = corpus.by_id()
    queries = ev.load_dev_set(DEV_SET, known_ids=by_id)
    assert len(queries) >= 230
    assert sum(q.should_abstain for q in queries) >= 40
    regional = [q for q in queries if q.region and not q.should_abstain]
    assert sum(1 for q in regional if by_id[q.expect[0]].overrides) >= 25
    # Paraphrases, not the corpus's own question variants.
    variants = {v for e in corpus.entries for v in e.questions}
    assert not [q.q for q in queries if q.q in variants]
