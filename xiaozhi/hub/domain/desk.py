"""The agent desk: the escalation queue agents work, who holds which conversation, callbacks out of hours.

Every channel asks for a person through ``ConversationService.escalate()``, which lands in
``AgentDesk.enqueue()``. The queue lives in the ``escalations`` table (durable across restarts):

    waiting --claim--> claimed --close--> closed
       ^                  |  \\--transfer to an agent--> claimed (another agent)
       '--release/transfer to the queue--'
    callback (out of hours) --claim--> claimed --close--> closed

While an item is ``claimed`` its conversation has status ``with_agent`` and the bot stays silent;
release and close hand it back to the bot. Changes are published to the agents' WebSockets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from zoneinfo import ZoneInfo

import yaml
from sqlalchemy import func, select, update

from knowledge_base.schema import TOPIC_LABELS
from xiaozhi.hub.domain.conversation import ESCALATION_WORDS, message_out
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.store import OPEN_STATUSES, Conversation, Escalation, Message, Store, aware, utcnow
from xiaozhi.log_context import bind_conversation
from yibao_common.masking import mask_pii

if TYPE_CHECKING:
    from xiaozhi.hub.domain.accounts import StaffUser
    from xiaozhi.hub.domain.conversation import ConversationService
    from xiaozhi.settings import Settings

log = logging.getLogger(__name__)

PRESENCE_S = 10.0  # how often a replica tells the others which agents are online on it
CANNED_FILE = Path(__file__).resolve().parent / "canned_responses.yaml"

QUEUED_TEXT = "已为您转接人工客服，正在排队，请稍候。您前面说的内容工作人员都能看到，不用再重复。"
CALLBACK_TEXT = (
    "现在不是人工服务时间（人工服务时间：{hours}）。我们已为您登记回访，工作人员会在服务时间内尽快{how}。"
    "在此之前，医保小智可以继续为您解答。"
)
CALLBACK_HOW = {"phone": "给您回电", "": "给您回电或在本对话中回复您，需要电话回访的话请留下联系电话"}
AGENT_JOINED_TEXT = "工作人员{name}已接入，正在为您服务。"
TRANSFERRED_TEXT = "已为您转接给工作人员{name}，请稍候。"
BACK_TO_QUEUE_TEXT = "正在为您转接其他工作人员，请稍候。在此期间医保小智可以继续为您解答。"
RELEASED_TEXT = "工作人员暂时离开了对话，您仍在人工服务队列中，请稍候。在此期间医保小智可以继续为您解答。"
CLOSED_TEXT = "本次人工服务已结束，感谢您的耐心。如还有问题，可以继续问医保小智。"

# Knowledge-base topics are the skills agents are routed by; labels are what the console shows.
INTENT_TOPICS = {
    "ask_e_voucher": "e_voucher",
    "ask_e_voucher_usage": "e_voucher",
    "ask_cross_region": "cross_region",
    "ask_cross_region_settlement": "cross_region",
    "ask_reimbursement": "reimbursement",
    "ask_reimbursement_ratio": "reimbursement",
    "ask_reimbursement_progress": "reimbursement",
    "ask_enrollment": "enrollment",
    "ask_lapse": "enrollment",
    "ask_transfer": "enrollment",
    "ask_personal_account": "personal_account",
    "ask_chronic_disease": "chronic_disease",
    "ask_maternity": "maternity",
    "ask_drug_catalog": "drug_catalog",
    "ask_designated_institution": "designated_institutions",
    "ask_card": "card",
    "ask_service_info": "service_info",
    "ask_referral": "referral",
    "ask_payment_reform": "payment_reform",
}
DISPOSITIONS = {
    "resolved": "已解决",
    "explained_policy": "已解释政策",
    "offline_handling": "需线下办理",
    "follow_up": "需后续跟进",
    "called_back": "已回电",
    "no_response": "居民未回应",
    "abandoned": "居民已离开",
    "invalid": "无效来电/咨询",
    "other": "其他",
}
REASON_LABELS = {
    "requested": "居民要求",
    "repeated_failure": "多次未答上",
    "urgent": "紧急",
    "complaint": "投诉",
    "degraded": "系统繁忙",
    "video": "视频求助",
}
PRIORITY_POINTS = {"urgent": 30, "complaint": 10, "repeated_failure": 10}
ELDERLY_POINTS = 20
CALL_CHANNELS = ("video", "phone")
_QUIET_INTENTS = {"greet", "goodbye", "thanks", "affirm", "deny", "inform", "stop", "bot_challenge"}
_INTERNAL_SLOTS = {"failed_turns", "last_topic", "requested_slot", "session_started_metadata"}


class DeskError(ApiError):
    """An action the queue refuses: an ``ApiError``, so the hub answers it with its status and Chinese message."""


@dataclass(frozen=True)
class ServiceHours:
    """When agents answer: local time ranges on some ISO weekdays."""

    ranges: tuple[tuple[int, int], ...]  # minutes since midnight, [start, end)
    days: frozenset[int]
    zone: ZoneInfo
    text: str

    @classmethod
    def parse(cls, hours: str, days: str, zone: str) -> ServiceHours:
        ranges = []
        for part in hours.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                start, end = (_minutes(x) for x in part.split("-"))
            except ValueError:
                raise ValueError(f"service hours must look like 08:30-17:30, got {part!r}") from None
            if end <= start:
                raise ValueError(f"service hours range {part!r} ends before it starts")
            ranges.append((start, end))
        day_set = frozenset(int(c) for c in days if c.isdigit() and 1 <= int(c) <= 7)
        if not ranges or not day_set:
            raise ValueError("service hours and days must not be empty")
        return cls(tuple(ranges), day_set, ZoneInfo(zone), "、".join(p.strip() for p in hours.split(",") if p.strip()))

    def open_at(self, when: dt.datetime) -> bool:
        local = when.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return local.isoweekday() in self.days and any(a <= minute < b for a, b in self.ranges)


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.strip().split(":")
    value = int(hours) * 60 + int(minutes)
    if not 0 <= value <= 24 * 60 or not 0 <= int(minutes) < 60:
        raise ValueError(hhmm)
    return value


def load_canned_responses(path: Path = CANNED_FILE) -> list[dict]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    for item in data.get("responses", []):
        if not isinstance(item, dict) or not str(item.get("text", "")).strip():
            log.warning("canned response without text skipped in %s", path)
            continue
        out.append(
            {
                "id": str(item.get("id", len(out) + 1)),
                "category": str(item.get("category", "通用")),
                "title": str(item.get("title", item["text"][:12])),
                "text": str(item["text"]).strip(),
            }
        )
    return out


def summarize(conv: Conversation, messages: list[Message]) -> dict:
    """What the resident wanted, for the agent: intents, filled slots, cited entries, failed turns."""
    intents: list[str] = []
    slots: dict = {}
    citations: dict[str, dict] = {}
    failed = 0
    last_topic = ""
    last_question = ""
    degraded = False
    resident_turns = 0
    for msg in messages:
        meta = msg.meta or {}
        if msg.role == "resident":
            resident_turns += 1
            if not any(word in msg.text for word in ESCALATION_WORDS) or len(msg.text) > 12:
                last_question = msg.text  # what they asked, not "转人工"
            continue
        if msg.role != "bot":
            continue
        intent = meta.get("intent")
        if intent and intent not in _QUIET_INTENTS and intent not in intents:
            intents.append(intent)
        if intent in INTENT_TOPICS:
            last_topic = INTENT_TOPICS[intent]
        for key, value in (meta.get("slots") or {}).items():
            if key not in _INTERNAL_SLOTS and value not in (None, "", []):
                slots[key] = mask_pii(value) if isinstance(value, str) else value
        if meta.get("region"):
            slots.setdefault("region", meta["region"])
        for cite in meta.get("citations") or []:
            if isinstance(cite, dict) and cite.get("id"):
                citations[cite["id"]] = {
                    "id": cite["id"],
                    "title": cite.get("title", ""),
                    "topic": cite.get("topic", ""),
                    "region": cite.get("region", ""),
                }
                last_topic = cite.get("topic") or last_topic
        if meta.get("outcome") in ("abstained", "clarifying"):
            failed += 1
        degraded = degraded or bool(meta.get("degraded"))
    if conv.region_code:
        slots.setdefault("region", conv.region_code)
    if not last_question and resident_turns:
        last_question = next(m.text for m in reversed(messages) if m.role == "resident")
    # The queue preview is shown to every matching agent before anyone takes the item, and the summary is
    # stored with the escalation: personal numbers are masked there (the transcript has them for the holder).
    last_question = mask_pii(last_question)[:120]
    return {
        "intents": intents,
        "slots": slots,
        "citations": list(citations.values()),
        "failed_turns": failed,
        "resident_turns": resident_turns,
        "last_question": last_question,
        "topic": last_topic if last_topic in TOPIC_LABELS else "",
        "degraded": degraded,
        "elderly": is_elderly(conv),
    }


def is_elderly(conv: Conversation, details: dict | None = None) -> bool:
    """Set by channels: the widget's elderly mode, a phone line for seniors (conversation meta ``elderly``)."""
    meta = conv.meta or {}
    age = meta.get("age")
    return bool(
        (details or {}).get("elderly")
        or meta.get("elderly")
        or meta.get("elderly_mode")
        or (isinstance(age, (int, float)) and age >= 60)
    )


def refine_reason(reason: str, messages: list[Message]) -> str:
    """The bot escalates with reason "requested"; its last escalating reply tells urgent, complaint or failures."""
    if reason != "requested":
        return reason
    bot = [m for m in messages if m.role == "bot"]
    for i in range(len(bot) - 1, -1, -1):
        meta = bot[i].meta or {}
        if meta.get("outcome") != "escalated":
            continue
        intent = meta.get("intent")
        if intent == "urgent":
            return "urgent"
        if intent == "complain":
            return "complaint"
        if intent != "request_human" and i > 0 and (bot[i - 1].meta or {}).get("outcome") in ("abstained", "clarifying"):
            return "repeated_failure"
        break
    return reason


class AgentDesk:
    def __init__(self, store: Store, conversations: ConversationService, accounts, settings: Settings) -> None:
        self.store = store
        self.conversations = conversations
        self.accounts = accounts
        self.settings = settings
        self.hours = ServiceHours.parse(
            settings.desk_service_hours, settings.desk_service_days, settings.desk_timezone
        )
        self.sla_warning_s = settings.desk_sla_warning_s
        self._online: dict[str, int] = {}  # agents with a desk socket on this replica
        self._remote_online: dict[str, tuple[list[str], float]] = {}  # other replicas' (agents, when told)
        self._watchers: set[asyncio.Queue] = set()
        self._presence_task: asyncio.Task | None = None
        self.canned = load_canned_responses()
        # called with (the item as it was, the time) when an agent takes an item (metrics: queue wait)
        self.claimed_hooks: list[Callable[[Escalation, dt.datetime], None]] = []
        # Queue changes and presence travel to every hub replica (xiaozhi/hub/infra/bus.py).
        self.bus = conversations.bus
        self.bus.on("desk", self._desk_event)

    async def start(self) -> None:
        """With other replicas listening: tell them who is online here, now and every PRESENCE_S."""
        if self.bus.shared and self._presence_task is None:
            self.bus.publish("desk", {"kind": "hello"})
            self._presence_task = asyncio.create_task(self._announce_presence())

    async def stop(self) -> None:
        if self._presence_task is not None:
            self._presence_task.cancel()
            await asyncio.gather(self._presence_task, return_exceptions=True)

    async def _announce_presence(self) -> None:
        while True:
            self._presence_changed()
            await asyncio.sleep(PRESENCE_S)

    def _desk_event(self, payload: dict, origin: str) -> None:
        kind = payload.get("kind")
        if origin != self.bus.replica:
            if kind == "hello":  # a replica started: it learns who is online here at once
                self._presence_changed()
                return
            if kind == "presence":
                self._remote_online[origin] = (list(payload.get("online") or []), time.monotonic())
        for queue in list(self._watchers):
            if queue.empty():  # one pending "changed" is enough: the socket re-reads the whole queue
                queue.put_nowait({"type": "queue_changed"})

    # -- presence and live updates -----------------------------------------------------------------
    def agent_online(self, username: str) -> None:
        self._online[username] = self._online.get(username, 0) + 1
        self._presence_changed()

    def agent_offline(self, username: str) -> None:
        left = self._online.get(username, 0) - 1
        if left > 0:
            self._online[username] = left
        else:
            self._online.pop(username, None)
        self._presence_changed()

    @property
    def online(self) -> list[str]:
        """Agents online on any replica (another replica's word lasts 3 x PRESENCE_S)."""
        fresh = time.monotonic() - 3 * PRESENCE_S
        remote = {name for names, told in self._remote_online.values() if told >= fresh for name in names}
        return sorted(set(self._online) | remote)

    def watch(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)

    def recheck_logins(self) -> None:
        """A login ended (logout, disabled account): every agent socket re-checks its token now."""
        self._changed()

    def _changed(self) -> None:
        self.bus.publish("desk", {"kind": "changed"})

    def _presence_changed(self) -> None:
        """Tell every replica (this one too: its sockets redraw) who is online here."""
        self.bus.publish("desk", {"kind": "presence", "online": sorted(self._online)})

    def in_service(self, now: dt.datetime | None = None) -> bool:
        return self.hours.open_at(now or utcnow())

    # -- entering the queue -----------------------------------------------------------------------
    async def enqueue(self, conv: Conversation, reason: str, **details) -> Escalation:
        """Queue a conversation for a person, or register a callback ticket out of hours."""
        existing = await self.open_item_for(conv.id)
        if existing is not None:  # asked twice: the first request keeps its place
            self.conversations.publish(conv.id, {"type": "escalated", "queue_id": existing.id, "status": existing.status})
            return existing
        messages = await self.store.transcript(conv.id)
        fresh = await self.store.get_conversation(conv.id) or conv
        summary = summarize(fresh, messages)
        reason = refine_reason(reason, messages)
        elderly = is_elderly(fresh, details)
        priority = PRIORITY_POINTS.get(reason, 0) + (ELDERLY_POINTS if elderly else 0)
        if summary["failed_turns"] >= 2 and reason != "repeated_failure":
            priority += PRIORITY_POINTS["repeated_failure"]
        try:
            priority = max(priority, int(details.get("priority") or 0))
        except (TypeError, ValueError):
            log.warning("conversation %s: ignoring priority %r", conv.id, details.get("priority"))
        topic = str(details.get("topic") or summary["topic"] or "")
        if topic not in TOPIC_LABELS:
            topic = ""
        summary["elderly"] = elderly
        staffed = self.in_service() and not (self.settings.desk_callback_when_no_agent_online and not self.online)
        esc = await self.store.add_escalation(
            conv.id,
            conv.channel,
            reason,
            priority=priority,
            topic=topic,
            status="waiting" if staffed else "callback",
            summary={**summary, "notes": []},
        )
        if conv.status != "with_agent" and fresh.status != "with_agent":
            await self.store.update_conversation(conv.id, status="escalated")
            conv.status = "escalated"
        log.info("conversation %s escalated (%s, priority %d, topic %s): queue item %s %s",
                 conv.id, reason, priority, topic or "-", esc.id, esc.status)
        self.conversations.publish(conv.id, {"type": "escalated", "queue_id": esc.id, "status": esc.status})
        if esc.status == "callback":
            how = CALLBACK_HOW.get(conv.channel, CALLBACK_HOW[""])
            await self.conversations.post(
                conv.id, "system", CALLBACK_TEXT.format(hours=self.hours.text, how=how), {"queue_id": esc.id}
            )
        elif details.get("announce"):  # asked with a button, not in words the bot already answered
            await self.conversations.post(conv.id, "system", QUEUED_TEXT, {"queue_id": esc.id})
        self._changed()
        return esc

    async def conversation_closed(self, conv: Conversation, reason: str) -> None:
        """A resident who leaves (hangs up) while waiting abandons the item; callbacks and held items stay."""
        async with self.store.sessions() as s, s.begin():
            result = await s.execute(
                update(Escalation)
                .where(Escalation.conversation_id == conv.id, Escalation.status == "waiting")
                .values(status="closed", closed_at=utcnow(), disposition="abandoned")
            )
        if result.rowcount:
            log.info("conversation %s closed (%s) while waiting: queue item abandoned", conv.id, reason)
            self._changed()

    # -- reading ----------------------------------------------------------------------------------
    async def get(self, item_id: int) -> Escalation | None:
        async with self.store.sessions() as s:
            return await s.get(Escalation, item_id)

    async def items(self, statuses: tuple[str, ...] = OPEN_STATUSES, limit: int = 500) -> list[Escalation]:
        async with self.store.sessions() as s:
            rows = await s.execute(
                select(Escalation)
                .where(Escalation.status.in_(statuses))
                .order_by(Escalation.priority.desc(), Escalation.id)
                .limit(limit)
            )
            return list(rows.scalars())

    async def open_item_for(self, conversation_id: str) -> Escalation | None:
        async with self.store.sessions() as s:
            return (
                await s.execute(
                    select(Escalation)
                    .where(Escalation.conversation_id == conversation_id, Escalation.status.in_(OPEN_STATUSES))
                    .order_by(Escalation.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()

    @staticmethod
    def is_supervisor(user: StaffUser) -> bool:
        from xiaozhi.hub.domain.accounts import Role

        return user.role_enum.at_least(Role.supervisor)

    def visible(self, user: StaffUser, item: Escalation) -> bool:
        """Supervisors see everything; an agent sees what they hold and open items for their skills."""
        if self.is_supervisor(user) or item.agent == user.username:
            return True
        if item.status not in ("waiting", "callback") or item.agent:
            return False
        return self._skilled(user, item)

    def _skilled(self, user: StaffUser, item: Escalation) -> bool:
        skills = list(user.skills or [])
        return self.is_supervisor(user) or not skills or not item.topic or item.topic in skills

    def item_out(self, item: Escalation, now: dt.datetime | None = None) -> dict:
        now = now or utcnow()
        created = aware(item.created_at)
        claimed = aware(item.claimed_at)
        closed = aware(item.closed_at)
        if item.status in ("waiting", "callback"):
            waited = (now - created).total_seconds()
        else:
            waited = ((claimed or closed or now) - created).total_seconds()
        summary = item.summary or {}
        return {
            "id": item.id,
            "conversation_id": item.conversation_id,
            "channel": item.channel,
            "reason": item.reason,
            "reason_label": REASON_LABELS.get(item.reason, item.reason),
            "status": item.status,
            "priority": item.priority or 0,
            "topic": item.topic or "",
            "topic_label": TOPIC_LABELS.get(item.topic or "", "综合"),
            "agent": item.agent or "",
            "created_at": created.isoformat(),
            "claimed_at": claimed.isoformat() if claimed else None,
            "closed_at": closed.isoformat() if closed else None,
            "disposition": item.disposition or "",
            "waiting_s": round(max(waited, 0.0), 1),
            "sla_warning": item.status == "waiting" and waited >= self.sla_warning_s,
            "elderly": bool(summary.get("elderly")),
            "last_question": summary.get("last_question", ""),
            "call_url": f"/agent/call?conversation={item.conversation_id}" if item.channel in CALL_CHANNELS else None,
        }

    async def queue_for(self, user: StaffUser, statuses: tuple[str, ...] = OPEN_STATUSES) -> list[dict]:
        now = utcnow()
        return [self.item_out(i, now) for i in await self.items(statuses) if self.visible(user, i)]

    async def detail(self, item: Escalation) -> dict:
        """The item, a fresh summary of the conversation (plus hand-off notes) and the full transcript."""
        conv = await self.store.get_conversation(item.conversation_id)
        messages = await self.store.transcript(item.conversation_id)
        summary = summarize(conv, messages) if conv is not None else {}
        summary["elderly"] = bool((item.summary or {}).get("elderly") or summary.get("elderly"))
        summary["notes"] = list((item.summary or {}).get("notes", []))
        return {
            "item": self.item_out(item),
            "conversation": {
                "id": item.conversation_id,
                "status": conv.status if conv else "",
                "channel": conv.channel if conv else item.channel,
                "region_code": conv.region_code if conv else "",
                "contact": conv.contact if conv else "",
                "entry_point": conv.entry_point if conv else "",
            },
            "summary": summary,
            "messages": [message_out(m) for m in messages],
        }

    # -- agent actions ----------------------------------------------------------------------------
    async def claim(self, user: StaffUser, item_id: int) -> Escalation:
        """Atomic: the conditional UPDATE succeeds for exactly one of two agents claiming together."""
        item = await self.get(item_id)
        if item is not None and item.status in ("claimed", "closed") and self._skilled(user, item):
            raise DeskError(409, "already_claimed", "这条已经被其他工作人员接起，或者已经结束。")
        item = self._check_visible(user, item)
        now = utcnow()
        async with self.store.sessions() as s, s.begin():
            result = await s.execute(
                update(Escalation)
                .where(Escalation.id == item_id, Escalation.status.in_(("waiting", "callback")))
                .values(
                    status="claimed",
                    agent=user.username,
                    claimed_at=func.coalesce(Escalation.claimed_at, now),
                )
            )
        if result.rowcount != 1:
            raise DeskError(409, "already_claimed", "这条已经被其他工作人员接起，或者已经结束。")
        for hook in self.claimed_hooks:
            hook(item, now)
        await self._hold(item.conversation_id, user, AGENT_JOINED_TEXT)
        self._changed()
        return await self.get(item_id)

    async def transfer(
        self, user: StaffUser, item_id: int, *, to_agent: str | None, topic: str | None, note: str
    ) -> Escalation:
        """To another agent (who then holds it), or back to the queue, optionally under another skill."""
        item = await self._held_item(user, item_id, allow_open=self.is_supervisor(user))
        if to_agent:
            target = await self.accounts.get_user(to_agent)
            if target is None or not target.active:
                raise DeskError(404, "agent_not_found", "没有这个工作人员，或者账号已停用。")
            if target.username == item.agent:
                raise DeskError(409, "same_agent", "这条已经由该工作人员处理。")
            values = {"status": "claimed", "agent": target.username}
            if item.claimed_at is None:
                values["claimed_at"] = utcnow()
            await self._update_if(item, values, user, note)
            await self._hold(item.conversation_id, target, TRANSFERRED_TEXT)
        else:
            if topic is not None and topic != "" and topic not in TOPIC_LABELS:
                raise DeskError(422, "unknown_topic", "没有这个业务类别。")
            values = {"status": "waiting", "agent": ""}
            if topic is not None:
                values["topic"] = topic
            await self._update_if(item, values, user, note)
            await self._hand_back(item.conversation_id, BACK_TO_QUEUE_TEXT)
        self._changed()
        return await self.get(item_id)

    async def release(self, user: StaffUser, item_id: int, note: str = "") -> Escalation:
        """The agent lets go: the item waits in the queue again and the bot answers meanwhile."""
        item = await self._held_item(user, item_id)
        await self._update_if(item, {"status": "waiting", "agent": ""}, user, note)
        await self._hand_back(item.conversation_id, RELEASED_TEXT)
        self._changed()
        return await self.get(item_id)

    async def close(
        self, user: StaffUser, item_id: int, disposition: str, note: str = "", end_conversation: bool = False
    ) -> Escalation:
        if disposition not in DISPOSITIONS:
            raise DeskError(422, "unknown_disposition", "请选择处理结果。")
        item = await self._held_item(user, item_id, allow_open=self.is_supervisor(user))
        values = {"status": "closed", "closed_at": utcnow(), "disposition": disposition}
        if not item.agent:
            values["agent"] = user.username
        await self._update_if(item, values, user, note)
        conv = await self.store.get_conversation(item.conversation_id)
        if conv is not None and conv.status != "closed":
            await self.conversations.post(conv.id, "system", CLOSED_TEXT, {"queue_id": item.id})
            if end_conversation:
                await self.conversations.close(conv, "agent_closed")
            else:
                await self.store.update_conversation(conv.id, status="open")
                self.conversations.publish(conv.id, {"type": "agent_left", "queue_id": item.id})
        self._changed()
        return await self.get(item_id)

    async def say(self, user: StaffUser, item_id: int, text: str) -> tuple[Escalation, Message]:
        """An agent's message to the resident: stored with role "agent", published to the resident's socket.
        Returns the item it was said in and the message."""
        item = await self._held_item(user, item_id)
        name = user.display_name or user.username
        msg = await self.conversations.post(
            item.conversation_id, "agent", text, {"agent": user.username, "agent_name": name, "queue_id": item.id}
        )
        return item, msg

    # -- helpers ----------------------------------------------------------------------------------
    async def visible_item(self, user: StaffUser, item_id: int) -> Escalation:
        """The item if this user may see it; 404 otherwise."""
        return self._check_visible(user, await self.get(item_id))

    def _check_visible(self, user: StaffUser, item: Escalation | None) -> Escalation:
        if item is None or not self.visible(user, item):
            # Not visible and not there look the same: an agent cannot probe other skills' items.
            raise DeskError(404, "not_found", "没有找到这条排队记录。")
        bind_conversation(item.conversation_id)  # the desk action's log lines name the conversation
        return item

    async def _held_item(self, user: StaffUser, item_id: int, *, allow_open: bool = False) -> Escalation:
        item = await self.visible_item(user, item_id)
        if item.status == "claimed" and (item.agent == user.username or self.is_supervisor(user)):
            return item
        if allow_open and item.status in ("waiting", "callback"):
            return item
        if item.status == "closed":
            raise DeskError(409, "closed", "这条已经结束。")
        raise DeskError(409, "not_holder", "请先接起这条再操作。")

    async def _update_if(self, item: Escalation, values: dict, user: StaffUser, note: str = "") -> None:
        """Apply ``values`` only if nobody changed the item since it was read (no lost updates); a
        non-empty ``note`` is added to the item's notes, signed by ``user``."""
        if note.strip():
            summary = dict(item.summary or {})
            entry = {"by": user.username, "at": utcnow().isoformat(), "text": note.strip()}
            summary["notes"] = [*summary.get("notes", []), entry]
            values = {**values, "summary": summary}
        async with self.store.sessions() as s, s.begin():
            result = await s.execute(
                update(Escalation)
                .where(Escalation.id == item.id, Escalation.status == item.status, Escalation.agent == item.agent)
                .values(**values)
            )
        if result.rowcount != 1:
            raise DeskError(409, "changed", "这条刚刚被其他人处理过，请刷新后再试。")

    async def _hold(self, conversation_id: str, agent: StaffUser, text: str) -> None:
        conv = await self.store.get_conversation(conversation_id)
        if conv is None or conv.status == "closed":
            return
        await self.store.update_conversation(conversation_id, status="with_agent")
        name = agent.display_name or agent.username
        await self.conversations.post(conversation_id, "system", text.format(name=name), {"agent": agent.username})
        self.conversations.publish(conversation_id, {"type": "agent_joined", "agent_name": name})

    async def _hand_back(self, conversation_id: str, text: str) -> None:
        conv = await self.store.get_conversation(conversation_id)
        if conv is None or conv.status == "closed":
            return
        await self.store.update_conversation(conversation_id, status="escalated")
        await self.conversations.post(conversation_id, "system", text)
        self.conversations.publish(conversation_id, {"type": "agent_left"})
