"""Scoring replies against the answer-quality set (tests/data/answer_set.yaml): did the resident get
the answer to the question they asked?

Used by bench/answer_eval.py, which sends each question through the hub's chat API with real Rasa
(or, with ``--direct``, straight to the answer stage), and by the reranker fit (dev split only).

Metrics, each over the items it applies to:
* ``point``: the first answer's knowledge point is one the item expects (a gap item's expected
  parent entry counts for any unit of that entry);
* ``topic``: the first citation's topic is the item's topic, or its knowledge point is one the item
  expects (a point that answers the question is on topic wherever its entry is filed: 医保卡能借给家里人用吗
  is answered by a point of "other" for an item filed under "card");
* ``fact_recall``: share of the item's key facts whose content appears in the reply (text + steps);
* ``clarifying``: share of in-scope questions answered with "which one did you mean";
* ``abstain_precision`` / ``abstain_recall``: abstaining, with out-of-scope as the positive class;
* ``wrong_region``: a question about another city's rules answered from a region pack that is not
  that city's (Hangzhou's figures for a Guangzhou question);
* ``spoken_s``: the spoken answer's length in seconds at the phone voice's pace.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ANSWER_SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "answer_set.yaml"
SPOKEN_CHARS_PER_S = 4.2  # the phone voice at normal speed, about 250 characters a minute
_STRIP = re.compile(r"[^\u3400-\u9fffA-Za-z0-9%]")
_CN_DIGITS = str.maketrans({"零": "0", "一": "1", "二": "2", "两": "2", "三": "3", "四": "4", "五": "5",
                            "六": "6", "七": "7", "八": "8", "九": "9"})
ABSTAIN_OUTCOMES = {"abstained"}


def load_items(path: Path = ANSWER_SET) -> list[dict]:
    items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    for item in items:
        item.setdefault("split", heldout_split(item["q"]))
        expect = item.get("expect")
        item["expect"] = [] if expect in (None, "abstain") else list(expect)
        item["out_of_scope"] = item.get("topic") == "out_of_scope"
    return items


def heldout_split(question: str) -> str:
    """A fixed quarter by hash, for items written without a split."""
    return "heldout" if int(hashlib.sha1(question.encode()).hexdigest(), 16) % 4 == 0 else "dev"


def _norm(text: str) -> str:
    return _STRIP.sub("", text).translate(_CN_DIGITS)


def fact_present(fact: str, reply: str) -> bool:
    """A key fact is in the reply verbatim, or nearly (most of its character pairs, numbers exact)."""
    f, r = _norm(fact), _norm(reply)
    if not f:
        return True
    if f in r:
        return True
    numbers = re.findall(r"\d+", f)
    if any(n not in r for n in numbers):
        return False
    pairs = {f[i : i + 2] for i in range(len(f) - 1)}
    return bool(pairs) and sum(p in r for p in pairs) / len(pairs) >= 0.75


def unit_matches(answer: dict, expected: str) -> bool:
    return expected in (answer.get("unit"), answer.get("point"), answer.get("entry"))


@dataclass
class Scored:
    item: dict
    outcome: str
    point_ok: bool | None
    topic_ok: bool | None
    facts_found: int
    facts_total: int
    wrong_region: bool | None
    spoken_s: float | None
    reply_text: str = ""
    answers: list = field(default_factory=list)
    offered: bool | None = None  # the right point answered, or one tap away (a quick reply or an option)


def score_reply(item: dict, reply: dict) -> Scored:
    """``reply``: outcome, text, spoken, steps, citations, answers (as the hub's bot message meta)."""
    outcome = reply.get("outcome") or "answered"
    text = "\n".join([reply.get("text") or "", *(reply.get("steps") or [])])
    answers = reply.get("answers") or []
    citations = reply.get("citations") or []
    in_scope = not item["out_of_scope"]
    point_ok = topic_ok = None
    if in_scope:
        if outcome == "answered" and answers:
            point_ok = any(unit_matches(answers[0], e) for e in item["expect"])
        elif outcome == "answered" and citations:
            point_ok = any(e in (citations[0].get("point"), citations[0].get("id")) for e in item["expect"])
        else:
            point_ok = False
        topic_ok = bool(point_ok) or (outcome == "answered" and bool(citations)
                                      and citations[0].get("topic") == item["topic"])
    facts = item.get("facts") or []
    found = sum(fact_present(f, text) for f in facts) if in_scope else 0
    wrong = None
    if item.get("city") and in_scope and outcome == "answered":
        from yibao_common.places import REGION_CODES

        code = REGION_CODES.get(item["city"].removesuffix("市").removesuffix("省"), "")
        # A pack the message itself names as the resident's own ("我杭州医保去苏州看病") is right to
        # answer: there the named city is only where care happens.
        own = {code, code[:2] + "0000"} if code else set()
        for name, named in REGION_CODES.items():  # and its province's
            if name in item["q"]:
                own |= {named, named[:2] + "0000"}
        wrong = any(c.get("region_code") not in (None, "100000") and c["region_code"] not in own for c in citations)
    offered = None
    if in_scope:
        taps = [r.get("id") for r in reply.get("related") or []] + list(reply.get("options") or [])
        offered = bool(point_ok) or any(e in taps for e in item["expect"])
    spoken = reply.get("spoken") or ""
    return Scored(
        item, outcome, point_ok, topic_ok, found, len(facts) if in_scope else 0, wrong,
        len(_norm(spoken)) / SPOKEN_CHARS_PER_S if outcome == "answered" and spoken else None,
        reply.get("text") or "", answers, offered,
    )


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarise(scored: list[Scored]) -> dict:
    in_scope = [s for s in scored if not s.item["out_of_scope"]]
    abstained = [s for s in scored if s.outcome in ABSTAIN_OUTCOMES]
    oos = [s for s in scored if s.item["out_of_scope"]]
    spoken = [s.spoken_s for s in scored if s.spoken_s is not None]
    facts_total = sum(s.facts_total for s in in_scope)
    regional = [s.wrong_region for s in scored if s.wrong_region is not None]
    return {
        "n": len(scored),
        "point": _share([bool(s.point_ok) for s in in_scope]),
        "point_offered": _share([bool(s.offered) for s in in_scope]),
        "topic": _share([bool(s.topic_ok) for s in in_scope]),
        "fact_recall": (sum(s.facts_found for s in in_scope) / facts_total) if facts_total else None,
        "clarifying": _share([s.outcome == "clarifying" for s in in_scope]),
        "abstain_precision": _share([s.item["out_of_scope"] for s in abstained]),
        "abstain_recall": _share([s.outcome in ABSTAIN_OUTCOMES for s in oos]),
        "wrong_region": sum(regional),
        "regional_questions": len(regional),
        "spoken_p50_s": statistics.median(spoken) if spoken else None,
        "spoken_p95_s": _pct(spoken, 0.95),
    }


TARGETS = {
    "point": (">=", 0.80), "topic": (">=", 0.92), "fact_recall": (">=", 0.70), "clarifying": ("<=", 0.10),
    "abstain_precision": (">=", 0.90), "wrong_region": ("<=", 0), "spoken_p95_s": ("<=", 15.0),
}


def table(rows: dict[str, dict]) -> str:
    """A markdown table of summaries (one column per split), with the targets."""
    names = ["n", "point", "point_offered", "topic", "fact_recall", "clarifying", "abstain_precision", "abstain_recall",
             "wrong_region", "spoken_p50_s", "spoken_p95_s"]
    head = "| metric | " + " | ".join(rows) + " | target |"
    out = [head, "|---|" + "---:|" * len(rows) + "---|"]
    for name in names:
        cells = []
        for summary in rows.values():
            v = summary.get(name)
            cells.append("–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        op, target = TARGETS.get(name, ("", ""))
        out.append(f"| {name} | " + " | ".join(cells) + f" | {op} {target} |")
    return "\n".join(out)


def _char_pairs(text: str) -> set[str]:
    t = _norm(text)
    return {t[i:i + 2] for i in range(len(t) - 1)}


def copies_of_answer_set(texts: list[str], items: list[dict], *, split: str | None = "heldout",
                         limit: float = 0.7) -> list[tuple[str, str, float]]:
    """(corpus text, answer-set question, similarity) for every way of asking that copies a question of
    the answer set (``split``; None for both): the same words, or most of its character pairs (Jaccard
    at or above ``limit``). A copied held-out question would be answered from memory, not measured."""
    questions = [(i["q"], _char_pairs(i["q"])) for i in items
                 if split is None or i["split"] == split]
    out = []
    for text in texts:
        pairs = _char_pairs(text)
        if not pairs:
            continue
        norm = _norm(text)
        for q, q_pairs in questions:
            if norm == _norm(q):
                out.append((text, q, 1.0))
                continue
            union = len(pairs | q_pairs)
            similarity = len(pairs & q_pairs) / union if union else 0.0
            if similarity >= limit:
                out.append((text, q, round(similarity, 3)))
    return out
