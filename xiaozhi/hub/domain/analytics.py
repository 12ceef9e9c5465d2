"""精准分析: figures for agency staff (supervisor and up) over a date range (Prometheus metrics: metrics.py).

Everything is computed from the hub's own tables (conversations, messages, escalations, surveys).
Definitions (docs/analytics.md; ``DEFINITIONS`` holds the one-line text the page shows):
- a conversation *counts as asked* when the resident wrote at least once;
- *resolution* of a closed conversation with a question, from evidence, not from the absence of an
  escalation (``classify``): confirmed (survey solved/rated >= 4, or the resident's last message is
  thanks / understood), answered but unconfirmed (the last answer had good confidence, no sign either
  way), unresolved (ended on a clarifying question, an abstention, a decline, a low-confidence
  answer, a repeated or rephrased question, a "不对/没用/听不懂" reply, a survey saying not solved, or
  the same resident came back about the same topic within 72 hours), escalated, abandoned;
- *contained* (自助解决): confirmed + answered-unconfirmed, over closed conversations with a question;
- *escalation rate*: escalated / asked;
- *abandoned*: the resident left before an agent took the conversation (its escalation was never
  claimed and the conversation closed), or the resident's last question got no reply;
- *knowledge gaps*: resident questions whose reply abstained, only clarified, or was answered from
  the knowledge base with a search confidence (``kb_confidence``) below the abstain threshold,
  grouped by the knowledge-base entry nearest to them (or, without a knowledge base, by their
  normalised text), so staff see what the corpus lacks. The NLU intent confidence (``confidence``)
  is another scale and is not used;
- *answer quality per entry*: how often an entry answered, and how often the resident then thanked,
  rephrased or disputed, or was escalated;
- *waiting time* (live queue only): escalation created -> claimed, or -> closed for a resident who
  gave up waiting; out-of-hours callback tickets are reported apart (created -> called back);
  *handling time*: claimed -> closed.
Personal data: question samples, contacts and comments pass mask_pii before they leave here; repeat
contact is matched on a keyed hash of the caller's number and on the widget's random visitor id.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from statistics import mean

import yaml
from sqlalchemy import select

from knowledge_base.schema import TOPIC_LABELS
from xiaozhi.hub.domain.desk import CALLBACK_TEXT
from xiaozhi.hub.domain.surveys import LOCAL_TZ, Survey
from xiaozhi.hub.infra.store import Conversation, Escalation, Message, Store, aware
from yibao_common.masking import mask_pii

GAP_OUTCOMES = ("abstained", "clarifying")
INTENT_LABELS_FILE = Path(__file__).resolve().parent / "intent_labels.yaml"
_CALLBACK_PREFIX = CALLBACK_TEXT.split("{", 1)[0]


_PROVINCE_FULL = {
    "150000": "内蒙古自治区",
    "450000": "广西壮族自治区",
    "540000": "西藏自治区",
    "640000": "宁夏回族自治区",
    "650000": "新疆维吾尔自治区",
}


def _region_names() -> dict[str, str]:
    """GB/T 2260 code -> name for regions the knowledge base has no entry for (yibao_common/places.py,
    the vocabulary the dialogue reads too)."""
    from yibao_common.places import CODE_NAMES

    names = {}
    for code, name in CODE_NAMES.items():
        if code in _PROVINCE_FULL:
            names[code] = _PROVINCE_FULL[code]
        elif code[:2] in ("11", "12", "31", "50") or not code.endswith("0000"):
            names[code] = name + "市"
        else:
            names[code] = name + "省"
    return names


REGION_NAMES = _region_names()


@cache
def intent_labels() -> dict[str, str]:
    """Chinese labels of the dialogue's intents (data file next to this module)."""
    return yaml.safe_load(INTENT_LABELS_FILE.read_text(encoding="utf-8")) or {}


def intent_label(intent: str) -> str:
    return intent_labels().get(intent, intent)


def topic_label(topic: str | None) -> str:
    return TOPIC_LABELS.get(topic or "", topic or "")


def kb_confidence(meta: dict) -> float | None:
    """The knowledge-base search confidence behind a bot reply (same scale as the abstain threshold):
    ``kb_confidence`` on answers from the knowledge base (Rasa's action and the hub's degraded
    answers), else the ``search`` block's confidence. None for replies not from a search (greetings,
    form prompts). ``confidence`` is the NLU intent score, another scale, and is ignored."""
    conf = meta.get("kb_confidence")
    if conf is None and isinstance(meta.get("search"), dict):
        conf = meta["search"].get("confidence")
    return conf if isinstance(conf, (int, float)) and not isinstance(conf, bool) else None


def is_callback(esc: Escalation, messages: list[Message]) -> bool:
    """An out-of-hours callback ticket (never in the live queue). Its status is ``callback`` only
    until an agent takes it, so also recognise it by the callback notice the desk posted for it, or
    the 已回电 disposition."""
    if esc.status == "callback" or esc.disposition == "called_back":
        return True
    return any(
        m.role == "system" and (m.meta or {}).get("queue_id") == esc.id and m.text.startswith(_CALLBACK_PREFIX)
        for m in messages
    )


_PUNCT = re.compile(r"[\s\W_]+", re.UNICODE)


def normalise_question(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub("", text)
    return re.sub(r"(吗|呢|啊|呀|吧|了)+$", "", text)


@dataclass
class Range:
    start: dt.datetime  # UTC, inclusive
    end: dt.datetime  # UTC, exclusive
    first_day: dt.date
    last_day: dt.date

    @classmethod
    def of_days(cls, first: dt.date, last: dt.date) -> "Range":
        if last < first:
            raise ValueError("结束日期不能早于开始日期。")
        if (last - first).days > 366:
            raise ValueError("日期范围最长一年。")
        start = dt.datetime.combine(first, dt.time(0), tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)
        end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(0), tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)
        return cls(start, end, first, last)


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return max(0.0, (aware(b) - aware(a)).total_seconds())


def _avg(values: list[float]) -> float | None:
    return round(mean(values), 1) if values else None


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# -- resolution: did the resident get an answer? ------------------------------------------------
RESOLUTIONS = ("confirmed", "answered", "unresolved", "escalated", "abandoned")
RESOLUTION_LABELS = {
    "confirmed": "确认解决",
    "answered": "已答复未确认",
    "unresolved": "未解决",
    "escalated": "转人工",
    "abandoned": "放弃",
    "open": "进行中",
}
REASON_LABELS = {
    "survey_yes": "回访：已解决",
    "thanks": "居民致谢/表示明白",
    "answered": "最后一次回答置信度高",
    "survey_no": "回访：未解决",
    "repeat_contact": "72小时内同一主题再次来访",
    "disputed": "居民说“不对/没用/听不懂”",
    "rephrased": "重复或换个说法再问",
    "clarifying": "停在追问澄清",
    "abstained": "未能回答",
    "declined": "不属于医保业务，已婉拒",
    "unsure_after_clarifying": "追问后仍不确定",
    "low_confidence": "低置信度回答",
    "no_answer": "没有得到知识库的回答",
    "escalated": "已转人工",
    "left_in_queue": "排队时离开",
    "no_reply": "最后一句没有得到回复",
}
# Definitions shown on the page beside each figure (docs/analytics.md carries the same text).
DEFINITIONS = {
    "conversations": "会话量：所选日期内新开的会话数。",
    "containment_rate": "自助解决率：已结束且有提问的会话中，确认解决与已答复未确认之和所占比例（不含未解决、转人工、放弃）。",
    "confirmed_rate": "确认解决率：已结束且有提问的会话中，回访评价已解决或4分以上、或居民最后一句是致谢/表示明白的比例。",
    "unresolved_rate": "未解决率：已结束且有提问的会话中，停在追问、未能回答、低置信度回答、换个说法再问、“不对/没用”、回访未解决或72小时内同一主题再次来访的比例。",
    "escalation_rate": "转人工率：有提问的会话中转给人工坐席的比例。",
    "abandoned": "放弃会话：排队等人工时离开，或最后一句没有得到回复的会话（占全部会话的比例）。",
    "repeat_contact_rate": "重复来访率：能识别同一居民（电话号码加密摘要或网页访客标识）的已结束会话中，72小时内同一主题再次来访的比例。",
    "satisfaction": "满意度：已回答的回访评分（1–5分）的平均值。",
    "avg_wait_s": "平均等待：人工队列从排队到坐席接起（或居民离开）的平均时长，不含非工作时间回访登记。",
    "avg_handle_s": "平均处理：坐席接起到结束的平均时长。",
    "callbacks": "非工作时间回访：非服务时间登记的回电工单数，及登记到回电的平均时长。",
    "entry_quality": "答案质量（按知识条目）：条目被用来回答的次数，之后居民致谢确认、换个说法再问或说“不对”、转人工的次数。",
}
REPEAT_WINDOW = dt.timedelta(hours=72)
# Short acknowledgements that end a conversation well, and replies that say the answer did not help.
_THANKS = re.compile(
    r"谢谢|多谢|感谢|谢了|明白了|知道了|懂了|清楚了|了解了(?!解)|解决了|可以了|收到|^好的?[吧啊呀了]?$|^(?:ok|okay|嗯+|行)$"
)
_DISPUTE = re.compile(
    r"不对|没用|不是这个|不是我问的|答非所问|听不懂|看不懂|没看懂|没听懂|不明白|不清楚|没解决|还是不行|不行啊|"
    r"不太懂|不懂|说的不对|错了|什么意思"
)
_QUESTIONISH = re.compile(r"[?？]|吗$|呢$|怎么|什么|哪|多少|能不能|可以.*吗")
UNRESOLVED_OUTCOMES = ("clarifying", "abstained", "declined", "unsure_after_clarifying")
# Survey comments that say whether it was solved, when the rating does not (3 out of 5, or none).
_SURVEY_NO = re.compile(r"没解决|未解决|没有解决|没用|不满意")
_SURVEY_YES = re.compile(r"解决了|已解决|有用|很好|满意")


def _plain(text: str) -> str:
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


def is_thanks(text: str) -> bool:
    """The resident's message acknowledges an answer: short, thanks/understood, no new question."""
    t = _plain(text)
    return bool(t) and len(t) <= 15 and not _DISPUTE.search(t) and bool(_THANKS.search(t)) and not _QUESTIONISH.search(text)


def is_dispute(text: str) -> bool:
    """The resident says the answer was wrong or not understood (不对/没用/听不懂…): a short reply,
    not a new question that happens to contain 不清楚."""
    t = _plain(text)
    return bool(t) and len(t) <= 12 and bool(_DISPUTE.search(t))


def _bigrams(text: str) -> set[str]:
    t = normalise_question(text)
    return {t[i : i + 2] for i in range(len(t) - 1)} or ({t} if t else set())


def similar_questions(a: str, b: str, threshold: float = 0.5) -> bool:
    """The same question asked again, or in other words (character-bigram Jaccard)."""
    x, y = _bigrams(a), _bigrams(b)
    return bool(x and y) and len(x & y) / len(x | y) >= threshold


def answered_units(meta: dict) -> list[dict]:
    """The knowledge the reply answered with: the answer stage's ``answers`` (entry, point, topic),
    else its citations (older replies)."""
    answers = [a for a in meta.get("answers") or [] if isinstance(a, dict) and a.get("entry")]
    if answers:
        return answers
    return [
        {"entry": c.get("id"), "topic": c.get("topic")}
        for c in meta.get("citations") or []
        if isinstance(c, dict) and c.get("id")
    ]


USAGE_DAYS = 30


async def usage_counts(store: Store, *, days: int = USAGE_DAYS, now: dt.datetime | None = None) -> Counter:
    """How many conversations of the last ``days`` were answered with each entry and knowledge point:
    ``{("entry", id): n, ("point", id): n}``, from the replies' stored ``answers`` / citations (the same
    reading as the dashboard's, ``answered_units``; nothing is tracked for it)."""
    since = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=days)
    q = select(Message.conversation_id, Message.meta).where(Message.role == "bot", Message.created_at >= since)
    seen: set[tuple[str, str, str]] = set()
    async with store.sessions() as s:
        for conversation, meta in (await s.execute(q)).all():
            for unit in answered_units(meta or {}):
                if unit.get("entry"):
                    seen.add(("entry", str(unit["entry"]), conversation))
                if unit.get("point"):
                    seen.add(("point", str(unit["point"]), conversation))
    return Counter((kind, record) for kind, record, _ in seen)


def _substantive(meta: dict) -> bool:
    """A reply that answers or fails to answer a question (not a greeting, a thanks reply or a prompt)."""
    outcome = meta.get("outcome") or "answered"
    if outcome != "answered":
        return True
    return bool(answered_units(meta) or meta.get("steps") or kb_confidence(meta) is not None)


@dataclass
class Resolution:
    status: str  # one of RESOLUTIONS, or "open" (not closed yet), or "" (nothing asked)
    reason: str
    topic: str | None = None  # the first knowledge-base topic the conversation was answered on
    questions: tuple[str, ...] = ()  # the resident's questions (not thanks or disputes)


def classify(
    conv: Conversation,
    msgs: list[Message],
    escalations: list[Escalation],
    survey: Survey | None = None,
    *,
    low_confidence: float = 0.5,
) -> Resolution:
    """Why a conversation ended as it did, from the evidence in it (see the module's definitions).
    Repeat contact is decided across conversations (``mark_repeat_contacts``)."""
    resident = [m for m in msgs if m.role == "resident"]
    bots = [m for m in msgs if m.role == "bot"]
    topic = next(
        (u.get("topic") for m in bots for u in answered_units(m.meta or {}) if u.get("topic")), None
    )
    questions = tuple(m.text for m in resident if not is_thanks(m.text) and not is_dispute(m.text))
    if not resident:
        return Resolution("", "", topic, questions)
    if conv.status != "closed":
        return Resolution("open", "", topic, questions)
    left_in_queue = any(e.disposition == "abandoned" for e in escalations) or (
        bool(escalations)
        and all(e.claimed_at is None for e in escalations)
        and not any(m.role == "agent" for m in msgs)
        and not all(is_callback(e, msgs) for e in escalations)
    )
    if left_in_queue:
        return Resolution("abandoned", "left_in_queue", topic, questions)
    if escalations or any((m.meta or {}).get("outcome") == "escalated" for m in bots):
        return Resolution("escalated", "escalated", topic, questions)
    last = msgs[-1]
    if last.role == "resident" and last.status != "answered":
        return Resolution("abandoned", "no_reply", topic, questions)
    if survey is not None and survey.status == "answered":
        comment = survey.comment or ""
        if (survey.rating or 0) >= 4 or (survey.rating in (None, 3) and _SURVEY_YES.search(comment) and not _SURVEY_NO.search(comment)):
            return Resolution("confirmed", "survey_yes", topic, questions)
        if (survey.rating and survey.rating <= 2) or _SURVEY_NO.search(comment):
            return Resolution("unresolved", "survey_no", topic, questions)
    last_words = resident[-1].text
    if is_dispute(last_words):
        return Resolution("unresolved", "disputed", topic, questions)
    if is_thanks(last_words):
        return Resolution("confirmed", "thanks", topic, questions)
    if len(questions) >= 2 and any(similar_questions(questions[-1], q) for q in questions[:-1]):
        return Resolution("unresolved", "rephrased", topic, questions)
    points = [_point(m.meta or {}) for m in bots if (m.meta or {}).get("outcome", "answered") == "answered"]
    points = [p for p in points if p]
    if len(points) >= 2 and points[-1] in points[:-1]:
        return Resolution("unresolved", "rephrased", topic, questions)  # asked again, got the same answer
    final = next((m.meta or {} for m in reversed(bots) if _substantive(m.meta or {})), None)
    if final is None:
        return Resolution("unresolved", "no_answer", topic, questions)
    outcome = final.get("outcome") or "answered"
    if outcome != "answered":
        return Resolution("unresolved", outcome if outcome in REASON_LABELS else "abstained", topic, questions)
    conf = kb_confidence(final)
    if conf is not None and conf < low_confidence:
        return Resolution("unresolved", "low_confidence", topic, questions)
    return Resolution("answered", "answered", topic, questions)


def _point(meta: dict) -> str | None:
    units = answered_units(meta)
    return (units[0].get("point") or units[0].get("unit") or units[0].get("entry")) if units else None


def contact_key(conv: Conversation) -> str | None:
    """Who came back: the hotline's keyed hash of the caller's number, or the widget's visitor id."""
    meta = conv.meta or {}
    if meta.get("caller_hash"):
        return "caller:" + str(meta["caller_hash"])
    if meta.get("visitor"):
        return "visitor:" + str(meta["visitor"])
    return None


def mark_repeat_contacts(
    convs: list[Conversation], resolutions: dict[str, Resolution], later: dict[str, Resolution] | None = None,
    later_convs: list[Conversation] = (),
) -> set[str]:
    """Conversations whose resident came back about the same topic (or the same question) within 72
    hours: those are not resolved, whatever they looked like. ``later_convs`` are the conversations
    after the range that can still mark one inside it. Returns the ids marked."""
    allres = {**(later or {}), **resolutions}
    by_key: dict[str, list[Conversation]] = defaultdict(list)
    for c in list(convs) + list(later_convs):
        key = contact_key(c)
        if key and c.id in allres and allres[c.id].status != "":
            by_key[key].append(c)
    marked: set[str] = set()
    for group in by_key.values():
        group.sort(key=lambda c: aware(c.created_at))
        for i, first in enumerate(group):
            res = resolutions.get(first.id)
            if res is None or res.status in ("", "open"):
                continue
            for again in group[i + 1 :]:
                if aware(again.created_at) - aware(first.created_at) > REPEAT_WINDOW:
                    break
                other = allres[again.id]
                same_topic = res.topic is not None and res.topic == other.topic
                same_question = any(similar_questions(a, b) for a in res.questions for b in other.questions)
                if same_topic or same_question:
                    marked.add(first.id)
                    break
    for cid in marked:
        res = resolutions[cid]
        if res.status in ("confirmed", "answered", "unresolved"):
            resolutions[cid] = Resolution("unresolved", "repeat_contact", res.topic, res.questions)
    return marked


def _shares(counts: Counter) -> dict:
    closed = sum(counts[k] for k in RESOLUTIONS)
    return {
        "closed": closed,
        "open": counts["open"],
        **{k: counts[k] for k in RESOLUTIONS},
        "shares": {k: _rate(counts[k], closed) for k in RESOLUTIONS},
        "containment_rate": _rate(counts["confirmed"] + counts["answered"], closed),
    }


def resolve_all(data: dict, *, low_confidence: float = 0.5) -> tuple[dict[str, Resolution], set[str], int]:
    """Classify every conversation of ``data`` (``load``'s result), repeat contact included.
    Returns the resolutions by conversation id, the ids marked as repeat contact, and how many closed
    conversations with a question could be matched to a returning resident at all."""
    by_conv: dict[str, list[Message]] = defaultdict(list)
    for m in list(data["messages"]) + list(data.get("later_messages", [])):
        by_conv[m.conversation_id].append(m)
    escalated: dict[str, list[Escalation]] = defaultdict(list)
    for e in data["escalations"]:
        escalated[e.conversation_id].append(e)
    surveys = {s.conversation_id: s for s in data["surveys"]}
    res = {
        c.id: classify(c, by_conv.get(c.id, []), escalated.get(c.id, []), surveys.get(c.id), low_confidence=low_confidence)
        for c in data["conversations"]
    }
    later_convs = data.get("later", [])
    later = {
        c.id: classify(c, by_conv.get(c.id, []), [], None, low_confidence=low_confidence) for c in later_convs
    }
    for c in later_convs:  # a conversation still open after the range still shows the resident came back
        if later[c.id].status == "open":
            later[c.id].status = "answered"
    before = {cid: r.status for cid, r in res.items()}
    marked = mark_repeat_contacts(data["conversations"], res, later, later_convs)
    identifiable = sum(
        1 for c in data["conversations"] if contact_key(c) and before[c.id] in RESOLUTIONS
    )
    return res, marked, identifiable


async def _messages_of(session, ids: list[str]) -> list[Message]:
    q = select(Message).where(Message.conversation_id.in_(ids)).order_by(Message.conversation_id, Message.seq)
    return list((await session.execute(q)).scalars())


async def load(store: Store, rng: Range, *, region: str | None = None, channel: str | None = None) -> dict:
    async with store.sessions() as s:
        q = select(Conversation).where(Conversation.created_at >= rng.start, Conversation.created_at < rng.end)
        if region:
            q = q.where(Conversation.region_code == region)
        if channel:
            q = q.where(Conversation.channel == channel)
        convs = list((await s.execute(q)).scalars())
        ids = [c.id for c in convs]
        messages: list[Message] = []
        escalations: list[Escalation] = []
        surveys: list[Survey] = []
        for i in range(0, len(ids), 500):  # keep IN lists bounded
            chunk = ids[i : i + 500]
            messages += await _messages_of(s, chunk)
            escalations += list(
                (await s.execute(select(Escalation).where(Escalation.conversation_id.in_(chunk)))).scalars()
            )
            surveys += list((await s.execute(select(Survey).where(Survey.conversation_id.in_(chunk)))).scalars())
        # Repeat contact: the same resident may come back up to 72 hours after the range ends, or,
        # with a region or channel filter, through another line inside it.
        seen = set(ids)
        later = [
            c
            for c in (
                await s.execute(
                    select(Conversation).where(
                        Conversation.created_at >= rng.start, Conversation.created_at < rng.end + REPEAT_WINDOW
                    )
                )
            ).scalars()
            if c.id not in seen and contact_key(c)
        ]
        later_ids = [c.id for c in later]
        later_messages: list[Message] = []
        for i in range(0, len(later_ids), 500):
            later_messages += await _messages_of(s, later_ids[i : i + 500])
    return {
        "conversations": convs,
        "messages": messages,
        "escalations": escalations,
        "surveys": surveys,
        "later": later,
        "later_messages": later_messages,
    }


def compute(data: dict, rng: Range, *, low_confidence: float = 0.5, knowledge_base=None, gap_limit: int = 30) -> dict:
    convs: list[Conversation] = data["conversations"]
    by_conv: dict[str, list[Message]] = defaultdict(list)
    for m in data["messages"]:
        by_conv[m.conversation_id].append(m)
    escalated: dict[str, list[Escalation]] = defaultdict(list)
    for e in data["escalations"]:
        escalated[e.conversation_id].append(e)
    ratings = {s.conversation_id: s.rating for s in data["surveys"] if s.status == "answered" and s.rating}

    channels = Counter(c.channel for c in convs)
    hours = {ch: [0] * 24 for ch in sorted(channels)}
    days: Counter = Counter()
    for c in convs:
        local = aware(c.created_at).astimezone(LOCAL_TZ)
        hours[c.channel][local.hour] += 1
        days[local.date().isoformat()] += 1

    intents: Counter = Counter()
    topics: Counter = Counter()
    outcomes: Counter = Counter()
    gaps: list[tuple[str, str]] = []  # (question text, why)
    asked = abandoned = esc_asked = 0
    resolutions, repeats, identifiable = resolve_all(data, low_confidence=low_confidence)
    overall: Counter = Counter()
    reasons: Counter = Counter()
    per_channel: dict[str, Counter] = defaultdict(Counter)
    per_topic: dict[str, Counter] = defaultdict(Counter)
    regions: dict[str, dict] = defaultdict(
        lambda: {"conversations": 0, "asked": 0, "escalated": 0, "resolution": Counter(), "ratings": []}
    )
    durations: list[float] = []
    for c in convs:
        msgs = by_conv.get(c.id, [])
        resident = {m.id: m for m in msgs if m.role == "resident"}
        reg = regions[c.region_code or "未知"]
        reg["conversations"] += 1
        for m in msgs:
            if m.role != "bot":
                continue
            meta = m.meta or {}
            outcome = meta.get("outcome") or "answered"
            outcomes[outcome] += 1
            if meta.get("intent"):
                intents[meta["intent"]] += 1
            cites = meta.get("citations") or []
            if outcome == "answered" and cites and cites[0].get("topic"):
                topics[cites[0]["topic"]] += 1
            conf = kb_confidence(meta)
            low = outcome == "answered" and conf is not None and conf < low_confidence
            if (outcome in GAP_OUTCOMES or low) and m.reply_to in resident:
                gaps.append((resident[m.reply_to].text, outcome if outcome in GAP_OUTCOMES else "low_confidence"))
                resident.pop(m.reply_to)  # one entry per question even when two replies qualify
        wrote = any(m.role == "resident" for m in msgs)
        esc = escalated.get(c.id, [])
        if wrote:
            asked += 1
            reg["asked"] += 1
            if esc:
                reg["escalated"] += 1
                esc_asked += 1
        res = resolutions[c.id]
        if res.status:
            overall[res.status] += 1
            reg["resolution"][res.status] += 1
            per_channel[c.channel][res.status] += 1
            per_topic[res.topic or ""][res.status] += 1
            if res.reason:
                reasons[res.reason] += 1
        left_in_queue = any(e.disposition == "abandoned" for e in esc) or (
            bool(esc)
            and c.status == "closed"
            and all(e.claimed_at is None for e in esc)
            and not any(m.role == "agent" for m in msgs)
        )
        last = msgs[-1] if msgs else None
        unanswered = last is not None and last.role == "resident" and last.status != "answered"
        if left_in_queue or unanswered:
            abandoned += 1
        if c.id in ratings:
            reg["ratings"].append(ratings[c.id])
        d = _seconds(c.created_at, c.closed_at)
        if d is not None:
            durations.append(d)

    closed_at = {c.id: c.closed_at for c in convs}
    waits_answered: list[float] = []
    waits_abandoned: list[float] = []
    callbacks: list[Escalation] = []
    for e in data["escalations"]:
        if is_callback(e, by_conv.get(e.conversation_id, [])):
            callbacks.append(e)
        elif e.claimed_at is not None:
            waits_answered.append(_seconds(e.created_at, e.claimed_at))
        elif (left := e.closed_at or closed_at.get(e.conversation_id)) is not None:
            waits_abandoned.append(_seconds(e.created_at, left))  # gave up: waited until they left
        # still waiting: not counted until it ends
    callback_times = [w for e in callbacks if (w := _seconds(e.created_at, e.claimed_at)) is not None]
    handles = [h for e in data["escalations"] if (h := _seconds(e.claimed_at, e.closed_at)) is not None]
    rating_values = list(ratings.values())
    n_esc_convs = len(escalated)
    names = region_names(kb_region_names(knowledge_base))
    shares = _shares(overall)
    closed_asked = shares["closed"]
    contained = overall["confirmed"] + overall["answered"]
    return {
        "range": {"from": rng.first_day.isoformat(), "to": rng.last_day.isoformat(), "timezone": "Asia/Shanghai"},
        "totals": {
            "conversations": len(convs),
            "asked": asked,
            "closed_asked": closed_asked,  # the denominator of the resolution figures
            "contained": contained,  # confirmed + answered-unconfirmed
            "containment_rate": _rate(contained, closed_asked),
            "confirmed": overall["confirmed"],
            "confirmed_rate": _rate(overall["confirmed"], closed_asked),
            "answered_unconfirmed": overall["answered"],
            "unresolved": overall["unresolved"],
            "unresolved_rate": _rate(overall["unresolved"], closed_asked),
            "repeat_contacts": len(repeats),
            "repeat_identifiable": identifiable,
            "repeat_contact_rate": _rate(len(repeats), identifiable),
            "escalated": n_esc_convs,
            "escalation_rate": _rate(esc_asked, asked),
            "abandoned": abandoned,
            "abandon_rate": _rate(abandoned, len(convs)),
            "avg_wait_s": _avg(waits_answered + waits_abandoned),
            "avg_handle_s": _avg(handles),
            "avg_conversation_s": _avg(durations),
        },
        "queue": {
            "answered": len(waits_answered),
            "abandoned": len(waits_abandoned),
            "avg_wait_answered_s": _avg(waits_answered),
            "avg_wait_abandoned_s": _avg(waits_abandoned),
        },
        "callbacks": {
            "count": len(callbacks),
            "called_back": len(callback_times),
            "avg_callback_s": _avg(callback_times),
        },
        "by_channel": dict(channels),
        "by_hour": hours,
        "by_day": dict(sorted(days.items())),
        "outcomes": dict(outcomes),
        "top_intents": [{"intent": k, "label": intent_label(k), "count": v} for k, v in intents.most_common(10)],
        "top_topics": [{"topic": k, "label": topic_label(k), "count": v} for k, v in topics.most_common(10)],
        "satisfaction": {
            "answered": len(rating_values),
            "surveys": len(data["surveys"]),
            "response_rate": _rate(len(rating_values), len(data["surveys"])),
            "average": round(mean(rating_values), 2) if rating_values else None,
            "distribution": {str(i): rating_values.count(i) for i in range(1, 6)},
        },
        "by_region": [
            {
                "region": code,
                "region_name": names.get(code, ""),
                "conversations": r["conversations"],
                "asked": r["asked"],
                "containment_rate": _shares(r["resolution"])["containment_rate"],
                "confirmed_rate": _shares(r["resolution"])["shares"]["confirmed"],
                "unresolved_rate": _shares(r["resolution"])["shares"]["unresolved"],
                "escalation_rate": _rate(r["escalated"], r["asked"]),
                "resolution": _shares(r["resolution"]),
                "satisfaction": round(mean(r["ratings"]), 2) if r["ratings"] else None,
            }
            for code, r in sorted(regions.items(), key=lambda kv: -kv[1]["conversations"])
        ],
        "knowledge_gaps": group_gaps(gaps, knowledge_base, limit=gap_limit),
        "resolution": {
            **shares,
            "reasons": dict(reasons.most_common()),
            "by_channel": {ch: _shares(cnt) for ch, cnt in sorted(per_channel.items())},
            "by_topic": [
                {"topic": t, "label": topic_label(t) if t else "未归入主题", **_shares(cnt)}
                for t, cnt in sorted(per_topic.items(), key=lambda kv: -sum(kv[1].values()))
            ],
            "labels": {k: RESOLUTION_LABELS[k] for k in RESOLUTIONS},
            "reason_labels": REASON_LABELS,
        },
        "entry_quality": entry_quality(by_conv, escalated, resolutions, knowledge_base),
        "definitions": DEFINITIONS,
    }


def entry_quality(
    by_conv: dict[str, list[Message]],
    escalated: dict[str, list[Escalation]],
    resolutions: dict[str, Resolution],
    knowledge_base=None,
    *,
    limit: int = 50,
) -> list[dict]:
    """Per knowledge-base entry: how often it answered a resident, and what the resident did next:
    thanked / understood (or a survey said solved after it was the last answer), asked again in
    other words, said it was wrong (不对/没用/听不懂), was escalated. The worst first: the list staff
    use to fix the knowledge base."""
    stats: dict[str, Counter] = defaultdict(Counter)
    topics: dict[str, str | None] = {}
    for cid, msgs in by_conv.items():
        if cid not in resolutions:
            continue  # a later conversation loaded only for repeat contact
        esc_times = [aware(e.created_at) for e in escalated.get(cid, [])]
        texts = {m.id: m.text for m in msgs if m.role == "resident"}
        answered = [
            (i, m) for i, m in enumerate(msgs)
            if m.role == "bot" and (m.meta or {}).get("outcome", "answered") == "answered" and answered_units(m.meta or {})
        ]
        for n, (i, m) in enumerate(answered):
            entries = list(dict.fromkeys(u["entry"] for u in answered_units(m.meta or {})))
            nxt = next((x for x in msgs[i + 1 :] if x.role == "resident"), None)
            later_bots = [x for x in msgs[i + 1 :] if x.role == "bot"]
            question = texts.get(m.reply_to, "")
            is_last = n == len(answered) - 1
            signals = set()
            if nxt is not None and is_thanks(nxt.text):
                signals.add("confirmed")
            elif nxt is None and is_last and resolutions[cid].reason in ("survey_yes", "thanks"):
                signals.add("confirmed")
            if nxt is not None and is_dispute(nxt.text):
                signals.add("disputed")
            elif nxt is not None and question and similar_questions(nxt.text, question):
                signals.add("rephrased")
            if any(t > aware(m.created_at) for t in esc_times) or any(
                (x.meta or {}).get("outcome") == "escalated" for x in later_bots
            ):
                signals.add("escalated")
            for entry in entries:
                stats[entry]["used"] += 1
                for sig in signals:
                    stats[entry][sig] += 1
                topics.setdefault(entry, next(
                    (u.get("topic") for u in answered_units(m.meta or {}) if u.get("entry") == entry), None))
    kb_entries = getattr(knowledge_base, "entries", None) or {}
    rows = []
    for entry, st in stats.items():
        known = kb_entries.get(entry) if isinstance(kb_entries, dict) else None
        topic = getattr(known, "topic_name", None) or topics.get(entry)
        problems = st["rephrased"] + st["disputed"] + st["escalated"]
        rows.append({
            "entry": entry,
            "title": getattr(known, "title", "") or entry,
            "topic": topic,
            "topic_label": topic_label(topic),
            "used": st["used"],
            "confirmed": st["confirmed"],
            "rephrased": st["rephrased"],
            "disputed": st["disputed"],
            "escalated": st["escalated"],
            "problem_rate": _rate(problems, st["used"]),
            "confirmed_rate": _rate(st["confirmed"], st["used"]),
        })
    rows.sort(key=lambda r: (-(r["rephrased"] + r["disputed"] + r["escalated"]), -r["used"], r["entry"]))
    return rows[:limit]


def kb_region_names(knowledge_base) -> dict[str, str]:
    """Region code -> name for every region the knowledge base has entries for."""
    names = {}
    entries = getattr(knowledge_base, "entries", None) or {}
    for entry in entries.values() if isinstance(entries, dict) else entries:
        region = getattr(entry, "region", None)
        if region is not None and getattr(region, "code", None):
            names[region.code] = region.label
    return names


def region_names(kb_names: dict[str, str]) -> dict[str, str]:
    """Region code -> name: the knowledge base's own (``kb_region_names``), else the dialogue vocabulary's."""
    return {**REGION_NAMES, **{code: name for code, name in kb_names.items() if name}}


async def region_options(store: Store, knowledge_base=None) -> list[dict]:
    """The regions the filter offers: those of the knowledge base and those conversations carry."""
    async with store.sessions() as s:
        seen = {c for (c,) in await s.execute(select(Conversation.region_code).distinct()) if c}
    kb = kb_region_names(knowledge_base)
    names = region_names(kb)
    codes = sorted((seen | set(kb)) - {"100000"})  # 全国 is not a place a conversation comes from
    return [{"code": c, "name": names.get(c, "")} for c in codes]


def group_gaps(gaps: list[tuple[str, str]], knowledge_base=None, *, limit: int = 30) -> list[dict]:
    """Group unanswered / low-confidence questions: by nearest knowledge-base entry when a knowledge
    base is given, else by normalised text. Each group: label, count, outcome counts, masked samples."""
    by_text: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for text, why in gaps:
        by_text[normalise_question(text) or text].append((text, why))
    groups: dict[str, dict] = {}
    for norm, items in sorted(by_text.items(), key=lambda kv: -len(kv[1]))[:500]:
        key, label, entry_id, topic = f"text:{norm}", mask_pii(items[0][0])[:60], None, None
        if knowledge_base is not None:
            try:
                result = knowledge_base.search(items[0][0])
            except Exception:  # grouping degrades to text; the dashboard must still load
                result = None
            best = result.best if result is not None else None
            if best is not None:
                key, entry_id = f"entry:{best.entry.id}", best.entry.id
                label, topic = best.entry.title, best.entry.topic_name
        g = groups.setdefault(
            key,
            {
                "label": label,
                "nearest_entry": entry_id,
                "topic": topic,
                "topic_label": topic_label(topic),
                "count": 0,
                "outcomes": Counter(),
                "samples": [],
            },
        )
        g["count"] += len(items)
        for text, why in items:
            g["outcomes"][why] += 1
            sample = mask_pii(text)[:80]
            if sample not in g["samples"] and len(g["samples"]) < 5:
                g["samples"].append(sample)
    out = sorted(groups.values(), key=lambda g: (-g["count"], g["label"]))[:limit]
    for g in out:
        g["outcomes"] = dict(g["outcomes"])
    return out


CSV_COLUMNS = [
    "conversation_id",
    "created_at",
    "channel",
    "region_code",
    "entry_point",
    "contact",
    "status",
    "resident_turns",
    "last_outcome",
    "escalated",
    "rating",
    "first_question",
    "resolution",  # confirmed / answered / unresolved / escalated / abandoned / open, or empty: nothing asked
    "resolution_reason",  # REASON_LABELS' keys: thanks, survey_yes, rephrased, repeat_contact, ...
    "resolution_label",  # the same in Chinese, as the page shows it
    "topic",
    "repeat_contact",
]


def conversations_csv(data: dict, *, low_confidence: float = 0.5) -> str:
    """One row a conversation, with its resolution; contact, entry point and question text masked."""
    resolutions, repeats, _ = resolve_all(data, low_confidence=low_confidence)
    by_conv: dict[str, list[Message]] = defaultdict(list)
    for m in data["messages"]:
        by_conv[m.conversation_id].append(m)
    escalated = {e.conversation_id for e in data["escalations"]}
    ratings = {s.conversation_id: s.rating for s in data["surveys"] if s.status == "answered"}
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for c in sorted(data["conversations"], key=lambda c: aware(c.created_at)):
        msgs = by_conv.get(c.id, [])
        resident = [m for m in msgs if m.role == "resident"]
        bots = [m for m in msgs if m.role == "bot"]
        w.writerow(
            _csv_safe(v) if isinstance(v, str) else v
            for v in [
                c.id,
                aware(c.created_at).astimezone(LOCAL_TZ).isoformat(timespec="seconds"),
                c.channel,
                c.region_code,
                mask_pii(c.entry_point or ""),
                mask_pii(c.contact or ""),
                c.status,
                len(resident),
                (bots[-1].meta or {}).get("outcome", "") if bots else "",
                "yes" if c.id in escalated else "no",
                ratings.get(c.id) or "",
                mask_pii(resident[0].text)[:200] if resident else "",
                resolutions[c.id].status,
                resolutions[c.id].reason,
                RESOLUTION_LABELS.get(resolutions[c.id].status, "")
                + ("：" + REASON_LABELS[resolutions[c.id].reason] if resolutions[c.id].reason in REASON_LABELS else ""),
                resolutions[c.id].topic or "",
                "yes" if c.id in repeats else "no",
            ]
        )
    return "\ufeff" + out.getvalue()  # BOM: Excel opens the UTF-8 Chinese text correctly


def _csv_safe(text: str) -> str:
    """Spreadsheet formula injection: a text cell must not start with = + - @ (or a tab or carriage
    return, which some spreadsheets strip before reading a formula)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
