"""精准分析: figures for agency staff (supervisor and up) over a date range, and Prometheus metrics.

Everything is computed from the hub's own tables (conversations, messages, escalations, surveys).
Definitions (docs/analytics.md):
- a conversation *counts as asked* when the resident wrote at least once;
- *contained*: asked and never escalated (the bot resolved it without a person);
- *escalation rate*: escalated / asked;
- *abandoned*: the resident left before an agent took the conversation (its escalation was never
  claimed and the conversation closed), or the resident's last question got no reply;
- *knowledge gaps*: resident questions whose reply abstained, only clarified, or had confidence
  below the abstain threshold, grouped by the knowledge-base entry nearest to them (or, without a
  knowledge base, by their normalised text), so staff see what the corpus lacks;
- *waiting time*: escalation created -> claimed; *handling time*: claimed -> closed.
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
from statistics import mean

from sqlalchemy import select

from xiaozhi.hub.store import Conversation, Escalation, Message, Store, aware
from xiaozhi.hub.surveys import LOCAL_TZ, Survey
from xiaozhi.masking import mask_pii

GAP_OUTCOMES = ("abstained", "clarifying")
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
            conf = meta.get("confidence", meta.get("kb_confidence"))
            low = isinstance(conf, (int, float)) and conf < low_confidence
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

    waits = [
        w for e in data["escalations"] if (w := _seconds(e.created_at, e.claimed_at)) is not None
    ]
    handles = [
        h
        for e in data["escalations"]
        if (h := _seconds(e.claimed_at, e.closed_at)) is not None
    ]
    rating_values = list(ratings.values())
    n_esc_convs = len(escalated)
    region_names = {}
    entries = getattr(knowledge_base, "entries", None) or {}
    for entry in entries.values() if isinstance(entries, dict) else entries:
        region = getattr(entry, "region", None)
        if region is not None and getattr(region, "code", None):
            region_names[region.code] = region.label
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
            "avg_wait_s": _avg(waits),
            "avg_handle_s": _avg(handles),
            "avg_conversation_s": _avg(durations),
        },
        "by_channel": dict(channels),
        "by_hour": hours,
        "by_day": dict(sorted(days.items())),
        "outcomes": dict(outcomes),
        "top_intents": [{"intent": k, "count": v} for k, v in intents.most_common(10)],
        "top_topics": [{"topic": k, "count": v} for k, v in topics.most_common(10)],
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
                "region_name": region_names.get(code, ""),
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
            [
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
                _csv_safe(mask_pii(resident[0].text)[:200]) if resident else "",
            ]
        )
    return "\ufeff" + out.getvalue()  # BOM: Excel opens the UTF-8 Chinese text correctly


def _csv_safe(text: str) -> str:
    """Spreadsheet formula injection: a cell must not start with = + - @."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


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
