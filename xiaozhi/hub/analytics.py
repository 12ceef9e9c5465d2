"""精准分析: figures for agency staff (supervisor and up) over a date range, and Prometheus metrics.

Everything is computed from the hub's own tables (conversations, messages, escalations, surveys).
Definitions (docs/analytics.md):
- a conversation *counts as asked* when the resident wrote at least once;
- *contained*: asked and never escalated (the bot resolved it without a person);
- *escalation rate*: escalated / asked;
- *abandoned*: the resident left before an agent took the conversation (its escalation was never
  claimed and the conversation closed), or the resident's last question got no reply;
- *knowledge gaps*: resident questions whose reply abstained, only clarified, or was answered from
  the knowledge base with a search confidence (``kb_confidence``) below the abstain threshold,
  grouped by the knowledge-base entry nearest to them (or, without a knowledge base, by their
  normalised text), so staff see what the corpus lacks. The NLU intent confidence (``confidence``)
  is another scale and is not used;
- *waiting time* (live queue only): escalation created -> claimed, or -> closed for a resident who
  gave up waiting; out-of-hours callback tickets are reported apart (created -> called back);
  *handling time*: claimed -> closed.
Personal data: question samples, contacts and comments pass mask_pii before they leave here.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from statistics import mean

import yaml
from sqlalchemy import select

from knowledge_base.schema import TOPIC_LABELS
from xiaozhi.hub.desk import CALLBACK_TEXT
from xiaozhi.hub.store import Conversation, Escalation, Message, Store, aware
from xiaozhi.hub.surveys import LOCAL_TZ, Survey
from xiaozhi.masking import mask_pii

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
    """GB/T 2260 code -> name for regions the knowledge base has no entry for (knowledge_base/places.py,
    the vocabulary the dialogue reads too)."""
    from knowledge_base.places import CODE_NAMES

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
            messages += list(
                (
                    await s.execute(
                        select(Message)
                        .where(Message.conversation_id.in_(chunk))
                        .order_by(Message.conversation_id, Message.seq)
                    )
                ).scalars()
            )
            escalations += list(
                (await s.execute(select(Escalation).where(Escalation.conversation_id.in_(chunk)))).scalars()
            )
            surveys += list((await s.execute(select(Survey).where(Survey.conversation_id.in_(chunk)))).scalars())
    return {"conversations": convs, "messages": messages, "escalations": escalations, "surveys": surveys}


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
    asked = contained = abandoned = esc_asked = 0
    regions: dict[str, dict] = defaultdict(
        lambda: {"conversations": 0, "asked": 0, "escalated": 0, "contained": 0, "ratings": []}
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
            else:
                contained += 1
                reg["contained"] += 1
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
    return {
        "range": {"from": rng.first_day.isoformat(), "to": rng.last_day.isoformat(), "timezone": "Asia/Shanghai"},
        "totals": {
            "conversations": len(convs),
            "asked": asked,
            "contained": contained,
            "containment_rate": _rate(contained, asked),
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
                "containment_rate": _rate(r["contained"], r["asked"]),
                "escalation_rate": _rate(r["escalated"], r["asked"]),
                "satisfaction": round(mean(r["ratings"]), 2) if r["ratings"] else None,
            }
            for code, r in sorted(regions.items(), key=lambda kv: -kv[1]["conversations"])
        ],
        "knowledge_gaps": group_gaps(gaps, knowledge_base, limit=gap_limit),
    }


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
]


def conversations_csv(data: dict) -> str:
    """One row a conversation; contact, entry point and question text masked."""
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
            ]
        )
    return "\ufeff" + out.getvalue()  # BOM: Excel opens the UTF-8 Chinese text correctly


def _csv_safe(text: str) -> str:
    """Spreadsheet formula injection: a text cell must not start with = + - @ (or a tab or carriage
    return, which some spreadsheets strip before reading a formula)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# -- Prometheus ----------------------------------------------------------------------------------
class HubMetrics:
    """Per-app registry (tests build many apps); exposed at /metrics."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge, Histogram
        from prometheus_client import Counter as PCounter

        self.registry = CollectorRegistry()
        self.turns = PCounter("xiaozhi_turns", "Resident turns handled", ["channel"], registry=self.registry)
        self.outcomes = PCounter(
            "xiaozhi_bot_outcomes", "Bot replies by outcome", ["channel", "outcome"], registry=self.registry
        )
        self.turn_latency = Histogram(
            "xiaozhi_turn_latency_seconds",
            "Resident message stored to replies stored",
            ["channel"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.turn_failures = PCounter("xiaozhi_turn_failures", "Turns that raised", ["channel"], registry=self.registry)
        self.closed = PCounter(
            "xiaozhi_conversations_closed", "Conversations closed", ["channel", "reason"], registry=self.registry
        )
        self.queue = Gauge(
            "xiaozhi_escalation_queue_length", "Escalations waiting for an agent", registry=self.registry
        )
        self.active_calls = Gauge("xiaozhi_active_calls", "Phone calls in progress", registry=self.registry)
        self.surveys_open = Gauge(
            "xiaozhi_surveys_open", "Follow-up surveys not yet answered", ["status"], registry=self.registry
        )
        self.limits_shared = Gauge(
            "xiaozhi_rate_limits_shared",
            "1 while rate limits are shared through Redis, 0 while this replica limits on its own (Redis away)",
            registry=self.registry,
        )

    def instrument(self, service) -> None:
        """Count turns, outcomes and latency around ConversationService.handle (no change to its code)."""
        handle = service.handle

        async def timed(conv, text):
            channel = conv.channel or "web"
            started = time.perf_counter()
            try:
                incoming, replies = await handle(conv, text)
            except Exception:
                self.turn_failures.labels(channel).inc()
                raise
            self.turn_latency.labels(channel).observe(time.perf_counter() - started)
            self.turns.labels(channel).inc()
            for r in replies:
                self.outcomes.labels(channel, (r.meta or {}).get("outcome") or "answered").inc()
            return incoming, replies

        service.handle = timed

        async def on_closed(conv, reason):
            self.closed.labels(conv.channel or "web", reason[:32] or "unknown").inc()

        service.closed_hooks.append(on_closed)

    async def refresh(self, app) -> None:
        """Gauges read at scrape time."""
        from sqlalchemy import func

        store = app.state.store
        async with store.sessions() as s:
            waiting = (
                await s.execute(select(func.count()).select_from(Escalation).where(Escalation.status == "waiting"))
            ).scalar()
            self.queue.set(waiting or 0)
            for status in ("pending", "offered", "calling"):
                n = (await s.execute(select(func.count()).select_from(Survey).where(Survey.status == status))).scalar()
                self.surveys_open.labels(status).set(n or 0)
        # the hotline's SIP endpoint (xiaozhi/hub/phone.py), when it runs
        user_agent = getattr(getattr(app.state, "phone", None), "user_agent", None)
        calls = getattr(user_agent, "calls", None)
        self.active_calls.set(len(calls) if calls is not None else 0)
        shared = getattr(getattr(app.state, "limits", None), "shared", None)  # only with XIAOZHI_RATE_LIMIT_REDIS_URL
        if shared is not None:
            self.limits_shared.set(1 if shared.redis_ok else 0)
