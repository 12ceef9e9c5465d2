"""The unit classifier: a learned feature that tells sibling questions apart by the few characters
that separate them, trained on the corpus's ways of asking and labelled residents' questions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from knowledge_base.answers import FEATURES, Answerer
from knowledge_base.rerank_fit import FOLDS, entry_labelled_questions, fold_of, labelled_questions
from knowledge_base.unit_classifier import (
    UNKNOWN,
    UnitClassifier,
    _vectorizer,
    entry_of,
    fit_unit_classifier,
    training_rows,
)


@dataclass(frozen=True)
class FakeEntry:
    id: str


@dataclass
class FakeUnit:  # the attributes training_rows and entry_of read from knowledge_base.units.Unit
    id: str
    kind: str
    texts: tuple[str, ...]
    entry: FakeEntry = FakeEntry("family")


SIBLINGS = [
    FakeUnit("family.max", "point", ("亲情账户最多能加几个人", "亲情账户能绑几个家人", "医保码最多添加几位亲属", "亲情账户人数上限是多少")),
    FakeUnit("family.by-several", "point", ("一个人能被几个人绑进亲情账户", "孩子能同时被爸爸妈妈绑定吗", "老人能被两个子女同时添加吗")),
    FakeUnit("family.face", "point", ("给家人加亲情账户要刷脸吗", "添加亲情账户需要本人人脸识别吗", "绑定家人要不要本人刷脸")),
    FakeUnit("family", "entry", ("医保电子凭证亲情账户", "怎么给家人开亲情账户")),
    FakeUnit("family#s1", "passage", ("亲情账户可以添加多位家人。",)),
]


@pytest.fixture(scope="module")
def small() -> UnitClassifier:
    return fit_unit_classifier(*training_rows(SIBLINGS, [("我跟我姐都想绑我妈，一个人能被两个人绑吗", "family.by-several"),
                                                         ("no such unit", "gone.unit")]))


def test_training_rows_take_ways_of_asking_and_known_labels_not_passages():
    texts, ids = training_rows(SIBLINGS, [("问题一", "family.max"), ("问题二", "gone.unit")])
    assert "family#s1" not in ids  # a passage is an answer's sentence, not a way of asking
    assert ("问题一", "family.max") in zip(texts, ids)
    assert "问题二" not in texts  # a label whose unit no longer exists is dropped
    assert len(texts) == sum(len(u.texts) for u in SIBLINGS if u.kind != "passage") + 1


def test_the_separating_words_pick_the_sibling(small):
    ids = [u.id for u in SIBLINGS]
    for question, right in [("亲情账户最多可以加几个", "family.max"),
                            ("我妈能同时被我和我哥两个人绑吗", "family.by-several"),
                            ("加亲情账户一定要刷脸吗", "family.face")]:
        scores = small.scores(question, ids)
        assert max(scores, key=scores.get) == right, scores
    assert small.scores("亲情账户最多可以加几个", ["family#s1"]) == {"family#s1": UNKNOWN}


def test_its_tfidf_rows_are_scikit_learns(small):
    """Scoring rebuilds the TF-IDF rows from the stored arrays; they must equal the fitted vectorizer's."""
    texts, _ids = training_rows(SIBLINGS)
    reference = _vectorizer().fit(texts + ["我跟我姐都想绑我妈，一个人能被两个人绑吗"])
    probe = ["亲情账户最多能加几个人？", "刷脸", "完全不相干的句子xyz"]
    np.testing.assert_allclose(small.transform(probe).toarray(), reference.transform(probe).toarray(), atol=1e-9)


def test_save_and_load_keep_the_scores(small, tmp_path):
    path = tmp_path / "c.npz"
    small.save(path)
    again = UnitClassifier.load(path)
    ids = [u.id for u in SIBLINGS]
    for q in ("亲情账户最多可以加几个", "要刷脸吗"):
        a, b = small.scores(q, ids), again.scores(q, ids)
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    assert again.trained_on == small.trained_on
    assert UnitClassifier.load(tmp_path / "missing.npz") is None


def test_the_out_of_fold_parts_split_the_dev_questions_and_labels_follow_questions():
    folds = {fold_of(f"问题{i}") for i in range(200)}
    assert folds == set(range(FOLDS))
    items = [{"q": "补一张社保卡要几天，补卡收钱吗", "out_of_scope": False, "expect": ["card.days", "card.fee"]},
             {"q": "公积金怎么取", "out_of_scope": True, "expect": []}]
    assert labelled_questions(items) == [("补一张社保卡要几天", "card.days"), ("补卡收钱吗", "card.fee")]


def test_the_answer_stage_scores_candidates_with_a_fitted_classifier(knowledge_base, small):
    """With a classifier (``xiaozhi kb fit-reranker`` writes one) every candidate gets its margin as the
    ``learned`` feature; the corpus's units are unknown to this small one, so they are scored from their
    ways of asking. Without a classifier the feature is 0 for every unit and the others rank, as before."""
    base: Answerer = knowledge_base.answerer
    assert "learned" in FEATURES
    question = "亲情账户最多能绑几个人"
    with_it = Answerer(knowledge_base, base.units, {**base.weights, "learned": 1.0}, classifier=small)
    learned = {c.unit.id: c.features["learned"] for c in with_it.candidates(question, answerer_parse(question), "330100").candidates}
    assert len(set(learned.values())) > 1 and all(v > UNKNOWN for k, v in learned.items() if "#" not in k)
    bare = Answerer(knowledge_base, base.units, dict(base.weights))
    found = bare.candidates(question, answerer_parse(question), "330100")
    assert {c.features["learned"] for c in found.candidates} == {0.0}
    assert {c.features["learned_entry"] for c in found.candidates} == {0.0}


def test_every_unit_of_an_entry_takes_its_entrys_margin(knowledge_base):
    """``learned_entry``: the entry classifier's margin for the candidate's entry, the same for the
    entry, its points and its passages; an entry the fit never saw is scored from its units' ways of asking."""
    base: Answerer = knowledge_base.answerer
    units = base.units.layout.units
    known = [u for u in units if u.entry.id in ("ev-family-add", "ev-family-use") and u.kind != "passage"]
    classifier = fit_unit_classifier(*training_rows(known), entry_of(known))
    answerer = Answerer(knowledge_base, base.units, dict(base.weights), classifier=classifier)
    question = "亲情账户最多能绑几个人"
    found = answerer.candidates(question, answerer_parse(question), "330100").candidates
    by_entry: dict[str, set[float]] = {}
    for c in found:
        by_entry.setdefault(c.unit.entry.id, set()).add(c.features["learned_entry"])
    assert all(len(values) == 1 for values in by_entry.values()), by_entry
    assert by_entry["ev-family-add"] != by_entry["ev-family-use"]
    others = [v for e, vs in by_entry.items() if e not in ("ev-family-add", "ev-family-use") for v in vs]
    # unseen entries: scored from their ways of asking (each its own margin), not all given UNKNOWN
    assert others and all(v != UNKNOWN for v in others) and len(set(others)) == len(others)


def answerer_parse(text):
    from knowledge_base.questions import parse

    return parse(text)


def test_a_unit_published_after_the_fit_is_scored_from_its_ways_of_asking():
    """Staff publish new knowledge points between refits (issue 18): such a point is scored by the
    fitted line from centroid cosine to margin, not buried under UNKNOWN."""
    known = [u for u in SIBLINGS if u.id != "family.face"]
    classifier = fit_unit_classifier(*training_rows(known))
    a, b = classifier.fallback
    assert a > 0  # more alike, higher margin
    face = next(u for u in SIBLINGS if u.id == "family.face")
    texts = {face.id: face.texts}
    asked = classifier.scores("加亲情账户一定要本人刷脸吗", [face.id, "family.max"], texts)
    unrelated = classifier.scores("生育津贴什么时候到账", [face.id], texts)
    assert asked[face.id] > unrelated[face.id] > UNKNOWN
    assert asked["family.max"] == classifier.scores("加亲情账户一定要本人刷脸吗", ["family.max"])["family.max"]
    assert classifier.scores("加亲情账户一定要本人刷脸吗", [face.id]) == {face.id: UNKNOWN}  # no texts given


def test_a_published_units_centroid_is_computed_once_until_its_ways_of_asking_change(monkeypatch):
    """Profiled in bench/kb_publish.py: with thousands of points published since the fit, recomputing
    their centroids in every answer took 84 % of the answer's time."""
    import knowledge_base.unit_classifier as uc

    known = [u for u in SIBLINGS if u.id != "family.face"]
    classifier = fit_unit_classifier(*training_rows(known))
    face = next(u for u in SIBLINGS if u.id == "family.face")
    first = classifier.scores("加亲情账户一定要本人刷脸吗", [face.id], {face.id: face.texts})
    made = []
    real = uc._centroids
    monkeypatch.setattr(uc, "_centroids", lambda transform, groups: made.append(groups) or real(transform, groups))
    again = classifier.scores("加亲情账户一定要本人刷脸吗", [face.id], {face.id: face.texts})
    assert again == first and made == []
    edited = (*face.texts, "亲情账户添加家人要刷脸认证吗")
    changed = classifier.scores("加亲情账户一定要本人刷脸吗", [face.id], {face.id: edited})
    assert len(made) == 1
    classifier._centroid_of.clear()
    assert changed == classifier.scores("加亲情账户一定要本人刷脸吗", [face.id], {face.id: edited}) != first


# Two areas that share their words: the service hall's "what to bring" and the reimbursement materials.
AREAS = [
    FakeUnit("hall", "entry", ("医保大厅在哪里", "去医保窗口办事"), FakeEntry("hall")),
    FakeUnit("hall.materials", "point", ("去医保窗口办事要带什么", "医保办事需要什么材料", "去医保局要带啥证件"),
             FakeEntry("hall")),
    FakeUnit("hall.hours", "point", ("医保大厅几点上班", "周末医保窗口开门吗"), FakeEntry("hall")),
    FakeUnit("manual", "entry", ("手工报销要准备哪些材料", "零星报销材料清单"), FakeEntry("manual")),
    FakeUnit("manual.list", "point", ("手工报销一般要带哪些材料", "自己垫了钱去报账要带哪些东西"), FakeEntry("manual")),
    FakeUnit("manual.inpatient", "point", ("住院费用报销比门诊多要什么", "出院后报销需要什么病历"), FakeEntry("manual")),
]


def test_the_entry_classifier_learns_the_area_from_every_unit_and_entry_labels(tmp_path):
    """Entry-level labels (tests/data/kb_dev.yaml names entries) teach which *area* a question is
    about: the entry classifier pools an entry's and its points' ways of asking, so a question that
    shares 需要什么材料 with the hall's point still lands on the reimbursement area it asks about."""
    labelled = [("住院的钱报销要交哪些单子", "manual"), ("看病垫付的钱回来报要带啥", "manual"),
                ("去医保大厅办业务带什么证件", "hall")]
    texts, ids = training_rows(AREAS, labelled)
    assert entry_of(AREAS) == {u.id: u.entry.id for u in AREAS}
    classifier = fit_unit_classifier(texts, ids, entry_of(AREAS))
    assert classifier.entries is not None and sorted(classifier.entries.unit_ids) == ["hall", "manual"]
    scores = classifier.entries.scores("住院了报销需要带什么材料", ["hall", "manual"])
    assert scores["manual"] > scores["hall"], scores
    hall = classifier.entries.scores("去医保窗口需要带身份证吗", ["hall", "manual"])
    assert hall["hall"] > hall["manual"], hall
    path = tmp_path / "c.npz"
    classifier.save(path)
    again = UnitClassifier.load(path)
    assert again.entries is not None and again.entries.scores("住院了报销需要带什么材料", ["hall", "manual"]) == \
        pytest.approx(scores, abs=1e-5)
    # a fit without entries (the earlier format) loads without them: the answer stage's entry feature is 0
    fit_unit_classifier(texts, ids).save(path)
    assert UnitClassifier.load(path).entries is None


def test_entry_labelled_questions_leave_out_abstentions_and_follow_multi_questions(tmp_path):
    dev = tmp_path / "kb_dev.yaml"
    dev.write_text("""
- q: 亲情帐户怎么加家人
  expect: [ev-family-add, ev-family-use]
  kind: colloquial
- q: 备案要带啥，多久能批下来
  expect: [cr-materials, cr-check-status]
  kind: multi
- q: 办慢病证需要带些啥证明材料，要不要住院病历
  expect: [cd-materials]
  kind: multi
- q: 公积金怎么取
  expect: abstain
  kind: out_of_scope
""", encoding="utf-8")
    assert entry_labelled_questions(dev) == [
        ("亲情帐户怎么加家人", "ev-family-add"),  # the best entry, not an alternative
        ("备案要带啥", "cr-materials"), ("多久能批下来", "cr-check-status"),
        ("办慢病证需要带些啥证明材料", "cd-materials"), ("要不要住院病历", "cd-materials"),
    ]
