"""The held-out quarter of the answer set stays a measure: no way of asking in the knowledge base copies
one of its questions (the unit classifier and the embeddings learn the corpus's ways of asking, so a
copied held-out question would be answered from memory); and no way of asking is taught to two
knowledge points at once (the classifier would learn the same words for both)."""

from __future__ import annotations

import re

from knowledge_base.answer_eval import copies_of_answer_set, load_items, score_reply
from knowledge_base.loader import load_corpus


def _corpus_texts() -> list[str]:
    corpus = load_corpus()
    return ([t for p in corpus.points for t in (p.question, *p.asks)]
            + [q for e in corpus.entries for q in e.questions])


def test_no_way_of_asking_copies_a_held_out_question():
    copies = copies_of_answer_set(_corpus_texts(), load_items(), split="heldout", limit=0.7)
    assert copies == [], "\n".join(f"{t} ~ {q} ({s})" for t, q, s in copies)


def test_a_copy_is_found_verbatim_or_nearly():
    items = [{"q": "亲情账户最多可以绑定几个人？", "split": "heldout"}, {"q": "医保卡丢了怎么补", "split": "dev"}]
    found = copies_of_answer_set(["亲情账户最多可以绑定几个人", "亲情账户最多可以绑几个人呢", "新生儿怎么参保",
                                  "医保卡丢了怎么补"], items)
    assert [(t, s) for t, _q, s in found] == [("亲情账户最多可以绑定几个人", 1.0), ("亲情账户最多可以绑几个人呢", 0.714)]
    assert len(copies_of_answer_set(["医保卡丢了怎么补"], items, split=None)) == 1


def test_no_way_of_asking_belongs_to_two_points():
    owners: dict[str, set[str]] = {}
    for point in load_corpus().points:
        for text in (point.question, *point.asks):
            owners.setdefault(re.sub(r"[^\u3400-\u9fffA-Za-z0-9]", "", text), set()).add(point.id)
    shared = {text: sorted(ids) for text, ids in owners.items() if len(ids) > 1}
    assert shared == {}


def test_a_right_point_is_on_topic_wherever_its_entry_is_filed():
    item = {"q": "医保卡能借给家里人用吗", "topic": "card", "expect": ["ot-no-lend.lend"], "out_of_scope": False,
            "facts": []}
    right = {"outcome": "answered", "answers": [{"unit": "ot-no-lend.lend", "point": "ot-no-lend.lend",
                                                 "entry": "ot-no-lend"}],
             "citations": [{"id": "ot-no-lend", "point": "ot-no-lend.lend", "topic": "other"}], "text": "不能。"}
    neighbour = {**right, "answers": [{"unit": "ca-lost.report", "point": "ca-lost.report", "entry": "ca-lost"}],
                 "citations": [{"id": "ca-lost", "point": "ca-lost.report", "topic": "card"}]}
    elsewhere = {**right, "answers": [{"unit": "pa-family-share.how", "point": "pa-family-share.how",
                                       "entry": "pa-family-share"}],
                 "citations": [{"id": "pa-family-share", "point": "pa-family-share.how", "topic": "personal_account"}]}
    assert score_reply(item, right).topic_ok and score_reply(item, right).point_ok
    assert score_reply(item, neighbour).topic_ok and not score_reply(item, neighbour).point_ok
    assert not score_reply(item, elsewhere).topic_ok


def test_a_right_point_one_tap_away_is_offered_but_not_answered():
    item = {"q": "医保卡能借给家里人用吗", "topic": "card", "expect": ["ot-no-lend.lend"], "out_of_scope": False,
            "facts": []}
    misread = {"outcome": "answered", "answers": [{"unit": "pa-family-share.how", "point": "pa-family-share.how",
                                                   "entry": "pa-family-share"}],
               "related": [{"id": "pa-family-share.who", "question": "家庭共济能给谁用？"}], "text": "…"}
    scored = score_reply(item, misread)
    assert not scored.point_ok and not scored.offered
    tap = {**misread, "related": [{"id": "ot-no-lend.lend", "question": "医保卡能借给别人用吗？"}]}
    assert not score_reply(item, tap).point_ok and score_reply(item, tap).offered
    asked_back = {"outcome": "clarifying", "options": ["ca-lost.report", "ot-no-lend.lend"], "text": "…"}
    assert not score_reply(item, asked_back).point_ok and score_reply(item, asked_back).offered
