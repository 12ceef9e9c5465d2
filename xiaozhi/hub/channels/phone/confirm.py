"""Check what was heard before answering on the phone (issue 20, part 3).

A long spoken question is where the recogniser slips and where retrieval is least sure. Before such a
turn is answered, the hotline says the question it understood in one short sentence — the knowledge
point's own question, "您是想问外地生孩子怎么报销，对吗？" — and answers only after a yes (是/对/嗯,
or key 1). A no (不是/不对, key 2) asks the caller to say it again more briefly or press 0 for a
person: a misheard story never gets a long wrong answer. Anything else the caller says is taken as a
new question.

When to confirm (``PhoneConfirmation.check``), for speech turns only:

* the recogniser was unsure (its confidence below ``min_asr_confidence``), or
* the turn is long (at least ``story_chars`` characters: a story, not a question) and it was not both
  heard well (confidence ``story_asr_confidence``) and answered surely (the answer stage's retrieval
  confidence for every question answered at least ``min_kb_confidence``; a "which one did you mean"
  is unsure). On the 40 long fixtures, clean and at 10 dB (their recognised text through the answer
  stage), these thresholds left no wrong answer unconfirmed; 12 of 80 were answered at once.

Nothing is confirmed when the answer stage has no knowledge point to name (it declines, or the turn
is no question): the dialogue's own reply then says so. Short, clearly heard questions are not
checked at all, so they cost no extra time. Chat and the widget never come here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONFIRM_SPOKEN = "我确认一下，您是想问{question}，对吗？"  # the first clause is the same every time: cached, heard at once
REPHRASE_SPOKEN = "抱歉，我没听准。请您简短地再说一遍您的问题，或者按0转人工。"

_BARE = re.compile(r"[\s\W_]+", re.UNICODE)
_YES = re.compile(r"^(?:是|是的|是啊|是呀|对|对的|对啊|对呀|对对|对对对|嗯|嗯嗯|嗯对|没错|没错儿|正确|就是|就是这个|就是这个意思|对就是|是这个|好|好的|可以|1|一|yes|ok)")
_NO = re.compile(r"^(?:不是|不对|错了|不不|没有|不是的|不太对|不完全是|不|2|二|no)")
ESCALATION_WORDS = ("转人工", "人工客服", "人工服务", "找人工", "真人", "接线员")


def yes_or_no(text: str) -> tuple[str | None, str]:
    """("yes" | "no" | None, what the caller said after it). A short reply is a yes or a no;
    "不是，我想问…" is a no followed by the question said again; a long reply is a new question."""
    bare = _BARE.sub("", text).lower()
    if not bare:
        return None, ""
    no = _NO.match(bare)
    if no is not None:
        rest = bare[no.end():]
        return "no", rest if len(rest) >= 4 else ""
    yes = _YES.match(bare)
    if yes is not None and len(bare) - yes.end() <= 4:
        return "yes", ""
    return None, text


def said_question(question: str) -> str:
    """A knowledge point's question (or an entry's title) as the confirmation says it."""
    return question.rstrip("？?。 ")


def confirmation_texts(corpus) -> list[str]:
    """Every confirmation the hotline can say with this corpus, one per knowledge point and entry: the
    hotline pre-renders them with the spoken answers, so the question clause of "我确认一下，您是想问…，
    对吗？" is not rendered while the caller waits."""
    questions = [*(p.question for p in getattr(corpus, "points", [])), *(e.title for e in corpus.entries)]
    return list(dict.fromkeys(CONFIRM_SPOKEN.format(question=said_question(q)) for q in questions))


@dataclass
class Pending:
    """A confirmation asked and not yet answered."""

    question: str  # the point's question, as said to the caller (without the final ？)
    heard: str  # what the caller was heard to say
    unit: str  # the knowledge unit it names


class PhoneConfirmation:
    """Decides whether a phone turn is confirmed first, and with which question.

    Args:
        answerer: returns the knowledge base's answer stage (``knowledge_base.answers.Answerer``) or None.
        min_asr_confidence: below this recogniser confidence any turn is confirmed.
        story_chars: turns at least this long (characters, punctuation not counted) are stories.
        story_asr_confidence: a story heard with less confidence than this is confirmed.
        min_kb_confidence: a story whose answer's retrieval confidence is below this is confirmed.
    """

    def __init__(self, answerer: Callable[[], object | None], *, min_asr_confidence: float = 0.55,
                 story_chars: int = 30, story_asr_confidence: float = 0.8, min_kb_confidence: float = 0.7) -> None:
        self._answerer = answerer
        self.min_asr_confidence = min_asr_confidence
        self.story_chars = story_chars
        self.story_asr_confidence = story_asr_confidence
        self.min_kb_confidence = min_kb_confidence
        self._units: dict[str, object] | None = None

    async def check(self, text: str, confidence: float | None, region: str | None) -> Pending | None:
        """The question to confirm before answering ``text`` (a speech turn), or None to answer at once."""
        bare = _BARE.sub("", text)
        unsure_heard = confidence is not None and confidence < self.min_asr_confidence
        if len(bare) < 6 or any(w in text for w in ESCALATION_WORDS):
            return None  # a short reply to the bot, or a request for a person: never held up
        if not unsure_heard and len(bare) < self.story_chars:
            return None
        answerer = self._answerer()
        if answerer is None:
            return None
        from knowledge_base.answers import Context

        try:
            # the context the dialogue's own answer request will give, so its query vectors are cached
            context = Context(region=region, deployment_region=getattr(answerer.kb, "default_region", ""))
            reply = await asyncio.to_thread(answerer.answer, text, context)
        except Exception:  # the check is a safeguard: failing it must not lose the turn
            log.exception("phone: the confirmation check failed; answering directly")
            return None
        unit = self._named_unit(answerer, reply)
        if unit is None:
            return None
        if not unsure_heard and reply.outcome == "answered":
            heard_well = confidence is None or confidence >= self.story_asr_confidence
            if heard_well and min(a.get("confidence", 0.0) for a in reply.answers) >= self.min_kb_confidence:
                return None  # heard well and answered with confidence
        question = said_question(unit.point.question if unit.point is not None else unit.entry.title)
        return Pending(question=question, heard=text, unit=unit.id)

    def _named_unit(self, answerer, reply):
        """The knowledge unit the answer stage would answer with (or offers first), if any."""
        if reply.outcome == "answered" and reply.answers:
            unit_id = reply.answers[0].get("unit")
        elif reply.outcome == "clarifying" and reply.meta.get("options"):
            unit_id = reply.meta["options"][0]
        else:
            return None
        if self._units is None:
            self._units = {u.id: u for u in answerer.units.layout.units}
        return self._units.get(unit_id)


KEYS = {"1": "yes", "2": "no"}


async def before_reply(confirmation: PhoneConfirmation, conversations, conv, state: dict, text: str, *, source: str,
                       confidence: float | None):
    """The phone channel's step before the dialogue: (a turn to say instead of answering, or None; the
    text the dialogue gets). ``state`` is the call's own dict (``Call.metadata``): it holds the
    confirmation asked last turn. Every word the caller says is stored, also when it is not answered."""
    from telephony.voice import BotTurn

    pending: Pending | None = state.pop("confirm", None)
    if pending is not None:
        answer = KEYS.get(text) if source == "keypad" else yes_or_no(text)[0]
        if answer == "yes":
            await conversations.post(conv.id, "resident", text, {"confirms": pending.question})
            log.info("phone: conversation %s confirmed the question understood (%s)", conv.id, pending.unit)
            return None, pending.question + "？"
        if answer == "no" and not (source == "speech" and yes_or_no(text)[1]):
            await conversations.post(conv.id, "resident", text, {"declines": pending.question})
            await conversations.post(conv.id, "bot", REPHRASE_SPOKEN,
                                     {"outcome": "clarifying", "confirming": True, "spoken": REPHRASE_SPOKEN})
            log.info("phone: conversation %s: not the question understood (%s); asked to say it again",
                     conv.id, pending.unit)
            return BotTurn(REPHRASE_SPOKEN), ""
        # anything else (a "不是，…" that goes on included) is the question itself, asked again
    if source != "speech":
        return None, text
    ask = await confirmation.check(text, confidence, conv.region_code or None)
    if ask is None:
        return None, text
    spoken = CONFIRM_SPOKEN.format(question=ask.question)
    await conversations.post(conv.id, "resident", text, {"confirming": ask.question, "asr_confidence": confidence})
    await conversations.post(conv.id, "bot", spoken, {"outcome": "clarifying", "confirming": True, "spoken": spoken,
                                                     "unit": ask.unit})
    state["confirm"] = ask
    log.info("phone: conversation %s: confirming the question understood (%s, recogniser confidence %s)",
             conv.id, ask.unit, confidence)
    return BotTurn(spoken, confirming=True), text
