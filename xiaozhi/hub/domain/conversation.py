"""The conversation core every channel uses: persist the resident's turn, ask the dialogue engine, persist
and publish the replies. Channels (web chat, phone, video) differ only in the ``channel`` field.

What others add to it is registered by the composition root (xiaozhi/hub/services.py) through the
core's own hooks, never by replacing its methods: ``closed_hooks`` (awaited in order when a conversation
closes), ``turn_observers`` (told each turn's duration and replies, or ``None`` when it failed) and
``use_queue`` (the agent desk's enqueue, used by ``escalate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Awaitable, Callable

from knowledge_base.search import KnowledgeBase
from xiaozhi.hub.infra.bus import LocalBus
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.rasa_client import BotReply, RasaClient, RasaUnavailable
from xiaozhi.hub.infra.store import Conversation, Message, Store, utcnow
from xiaozhi.log_context import conversation_scope
from yibao_common.masking import mask_pii

log = logging.getLogger(__name__)

DEGRADED_NOTICE = "智能对话服务暂时繁忙，以下内容直接摘自医保政策知识库："
DEGRADED_NO_ANSWER = (
    "抱歉，智能对话服务暂时繁忙，您的问题已经记录下来。您可以稍后再问，或者说“转人工”由工作人员为您解答。"
)
ESCALATION_WORDS = ("转人工", "人工客服", "人工服务", "找人工", "真人", "接线员")
ESCALATED_REPLY = "好的，正在为您转接人工客服，请稍候。您前面说的内容工作人员都能看到，不用再重复。"


def message_out(msg: Message) -> dict:
    return {
        "seq": msg.seq,
        "role": msg.role,
        "text": msg.text,
        "status": msg.status,
        "created_at": msg.created_at.isoformat(),
        "meta": msg.meta or {},
    }


def reply_from_answer(answer, *, notice: str = "") -> BotReply:
    """A reply straight from the knowledge base's answer stage (used when Rasa cannot answer): the
    knowledge point that answers the question, with its citation, as the dialogue would give it."""
    return BotReply(
        text=f"{notice}{answer.text}",
        spoken=answer.spoken,
        outcome=answer.outcome,
        citations=answer.citations,
        steps=answer.steps,
        extra={"kb_confidence": answer.meta.get("kb_confidence"), "answers": answer.answers},
    )


class KeyedLocks:
    """One ``asyncio.Lock`` per key, kept only while someone holds or waits for it (a lock per
    conversation kept forever would grow with every conversation the hub ever saw)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def ensure_open(conv: Conversation | None) -> None:
    if conv is not None and conv.status == "closed":
        raise ApiError(409, "conversation_closed", "这个对话已经结束，请重新开始对话。")


class ConversationService:
    def __init__(
        self,
        store: Store,
        rasa: RasaClient,
        knowledge_base: Callable[[], KnowledgeBase | None],
        bus: LocalBus | None = None,
    ) -> None:
        self.store = store
        # Live events reach the sockets of every hub replica (xiaozhi/hub/infra/bus.py).
        self.bus = bus or LocalBus()
        self.bus.on("conversation", self._deliver)
        self.rasa = rasa
        self._kb = knowledge_base
        self._locks = KeyedLocks()
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._turns: set[asyncio.Task] = set()
        # Awaited in order with (conversation, reason) when a conversation closes (desk, surveys, metrics, video).
        self.closed_hooks: list[Callable[[Conversation, str], Awaitable[None]]] = []
        # Called with (conversation, seconds, the stored replies or None when the turn failed) after each turn.
        self.turn_observers: list[Callable[[Conversation, float, list[Message] | None], None]] = []
        # The agent desk's enqueue when the hub runs one (``use_queue``): escalate() queues through it.
        self._enqueue: Callable[..., Awaitable[object]] | None = None

    def knowledge_base(self) -> KnowledgeBase | None:
        """The knowledge base serving now (None while it loads; a reload swaps it)."""
        return self._kb()

    def use_queue(self, enqueue: Callable[..., Awaitable[object]]) -> None:
        """Escalations go to ``enqueue(conv, reason, **details)`` (the agent desk) instead of a bare queue row."""
        self._enqueue = enqueue

    async def drain(self, timeout_s: float) -> bool:
        """Wait for turns in progress to finish (shutdown): their replies are stored before the store closes."""
        if not self._turns:
            return True
        _, pending = await asyncio.wait(set(self._turns), timeout=timeout_s)
        if pending:
            # each turn stores the resident's message first thing: what is lost is a reply
            log.warning("%d turn(s) still in progress at shutdown: cancelled", len(pending))
            for turn in pending:
                turn.cancel()
            await asyncio.wait(pending, timeout=5)
        return not pending

    # -- pub/sub for live channels (WebSocket) --------------------------------------------------
    def subscribe(self, conversation_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._subscribers[conversation_id].add(queue)
        return queue

    def unsubscribe(self, conversation_id: str, queue: asyncio.Queue) -> None:
        self._subscribers[conversation_id].discard(queue)
        if not self._subscribers[conversation_id]:
            self._subscribers.pop(conversation_id, None)

    async def post(self, conversation_id: str, role: str, text: str, meta: dict | None = None, *,
                   status: str = "answered") -> Message:
        """Store and publish a message that gets no bot turn (an agent's reply, a system notice, words a
        caller said on hold: those stay ``received``, i.e. not answered by the bot)."""
        msg = await self.store.add_message(conversation_id, role, text, status=status, meta=meta)
        self.publish(conversation_id, {"type": "message", "message": message_out(msg)})
        return msg

    def publish(self, conversation_id: str, event: dict) -> None:
        """Send an event to the conversation's live subscribers (resident and agent sockets), on
        every replica. A message too big for the bus reaches other replicas as its sequence number."""
        remote = None
        if event.get("type") == "message":
            remote = {"id": conversation_id, "event": {"type": "message_ref", "seq": event["message"]["seq"]}}
        self.bus.publish("conversation", {"id": conversation_id, "event": event}, remote)

    def _deliver(self, payload: dict, _origin: str):
        conversation_id, event = payload.get("id"), payload.get("event") or {}
        if conversation_id not in self._subscribers:
            return None
        if event.get("type") == "message_ref":
            return self._deliver_stored(conversation_id, int(event.get("seq") or 0))
        self._put(conversation_id, event)
        return None

    async def _deliver_stored(self, conversation_id: str, seq: int) -> None:
        for msg in await self.store.transcript(conversation_id, after_seq=seq - 1):
            if msg.seq == seq:
                self._put(conversation_id, {"type": "message", "message": message_out(msg)})

    def _put(self, conversation_id: str, event: dict) -> None:
        for queue in list(self._subscribers.get(conversation_id, ())):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stalled reader re-syncs from the transcript on reconnect
                log.warning("subscriber queue full for conversation %s", conversation_id)

    # -- turns ----------------------------------------------------------------------------------
    async def handle(self, conv: Conversation, text: str) -> tuple[Message, list[Message]]:
        """One resident turn. The resident's message is committed before anything else is tried.

        A closed conversation takes no more turns (409 ``conversation_closed``): the resident's
        client keeps the text and starts a new conversation with it."""
        ensure_open(conv)
        # An accepted turn runs to the end even when the resident's connection goes away (which
        # cancels the request): the reply is stored and waits in the transcript, and a half-done
        # database transaction is never abandoned. The task's log lines name the conversation.
        with conversation_scope(conv.id):
            turn = asyncio.create_task(self._handle(conv, text))
        self._turns.add(turn)
        turn.add_done_callback(self._turns.discard)
        started = time.perf_counter()
        try:
            incoming, replies = await asyncio.shield(turn)
        except Exception:
            self._observe(conv, time.perf_counter() - started, None)
            raise
        self._observe(conv, time.perf_counter() - started, replies)
        return incoming, replies

    def _observe(self, conv: Conversation, seconds: float, replies: list[Message] | None) -> None:
        for observer in list(self.turn_observers):
            try:
                observer(conv, seconds, replies)
            except Exception:  # counting a turn must never fail it
                log.exception("turn observer %r failed for conversation %s", observer, conv.id)

    async def _handle(self, conv: Conversation, text: str) -> tuple[Message, list[Message]]:
        # Committed (and echoed) at once, also while an earlier turn of this conversation still waits
        # for Rasa: a message the resident has seen accepted survives a crash of the hub.
        incoming = await self.post(conv.id, "resident", text, status="received")
        async with self._locks.hold(conv.id):  # turns reach the dialogue one at a time, in order
            current = await self.store.get_conversation(conv.id)
            if current is not None and current.status == "with_agent":
                # An agent holds the conversation: the bot stays silent, the agent's socket has the message.
                conv.status = current.status
                return incoming, []
            replies, understood = await self._dialogue(conv, text)
            slots = understood.get("slots") or {}
            stored = await self.store.add_messages(
                conv.id,
                [("bot", reply.text, {**reply.meta(), "slots": slots} if slots else reply.meta()) for reply in replies],
                reply_to=incoming.id,
                answered=incoming.id,
            )
            incoming.status = "answered"
            for msg in stored:
                self.publish(conv.id, {"type": "message", "message": message_out(msg)})
            if any(r.outcome == "escalated" for r in replies):
                await self.escalate(conv, reason="requested")
            if understood.get("region") and understood["region"] != conv.region_code:
                await self.store.update_conversation(conv.id, region_code=understood["region"])
            return incoming, stored

    async def _dialogue(self, conv: Conversation, text: str) -> tuple[list[BotReply], dict]:
        kb = self._kb()
        if kb is not None:
            # Most turns end in the knowledge base's answer: compute it on the other core while Rasa
            # parses the message, so the action's request (same message, same region) finds it ready.
            if kb.answerer is not None:
                from knowledge_base.answers import Context

                ahead = functools.partial(kb.answerer.answer_shared, text,
                                          Context(region=conv.region_code or None, deployment_region=kb.default_region))
            else:
                ahead = functools.partial(kb.prefetch, text)  # still loading: at least the query vector
            prefetch = asyncio.get_running_loop().run_in_executor(None, ahead)
            prefetch.add_done_callback(_log_prefetch_failure)
        try:
            replies, understood = await self.rasa.send(
                conv.id, text, {"channel": conv.channel, "region": conv.region_code or None}
            )
            region = understood.get("slots", {}).get("region")
            if region:
                understood["region"] = region
        except RasaUnavailable as exc:
            log.error("Rasa unavailable for conversation %s (%s): answering from the knowledge base", conv.id, exc)
            return [await self._degraded_reply(conv, text)], {}
        if not replies:
            # Rasa answered but said nothing: a custom action failed (action server down). The
            # resident still gets what the knowledge base knows.
            log.error("Rasa returned no reply for conversation %s (intent %s)", conv.id, understood.get("intent"))
            replies = [await self._degraded_reply(conv, text)]
        return replies, understood

    async def _degraded_reply(self, conv: Conversation, text: str) -> BotReply:
        """Rasa is down: still answer what the knowledge base can answer, and say so."""
        if any(word in text for word in ESCALATION_WORDS):
            return BotReply(text=ESCALATED_REPLY, outcome="escalated", extra={"degraded": True})
        kb = self._kb()
        if kb is not None and kb.answerer is not None:
            from knowledge_base.answers import Context

            context = Context(region=conv.region_code or None, deployment_region=kb.default_region)
            try:
                answer = await asyncio.to_thread(kb.answerer.answer_shared, text, context)
            except Exception:  # the knowledge base failing too must still not lose the turn
                log.exception("knowledge-base answer failed in degraded mode")
            else:
                if answer.outcome == "answered":
                    reply = reply_from_answer(answer, notice=DEGRADED_NOTICE)
                    reply.extra["degraded"] = True
                    return reply
        return BotReply(text=DEGRADED_NO_ANSWER, outcome="abstained", extra={"degraded": True})

    async def close(self, conv: Conversation, reason: str) -> bool:
        """End a conversation (resident left, agent closed it, call hung up); runs the closed hooks
        once, on the replica whose close took effect (True there)."""
        if conv.status == "closed" or not await self.store.close_conversation(conv.id):
            conv.status = "closed"  # already closed (here or by another replica): hooks ran then
            return False
        conv.status = "closed"
        self.publish(conv.id, {"type": "closed", "reason": reason})
        for hook in list(self.closed_hooks):
            try:
                await hook(conv, reason)
            except Exception:  # one failing hook (a survey) must not stop the others
                log.exception("closed hook %r failed for conversation %s", hook, conv.id)
        return True

    async def close_idle(self, open_after: dt.timedelta, waiting_after: dt.timedelta) -> int:
        """Close web conversations nobody has written in for a while: the resident has gone (their
        tab is closed). A conversation waiting for a person is given longer; one an agent holds is
        the agent's to close. Closing runs the hooks: survey, queue item marked abandoned."""
        now = utcnow()
        closed = 0
        for status, after in (("open", open_after), ("escalated", waiting_after)):
            for conv in await self.store.idle_conversations("web", status, now - after):
                closed += await self.close(conv, "idle")
        return closed

    async def close_idle_forever(self, open_after: dt.timedelta, waiting_after: dt.timedelta, every_s: float) -> None:
        while True:
            try:
                count = await self.close_idle(open_after, waiting_after)
                if count:
                    log.info("closed %d idle web conversation(s)", count)
            except Exception:
                log.exception("idle conversation sweep failed")
            await asyncio.sleep(every_s)

    async def escalate(self, conv: Conversation, reason: str, **details) -> None:
        """Put the conversation in the agent queue (``details``: e.g. priority, topic, elderly)."""
        if self._enqueue is not None:
            await self._enqueue(conv, reason, **details)
            return
        esc = await self.store.add_escalation(conv.id, conv.channel, reason)
        await self.store.update_conversation(conv.id, status="escalated")
        conv.status = "escalated"
        log.info("conversation %s escalated (%s), queue item %s", conv.id, reason, esc.id)
        self.publish(conv.id, {"type": "escalated", "queue_id": esc.id})


def _log_prefetch_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("answer prefetch failed: %s", future.exception())


def preview(text: str, limit: int = 80) -> str:
    """A masked, shortened form of a resident's text for log lines."""
    text = mask_pii(text.replace("\n", " "))
    return text if len(text) <= limit else text[:limit] + "…"
