"""The answer to the question asked: from a resident's message to the knowledge point that answers it.

``KnowledgeBase.search`` finds the *area* (the best entries). This stage reads the message as a
resident wrote it (knowledge_base/questions.py: the question(s) inside a story, the story's case
slots, the places it names), scores every unit of the best entries — the entry, its knowledge
points, the passages of its answer — against the question, and decides:

* **answer** with the best unit: the precise answer first, then steps when the question asks how,
  sibling points as related questions, the citation; a spoken form short enough for the phone and
  an offer of more;
* **clarify** only when the best candidates are genuinely different questions with close scores,
  and never twice in a row;
* **abstain** when retrieval is not confident, with a polite reply that says what the assistant
  can do;
* for a question about another city's rules, answer with the national rule and say that city's
  rules decide and whom to ask.

Scoring is a linear model over a few features (``FEATURES``); its weights were fitted with
a listwise logistic regression on the development split of tests/data/answer_set.yaml
(``xiaozhi kb fit-reranker``), never on the held-out split. Two features are themselves learned: the
margins of character n-gram classifiers trained to tell every unit, and every entry, from the others
(knowledge_base/unit_classifier.py). No cross-encoder model for Chinese ships in any package this
project can install offline, and one fine-tuned here from e5-small (on the ways of asking, then on the
dev questions) ranked worse than these features and added nothing to them (docs/retrieval-quality.md).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knowledge_base.questions import (
    QUANTITY_MARKERS,
    SENTENCE_END,
    ParsedMessage,
    Place,
    core_question,
    other_agency,
    parse,
)
from knowledge_base.schema import states_figure
from knowledge_base.search import KnowledgeBase, SearchResult
from knowledge_base.text import TextProcessor
from knowledge_base.unit_classifier import UnitClassifier
from knowledge_base.units import Layout, Unit

WEIGHTS_PATH = Path(__file__).resolve().parent / "reranker.json"

FEATURES = ("dense_core", "dense_full", "dense_answer", "entry_prior", "overlap", "words_asked", "words_answer",
            "words_covered", "number", "case",
            "is_point", "is_passage", "learned", "learned_entry")

# Hand-set starting weights; reranker.json (fitted) replaces them when present.
DEFAULT_WEIGHTS = {
    "dense_core": 2.0, "dense_full": 1.0, "dense_answer": 0.5, "entry_prior": 1.2, "overlap": 1.0, "words_asked": 1.0, "words_answer": 0.5, "words_covered": 1.0,
    "number": 0.6, "case": 0.8, "is_point": 0.3, "is_passage": -0.3, "bias": 0.0,
}

CANDIDATE_ENTRIES = 5  # entries whose units are scored
# Ask "which one did you mean" only when the best unit holds less than this share of the candidates'
# softmax and a genuinely different question comes close (fitted on the dev split: see reranker.json).
CLARIFY_SHARE = 0.35
CLARIFY_RATIO = 0.6  # the runner-up's share is at least this fraction of the best one's
ANSWER_ABSTAIN = 0.25  # retrieval confidence below which the answer stage declines (fitted: reranker.json)
SHARED_ANSWERS = 512  # recent answers answer_shared keeps (a prefetched one waits for its request)
RELATED_QUESTIONS = 3  # quick replies offered under an answer
AREA_DENSE = 0.6  # (cos 0.94) a question this close to an entry's own wording is answered by the entry
PHONE_SPOKEN_CHARS = 60  # everything said for one answer: about 14 s at the phone voice's pace

HOW_TO = re.compile(r"怎么|如何|咋|流程|步骤|办理|操作|申请|在哪|哪里|去哪|手续|怎样|方法|渠道|开通|激活|绑定|添加|备案|补办")
_BIGRAM_STRIP = re.compile(r"[^\u3400-\u9fffA-Za-z0-9]")
_WORD_GAP = re.compile(r"(?<=[A-Za-z0-9])\s+(?=[A-Za-z0-9])")

# Resident-facing wording (Simplified Chinese).
MORE_OFFER_SPOKEN = "需要我详细说说吗？"
UNVERIFIED_TEXT = "（这个数字尚在核实中，请以当地医保部门的答复为准，可拨打12393医保服务热线确认。）"
UNVERIFIED_SPOKEN = "数字以医保部门答复为准。"
FOREIGN_RULE_TEXT = "以上是全国统一的规定。{city}的具体标准由{city}的医保部门确定，请以当地规定为准，可以拨打{city}的12393医保服务热线或咨询当地医保局。"
FOREIGN_RULE_SPOKEN = "{city}的标准以当地医保部门为准。"
CLARIFY_TEXT = "您想问的是下面哪一个问题？请点选，或者换个说法再问一次："
CLARIFY_SPOKEN = "您是想问{first}，还是{second}？"
NO_QUESTION_TEXT = "没有看到您的问题。请用文字告诉我您想咨询的医保事项，比如“异地就医怎么备案”。"
NO_QUESTION_SPOKEN = "没听清您的问题，请再说一遍。"
ABSTAIN_TEXT = (
    "抱歉，这个问题我回答不了。我能解答医保参保缴费、报销、异地就医、医保电子凭证等问题；"
    "其他事项可以拨打12345政务服务热线。您也可以说“转人工”，由工作人员为您解答。"
)
ABSTAIN_SPOKEN = "抱歉，这个问题我回答不了。医保的问题您可以换个说法再问，或者说转人工。"
UNSURE_AGAIN_TEXT = "抱歉，我还是没能确定您要问的问题。您可以说“转人工”，由工作人员为您解答。"
UNSURE_AGAIN_SPOKEN = "抱歉，我还是没弄明白，帮您转人工好吗？"
OTHER_AGENCY_TEXT = "这个问题不属于医保业务，医保小智回答不了。{referral}医保方面的问题，欢迎随时问我。"
OTHER_AGENCY_SPOKEN = "这个不属于医保业务。{referral}"
TWO_ANSWERS_JOIN = "\n\n"
HUMAN_BUTTON = {"title": "转人工", "payload": "/request_human"}
MORE_BUTTON_TITLE = "详细说说"


class UnitIndex:
    """Every unit of the corpus with its vector rows, for scoring the units of a few entries."""

    def __init__(self, rows: Layout, vectors: np.ndarray, text: TextProcessor) -> None:
        if len(rows.texts) != len(vectors):
            raise ValueError(f"layout has {len(rows.texts)} rows but {len(vectors)} vectors")
        self.layout = rows
        self.vectors = vectors
        self.text = text
        self.by_id = rows.by_id
        self._rows_of_unit: dict[int, list[int]] = {}
        self._answer_row: dict[int, int] = {}
        for row, unit in enumerate(rows.row_unit):
            if rows.row_is_answer[row]:
                self._answer_row[unit] = row
            else:
                self._rows_of_unit.setdefault(unit, []).append(row)
        # Words of each unit's ways of asking and of its answer, with inverse document frequencies
        # over all units: a rare word the question shares with a unit ("过期", "低保") says more
        # than a common one ("医保", "报销").
        self.text_words = [[frozenset(text.words(text.normalise(t))) for t in u.texts] for u in rows.units]
        self.asked_words = [frozenset().union(*ws) for ws in self.text_words]
        self.answer_words = [frozenset(text.words(text.normalise(u.answer, correct=False))) for u in rows.units]
        df: dict[str, int] = {}
        for a, b in zip(self.asked_words, self.answer_words):
            for w in a | b:
                df[w] = df.get(w, 0) + 1
        n = max(1, len(rows.units))
        self.idf = {w: math.log(1 + n / c) for w, c in df.items()}
        self._unseen_idf = math.log(1 + n)
        # each way of asking's own weight, with its words (the denominators of word_overlap's "covered")
        self.weighted_texts = [[(ws, sum(self.idf[w] for w in ws)) for ws in texts if ws] for texts in self.text_words]

    def question_weights(self, words: list[str]) -> dict[str, float]:
        """The question's words with their IDF weights: computed once per question, not per unit."""
        return {w: self.idf.get(w, self._unseen_idf) for w in set(words)}

    def word_overlap(self, words: list[str], unit: int,
                     weights: dict[str, float] | None = None) -> tuple[float, float, float]:
        """IDF-weighted share of the question's words found in the unit's questions, and in its answer;
        and the best share of one way of asking's words that the question says (a unit asked about
        急诊 fits "住院要带什么材料" less well than one that asks no more than that). ``weights``:
        ``question_weights(words)``, when the caller scores many units for one question."""
        qw = weights if weights is not None else self.question_weights(words)
        total = sum(qw.values())
        if not total:
            return 0.0, 0.0, 0.0
        said = qw.keys()
        asked = sum(qw[w] for w in said & self.asked_words[unit]) / total
        answered = sum(qw[w] for w in said & self.answer_words[unit]) / total
        covered = max((sum(qw[w] for w in said & ws) / own for ws, own in self.weighted_texts[unit]), default=0.0)
        return asked, answered, covered

    def units_of(self, entry_id: str) -> list[int]:
        return self.layout.by_entry.get(entry_id, [])

    def similarities(self, unit_indexes: list[int], qv: np.ndarray) -> tuple[dict[int, float], dict[int, float]]:
        """Best cosine of each unit's ways of asking against the query vector; and of its answer
        (a unit without an answer row of its own, an entry or passage, takes its asking score)."""
        rows = [r for u in unit_indexes for r in self._rows_of_unit[u]]
        if not rows:
            return {}, {}
        sims = self.vectors[rows] @ qv
        asked: dict[int, float] = {}
        i = 0
        for u in unit_indexes:
            n = len(self._rows_of_unit[u])
            asked[u] = float(np.max(sims[i : i + n]))
            i += n
        with_answers = [u for u in unit_indexes if u in self._answer_row]
        answered = dict(asked)
        if with_answers:
            answer_sims = self.vectors[[self._answer_row[u] for u in with_answers]] @ qv
            answered.update(zip(with_answers, (float(x) for x in answer_sims)))
        return asked, answered


def load_weights(path: Path = WEIGHTS_PATH) -> dict[str, float]:
    """The fitted weights (and the fitted clarification threshold, as ``clarify_share``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in data["weights"].items()}}
        for key in ("clarify_share", "abstain_below"):
            if key in data:
                weights[key] = float(data[key])
        return weights
    except (FileNotFoundError, KeyError, ValueError):
        return dict(DEFAULT_WEIGHTS)


@functools.lru_cache(maxsize=1 << 16)
def bigrams(text: str) -> frozenset[str]:
    """Character pairs of the text without punctuation or spaces, except that a space between two digits or
    Latin letters still parts them: "2025 700元" is two numbers, and 57 is in neither.

    Memoised: an answer compares the question with every way of asking of about a thousand candidate units
    (some 14,000 texts at 10,000 points), and the same units come back question after question; recut each
    time, this was 45 % of an answer's time."""
    parts = [_BIGRAM_STRIP.sub("", part) for part in _WORD_GAP.split(text)]
    pairs = frozenset(t[i : i + 2] for t in parts for i in range(len(t) - 1))
    return pairs or frozenset(t for t in parts if t)


def overlap(question: str, unit: Unit) -> float:
    """Share of the question's character bigrams found in the unit's best way of asking."""
    q = bigrams(question)
    if not q:
        return 0.0
    return max(len(q & bigrams(t)) / len(q) for t in unit.texts)


def case_agreement(case: dict[str, str], unit: Unit) -> float:
    """+1 per sub-case slot the story and the point agree on, -1 per slot they contradict."""
    score = 0.0
    for slot, value in unit.when.items():
        told = case.get(slot)
        if told is None:
            continue
        score += 1.0 if told == value else -1.0
    return score


def number_fit(question: str, unit: Unit) -> float:
    """Asked how many / how much / how long: the unit that states a figure fits, one without does not."""
    if not QUANTITY_MARKERS.search(question):
        return 0.0
    return 1.0 if states_figure(unit.answer) else -1.0


def _dense(cos: float) -> float:
    """e5 cosines bunch between 0.8 and 1.0: spread them to a comparable scale."""
    return (cos - 0.88) * 10.0


@dataclass
class Candidate:
    unit: Unit
    features: dict[str, float]
    score: float = 0.0
    share: float = 0.0  # softmax of the scores over this question's candidates

    @property
    def probability(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.score))


@dataclass
class QuestionAnswer:
    question: str
    result: SearchResult
    candidates: list[Candidate]
    confidence: float
    abstain: bool

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass
class Context:
    """What the dialogue knows: the resident's region and what the bot did last turn."""

    region: str | None = None
    last_outcome: str | None = None
    deployment_region: str = ""


@dataclass
class Reply:
    outcome: str
    text: str
    spoken: str
    citations: list[dict] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    buttons: list[dict] = field(default_factory=list)
    related: list[dict] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)
    more: dict | None = None
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "outcome": self.outcome, "text": self.text, "spoken": self.spoken, "citations": self.citations,
            "steps": self.steps, "buttons": self.buttons, "related": self.related, "answers": self.answers,
            "more": self.more, **self.meta,
        }


class Answerer:
    def __init__(self, kb: KnowledgeBase, units: UnitIndex, weights: dict[str, float] | None = None,
                 classifier: UnitClassifier | None = None) -> None:
        self.kb = kb
        self.units = units
        # Without a fitted classifier its feature is 0 for every unit: the other features rank.
        self.classifier = classifier
        self.weights = weights or load_weights()
        self.clarify_share = self.weights.pop("clarify_share", CLARIFY_SHARE)
        # Below this retrieval confidence the stage declines. Lower than the search's own threshold:
        # questions for other agencies are already declined by name (questions.other_agency), and
        # residents' real wording sits further from the corpus than the team's paraphrases do.
        self.abstain_below = self.weights.pop("abstain_below", ANSWER_ABSTAIN)
        self._shared: OrderedDict[tuple, Future] = OrderedDict()  # answer_shared's recent answers
        self._shared_lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Pickled (the build worker hands a base over, knowledge_base/build_worker.py) without the kept
        answers and their lock: a new base starts with none."""
        state = dict(self.__dict__)
        del state["_shared"], state["_shared_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._shared = OrderedDict()
        self._shared_lock = threading.Lock()

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, features: dict[str, float]) -> float:
        w = self.weights
        return w.get("bias", 0.0) + sum(w.get(name, 0.0) * features.get(name, 0.0) for name in FEATURES)

    def candidates(self, question: str, parsed: ParsedMessage, region: str | None) -> QuestionAnswer:
        core = core_question(question)
        full = self.kb.search(question, region=region, k=CANDIDATE_ENTRIES)
        searches = [full]
        if core != question and len(core) >= 4:
            searches.append(self.kb.search(core, region=region, k=CANDIDATE_ENTRIES))
        prior: dict[str, float] = {}
        for result in searches:
            top = result.hits[0].score if result.hits else 1.0
            for hit in result.hits:
                prior[hit.entry.id] = max(prior.get(hit.entry.id, 0.0), hit.score / top)
        confidence = max(r.confidence for r in searches)
        best_result = max(searches, key=lambda r: r.confidence)
        if not prior:
            return QuestionAnswer(question, best_result, [], confidence, True)
        qv_full = self.kb.embedder.encode_one(self.kb.text.normalise(question))
        qv_core = self.kb.embedder.encode_one(self.kb.text.normalise(core)) if core != question else qv_full
        unit_prior: dict[int, float] = {}
        applies = set(self.kb.regions.chain(region))
        for entry_id, value in prior.items():
            for u in self._units_answering(entry_id):
                point = self.units.layout.units[u].point
                if point is not None and point.region.code not in applies:
                    continue  # a city's point under a national entry ("在杭州生的宝宝…") answers only there
                unit_prior[u] = max(unit_prior.get(u, 0.0), value)
        indexes = list(unit_prior)
        sims_full, answer_sims = self.units.similarities(indexes, qv_full)
        sims_core = self.units.similarities(indexes, qv_core)[0] if core != question else sims_full
        words = self.kb.text.words(self.kb.text.normalise(question))
        weights = self.units.question_weights(words)
        learned, learned_entry = self._learned(question, indexes)
        out = []
        for u in indexes:
            unit = self.units.layout.units[u]
            words_asked, words_answer, words_covered = self.units.word_overlap(words, u, weights)
            features = {
                "dense_core": _dense(sims_core[u]),
                "dense_full": _dense(sims_full[u]),
                "dense_answer": _dense(answer_sims[u]),
                "entry_prior": unit_prior[u],
                "overlap": max(overlap(core, unit), overlap(question, unit)),
                "words_asked": words_asked,
                "words_answer": words_answer,
                "words_covered": words_covered,
                "number": number_fit(core, unit),
                "case": case_agreement(parsed.case, unit),
                "is_point": float(unit.kind == "point"),
                "is_passage": float(unit.kind == "passage"),
                "learned": learned.get(u, 0.0),
                "learned_entry": learned_entry.get(u, 0.0),
            }
            out.append(Candidate(unit, features, self.score(features)))
        out.sort(key=lambda c: -c.score)
        if out:
            top = out[0].score
            weights = [math.exp(c.score - top) for c in out]
            total = sum(weights)
            for c, w in zip(out, weights):
                c.share = w / total
        return QuestionAnswer(question, best_result, out, confidence, confidence < self.abstain_below)

    def _learned(self, question: str, indexes: list[int]) -> tuple[dict[int, float], dict[int, float]]:
        """The unit classifier's margin per candidate unit, and the entry classifier's margin for the
        unit's entry. A point or entry published after the fit is scored from its ways of asking (an
        entry from all of its units'); a passage (an answer's sentence, not a way of asking) is unknown
        to the unit classifier but takes its entry's margin."""
        if self.classifier is None or not indexes:
            return {}, {}
        units = self.units.layout.units
        texts = {units[u].id: units[u].texts for u in indexes if units[u].kind != "passage"}
        scores = self.classifier.scores(question, {units[u].id for u in indexes}, texts)
        learned = {u: scores[units[u].id] for u in indexes}
        if self.classifier.entries is None:
            return learned, {}
        entry_texts: dict[str, list[str]] = {}
        for u in indexes:
            entry_id = units[u].entry.id
            if entry_id not in entry_texts:
                entry_texts[entry_id] = [t for i in self.units.units_of(entry_id) if units[i].kind != "passage"
                                         for t in units[i].texts]
        entry_scores = self.classifier.entries.scores(question, entry_texts, entry_texts)
        return learned, {u: entry_scores[units[u].entry.id] for u in indexes}

    def _units_answering(self, entry_id: str) -> list[int]:
        """An entry's units; a local entry also brings the points of the national entry it replaces
        that state no local figure (what is true everywhere stays answerable, precisely). A point whose
        figure is local but whose answer states none, only that the local rule decides ("补卡收不收费、收多少，
        以当地规定为准"), comes too: without it a Hangzhou resident asking the fee was told about lost cards."""
        out = list(self.units.units_of(entry_id))
        entry = self.kb.entries.get(entry_id)
        if entry is not None and entry.overrides:
            for u in self.units.units_of(entry.overrides):
                unit = self.units.layout.units[u]
                if unit.kind == "point" and not (unit.point.local_figure and states_figure(unit.answer)):
                    out.append(u)
        return out

    # -- the decision -------------------------------------------------------------------------------
    def answer(self, message: str, context: Context | None = None) -> Reply:
        context = context or Context()
        return self._once_only(self._decide(message, context.region, context.deployment_region), context)

    def answer_shared(self, message: str, context: Context | None = None) -> Reply:
        """``answer``, computed once for the same message and region however many callers ask, and
        kept for the next few hundred: the hub starts it while Rasa still parses the message
        (conversation.py) and the action's request joins that work. The Reply is shared: read it, never
        change it."""
        context = context or Context()
        key = (message, context.region, context.deployment_region)
        with self._shared_lock:
            future = self._shared.get(key)
            owner = future is None
            if owner:
                future = self._shared[key] = Future()
                if len(self._shared) > SHARED_ANSWERS:
                    self._shared.popitem(last=False)
            else:
                self._shared.move_to_end(key)
        if owner:
            try:
                future.set_result(self._decide(*key))
            except BaseException as exc:
                with self._shared_lock:
                    if self._shared.get(key) is future:
                        del self._shared[key]
                future.set_exception(exc)
        return self._once_only(future.result(), context)

    def _once_only(self, reply: Reply, context: Context) -> Reply:
        """Never "which one did you mean" twice in a row: after a clarifying turn, a person is offered."""
        if reply.outcome == "clarifying" and context.last_outcome == "clarifying":
            meta = {k: v for k, v in reply.meta.items() if k != "options"}
            return Reply("abstained", UNSURE_AGAIN_TEXT, UNSURE_AGAIN_SPOKEN, buttons=[HUMAN_BUTTON],
                         meta={**meta, "reason": "unsure_after_clarifying"})
        return reply

    def _decide(self, message: str, region: str | None, deployment_region: str) -> Reply:
        """The reply to ``message`` in ``region``, before the never-twice rule (``_once_only``)."""
        context = Context(region=region, deployment_region=deployment_region)
        parsed = parse(message)
        if not parsed.questions:
            return Reply("abstained", NO_QUESTION_TEXT, NO_QUESTION_SPOKEN, buttons=[HUMAN_BUTTON],
                         meta={"reason": "no_question"})
        agency = other_agency(parsed.text)
        if agency is not None:
            return Reply("abstained", OTHER_AGENCY_TEXT.format(referral=agency.referral),
                         OTHER_AGENCY_SPOKEN.format(referral=agency.referral), buttons=[HUMAN_BUTTON],
                         meta={"reason": "other_agency", "agency": agency.name, "questions": parsed.questions})
        region, foreign = self._region_for(parsed, context)
        found = [self.candidates(q, parsed, region) for q in parsed.questions]
        for i in range(1, len(found)):
            if found[i].confidence < self.kb.abstain_threshold:
                # A follow-up that names nothing of its own ("…要不要加区号，直接打会转到哪里", "有哪些方法？")
                # is read with the question before it. Alone it found some unrelated point: on the dev
                # split's 61 such follow-ups, 59 read together land on a point that answers them.
                together = self.candidates(_joined(parsed.questions[i - 1], parsed.questions[i]), parsed, region)
                if together.confidence > found[i].confidence:
                    found[i] = together
        meta = {
            "questions": parsed.questions,
            "case": parsed.case,
            "relation": parsed.relation,
            "places": [p.__dict__ for p in parsed.places],
            "region_used": region or "",
            "search": {
                "confidence": round(max(f.confidence for f in found), 4),
                "abstain": all(f.abstain for f in found),
                "candidates": [c.unit.id for c in (found[0].candidates[:5] if found else [])],
            },
            "kb_confidence": round(max(f.confidence for f in found), 4),
        }
        answerable = [f for f in found if not f.abstain and f.best is not None]
        if not answerable:
            return Reply("abstained", ABSTAIN_TEXT, ABSTAIN_SPOKEN, buttons=[HUMAN_BUTTON], meta=meta)
        if len(answerable) == 1:
            options = self._clarify_options(answerable[0])
            area = self._area_answer(answerable[0]) if options else None
            if area is not None:
                # Unsure between precise points but sure of the area: the broad answer beats a question back.
                answerable[0].candidates.insert(0, area)
                options = []
            if options:
                return self._clarify(options, meta)
        # Two questions that land on the same unit are one answer.
        chosen: list[QuestionAnswer] = []
        for f in answerable:
            if all(f.best.unit.id != c.best.unit.id for c in chosen):
                chosen.append(f)
        return self._compose(chosen, foreign, meta)

    def _region_for(self, parsed: ParsedMessage, context: Context) -> tuple[str | None, Place | None]:
        """Which region's rules answer; and the place whose own rules decide, when it is not ours."""
        region = context.region or context.deployment_region or None
        known = set(self.kb.regions.chain(region)) if region else set()
        # Where the resident is insured decides before a place only mentioned ("我常住上海，参保在杭州").
        for place in sorted(parsed.places, key=lambda p: p.role != "insured"):
            if place.role == "destination":
                continue  # where the resident goes for care: their insured region's rules still apply
            chain = self.kb.regions.chain(place.code)
            if place.code in known or (region and region in chain and region != "100000"):
                if place.role == "insured":
                    break  # insured where we are: the other places are where care happens or only mentioned
                continue
            if place.code in self.kb.regions.regions and place.code != "100000":
                return place.code, None  # a region pack we hold answers for that place
            return place.code, place
        return region, None

    def _clarify_options(self, found: QuestionAnswer) -> list[Candidate]:
        """Two or three genuinely different questions the resident may mean, when none stands out."""
        best = found.best
        if best is None or best.share >= self.clarify_share:
            return []
        options = [best]
        for c in found.candidates[1:]:
            if c.share < best.share * CLARIFY_RATIO:
                break
            if c.unit.kind != "point" or any(c.unit.entry.id == o.unit.entry.id for o in options):
                continue  # the same area asked differently is not a different question
            asked = bigrams(c.unit.question)
            if asked and len(asked & bigrams(best.unit.question)) / len(asked) > 0.6:
                continue
            options.append(c)
            if len(options) == 3:
                break
        return options if len(options) >= 2 else []

    def _area_answer(self, found: QuestionAnswer) -> Candidate | None:
        """The broad entry asked most nearly the way the question is put, when it is that close."""
        entries = [c for c in found.candidates if c.unit.kind == "entry"]
        best = max(entries, key=lambda c: c.features.get("dense_full", 0.0), default=None)
        return best if best is not None and best.features.get("dense_full", 0.0) >= AREA_DENSE else None

    def _clarify(self, options: list[Candidate], meta: dict) -> Reply:
        questions = [_as_question(o.unit) for o in options]
        return Reply(
            "clarifying",
            CLARIFY_TEXT,
            CLARIFY_SPOKEN.format(first=questions[0].rstrip("？?"), second=questions[1].rstrip("？?")),
            buttons=[{"title": q, "payload": q} for q in questions] + [HUMAN_BUTTON],
            meta={**meta, "options": [o.unit.id for o in options]},
        )

    # -- composing the reply --------------------------------------------------------------------------
    def _compose(self, chosen: list[QuestionAnswer], foreign: Place | None, meta: dict) -> Reply:
        texts, spokens, citations, steps, answers = [], [], [], [], []
        first = chosen[0].best.unit
        extra = len(MORE_OFFER_SPOKEN) if _has_more(first) else 0
        if foreign is not None:
            extra += len(FOREIGN_RULE_SPOKEN.format(city=foreign.name))
        budget = max(24, (PHONE_SPOKEN_CHARS - extra) // len(chosen))
        for f in chosen:
            unit = f.best.unit
            text = unit.answer
            spoken = _first_sentences(unit.spoken, budget)
            if not unit.verified and states_figure(unit.answer):
                text += UNVERIFIED_TEXT
                if "为准" not in spoken:
                    spoken = _first_sentences(unit.spoken, budget - len(UNVERIFIED_SPOKEN)) + UNVERIFIED_SPOKEN
            if len(chosen) > 1:
                text = f"关于“{_as_question(unit).rstrip('？?')}”：{text}"
            texts.append(text)
            spokens.append(spoken)
            citations.append(unit.citation())
            if unit.entry.steps and HOW_TO.search(core_question(f.question)) and not steps:
                steps = list(unit.entry.steps)
            answers.append({
                "question": f.question, "unit": unit.id, "kind": unit.kind, "entry": unit.entry.id,
                "point": unit.point.id if unit.point else None, "topic": unit.entry.topic_name,
                "score": round(f.best.score, 3), "confidence": round(f.confidence, 4),
            })
        text = TWO_ANSWERS_JOIN.join(texts)
        spoken = "".join(spokens)
        if foreign is not None:
            text += "\n\n" + FOREIGN_RULE_TEXT.format(city=foreign.name)
            spoken += FOREIGN_RULE_SPOKEN.format(city=foreign.name)
        more = None
        if _has_more(first):
            more = {"entry": first.entry.id, "unit": first.id}
            spoken += MORE_OFFER_SPOKEN
        related = self._related(chosen[0])
        buttons = [{"title": r["question"], "payload": r["question"]} for r in related]
        if more:
            buttons.insert(0, {"title": MORE_BUTTON_TITLE, "payload": "/ask_more"})
        return Reply(
            "answered", text, spoken, citations=citations, steps=steps, buttons=buttons, related=related,
            answers=answers, more=more, meta={**meta, "foreign_region": foreign.code if foreign else None},
        )

    def _related(self, found: QuestionAnswer, n: int = RELATED_QUESTIONS) -> list[dict]:
        """The questions offered as quick replies: the next knowledge points of the ranking, best first.

        When the answer misread the question, what the resident meant is most often the runner-up, and
        as often a point of another entry as a sibling (dev split, out of fold: of 154 questions answered
        with a wrong point, the right one was among the next three points for 108, among the answer's
        siblings for 56). So the ranking decides, not the entry; a sibling keeps the last place when the
        runners-up all come from other entries, as the question the resident is likely to ask next."""
        best = found.best.unit
        points = [c.unit for c in found.candidates[1:] if c.unit.kind == "point" and c.unit.id != best.id]
        picked = points[:n]
        if picked and all(u.entry.id != best.entry.id for u in picked):
            sibling = next((u for u in points if u.entry.id == best.entry.id), None)
            if sibling is not None:
                picked = picked[:n - 1] + [sibling]
        return [{"id": u.id, "question": u.question} for u in picked]

    def more(self, entry_id: str, region: str | None = None) -> Reply | None:
        """The whole entry, for "详细说说" after a precise answer."""
        entry = self.kb.entry(entry_id, region)
        if entry is None:
            return None
        return Reply(
            "answered", entry.answer, entry.spoken + (" 办理步骤我也可以一步步告诉您。" if entry.steps else ""),
            citations=[entry.citation()], steps=list(entry.steps),
            answers=[{"unit": entry.id, "kind": "entry", "entry": entry.id, "topic": entry.topic_name}],
        )


def _joined(before: str, question: str) -> str:
    return before + question if before.endswith(tuple(SENTENCE_END + "，,")) else before + "，" + question


def _as_question(unit: Unit) -> str:
    q = unit.point.question if unit.point is not None else unit.entry.title
    return q if q.endswith(("？", "?")) else q + "？"


def _first_sentences(text: str, limit: int) -> str:
    """As many whole sentences as fit in ``limit`` characters; a first sentence longer than that is
    cut at its last clause boundary that fits (a caller on the phone can ask for the rest)."""
    sentences = [s for s in re.split(r"(?<=[。！？；])", text) if s]
    out = ""
    for s in sentences:
        if out and len(out) + len(s) > limit:
            break
        out += s
    out = out or text
    if len(out) > limit:
        cut = max(out.rfind(mark, 0, limit) for mark in "，、；：")
        if cut > limit // 3:
            out = out[:cut] + "。"
    return out


def _has_more(unit: Unit) -> bool:
    """Something beyond the precise answer: the entry's steps, or a longer answer than was given."""
    return bool(unit.entry.steps) or len(unit.entry.answer) > len(unit.answer) + 20

