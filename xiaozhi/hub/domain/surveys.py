"""智能回访: follow-up satisfaction surveys after a conversation (or its escalation) closes.

- Web chat / video: the survey is offered in the conversation at once (the widget shows 1–5 and an
  optional comment); the resident answers with the conversation token, once.
- Phone: an outbound call through the SIP user agent after ``survey_delay_s``, never in the quiet
  hours (Asia/Shanghai), retried with doubling waits up to ``survey_max_attempts``; the resident
  presses 1–5 on the keypad.

Every survey is a row in ``surveys`` (one per conversation: answered once); comments are masked
before they are stored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable
from zoneinfo import ZoneInfo

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from xiaozhi.hub.infra.store import Base, Conversation, Store, aware, utcnow
from yibao_common.masking import mask_pii

log = logging.getLogger(__name__)

LOCAL_TZ = ZoneInfo("Asia/Shanghai")
QUESTION = "您好，这里是医保小智回访。请您为刚才的服务打分：1分很不满意，5分非常满意。"
PHONE_QUESTION = (
    "您好，这里是医保服务回访。请为刚才的服务打分，非常满意请按5，满意按4，一般按3，不满意按2，很不满意按1。"
)
PHONE_THANKS = "感谢您的评价，再见。"
PHONE_NO_ANSWER = "没有收到您的按键，我们稍后再联系您，再见。"

# pending: a phone survey waiting for its call; offered: shown in the chat; calling: a call is up;
# answered; failed: every attempt used; expired: nobody answered in time; unreachable: no channel to ask on.
OPEN_STATES = ("pending", "offered", "calling")
# A follow-up call rings for at most 45 s and waits 20 s for a key: one still "calling" after this
# long was cut off (its hub crashed or restarted) and is tried again.
CALL_STALE_S = 600


class Survey(Base):
    __tablename__ = "surveys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), unique=True, index=True)
    channel: Mapped[str] = mapped_column(String(16))  # web, phone, video
    region_code: Mapped[str] = mapped_column(String(6), default="")
    reason: Mapped[str] = mapped_column(String(32), default="")  # why the conversation closed
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    due_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(200), default="")
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    answered_via: Mapped[str] = mapped_column(String(16), default="")  # chat, keypad
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    answered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SurveyError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


def parse_quiet_hours(text: str) -> tuple[dt.time, dt.time] | None:
    """``"21:00-08:30"`` -> (21:00, 08:30); empty -> None (no quiet hours)."""
    text = text.strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", text)
    if not m:
        raise ValueError(f"quiet hours must look like 21:00-08:30, not {text!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"quiet hours out of range: {text!r}")
    return dt.time(h1, m1), dt.time(h2, m2)


@dataclass
class SurveyPolicy:
    delay_s: float = 600.0
    retry_s: float = 1800.0
    max_attempts: int = 3
    quiet: tuple[dt.time, dt.time] | None = (dt.time(21, 0), dt.time(8, 30))
    expire_hours: float = 72.0
    tz: dt.tzinfo = LOCAL_TZ

    @classmethod
    def from_settings(cls, settings) -> "SurveyPolicy":
        return cls(
            delay_s=settings.survey_delay_s,
            retry_s=settings.survey_retry_s,
            max_attempts=max(1, settings.survey_max_attempts),
            quiet=parse_quiet_hours(settings.survey_quiet_hours),
            expire_hours=settings.survey_expire_hours,
        )

    def in_quiet_hours(self, when: dt.datetime) -> bool:
        if self.quiet is None:
            return False
        start, end = self.quiet
        local = when.astimezone(self.tz).time()
        if start <= end:
            return start <= local < end
        return local >= start or local < end  # the window spans midnight

    def allowed(self, when: dt.datetime) -> dt.datetime:
        """``when``, or the end of the quiet hours it falls into."""
        if not self.in_quiet_hours(when):
            return when
        start, end = self.quiet  # type: ignore[misc]
        local = when.astimezone(self.tz)
        day = local.date()
        if start > end and local.time() >= start:  # evening part of a window across midnight
            day = day + dt.timedelta(days=1)
        return dt.datetime.combine(day, end, tzinfo=self.tz).astimezone(dt.timezone.utc)

    def first_call(self, closed_at: dt.datetime) -> dt.datetime:
        return self.allowed(closed_at + dt.timedelta(seconds=self.delay_s))

    def retry_at(self, now: dt.datetime, attempts_made: int) -> dt.datetime:
        return self.allowed(now + dt.timedelta(seconds=self.retry_s * 2 ** max(0, attempts_made - 1)))


# An outbound survey call: given the survey, returns the key pressed (1–5) or None (no answer, no key).
PhoneCaller = Callable[[Survey], Awaitable[int | None]]


def survey_out(s: Survey | None) -> dict | None:
    if s is None:
        return None
    return {
        "id": s.id,
        "status": s.status,
        "channel": s.channel,
        "question": QUESTION,
        "rating": s.rating,
        "answered_at": s.answered_at.isoformat() if s.answered_at else None,
    }


class SurveyService:
    def __init__(
        self,
        store: Store,
        policy: SurveyPolicy,
        *,
        phone_caller: PhoneCaller | None = None,
        publish: Callable[[str, dict], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.store = store
        self.policy = policy
        self.phone_caller = phone_caller
        self.publish = publish
        self.clock = clock
        self._calls: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings, store: Store, *, phone_caller: PhoneCaller | None = None,
                      publish: Callable[[str, dict], None] | None = None) -> "SurveyService":
        """The hub's survey service; bad quiet hours are logged and the default window used (chat still serves)."""
        try:
            policy = SurveyPolicy.from_settings(settings)
        except ValueError as exc:
            policy = SurveyPolicy()
            log.error("XIAOZHI_SURVEY_QUIET_HOURS ignored (%s); using 21:00-08:30", exc)
        return cls(store, policy, phone_caller=phone_caller, publish=publish)

    def start(self, poll_interval_s: float) -> None:
        """The phone follow-up poller (none when ``poll_interval_s`` is 0)."""
        if poll_interval_s > 0 and self._poller is None:
            self._poller = asyncio.create_task(self.poll_forever(poll_interval_s), name="survey-poller")

    async def stop(self) -> None:
        """The poller stopped and waited for; the phone caller's own SIP endpoint (if any) closed."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        close = getattr(self.phone_caller, "close", None)
        if close is not None:
            await close()

    # -- scheduling ---------------------------------------------------------------------------
    async def on_closed(self, conv: Conversation, reason: str) -> None:
        """ConversationService closed hook."""
        await self.schedule(conv, reason)

    async def schedule(self, conv: Conversation, reason: str = "") -> Survey:
        """One survey per conversation: a second close (e.g. of its escalation) returns the first."""
        now = self.clock()
        if conv.channel == "phone":
            status = "pending" if self.phone_caller is not None else "unreachable"
            closed = aware(conv.closed_at) if conv.closed_at else now
            due = self.policy.first_call(closed)
        else:
            status, due = "offered", now
        survey = Survey(
            conversation_id=conv.id,
            channel=conv.channel,
            region_code=conv.region_code or "",
            reason=reason[:32],
            status=status,
            due_at=due,
        )
        try:
            async with self.store.sessions() as s, s.begin():
                s.add(survey)
        except IntegrityError:
            existing = await self.for_conversation(conv.id)
            assert existing is not None
            return existing
        log.info(
            "survey %s scheduled for conversation %s (%s, %s, due %s)",
            survey.id,
            conv.id,
            conv.channel,
            status,
            due.isoformat(),
        )
        if status == "offered" and self.publish is not None:
            self.publish(conv.id, {"type": "survey", "survey": survey_out(survey)})
        return survey

    async def for_conversation(self, conversation_id: str) -> Survey | None:
        async with self.store.sessions() as s:
            return (
                await s.execute(select(Survey).where(Survey.conversation_id == conversation_id))
            ).scalar_one_or_none()

    # -- answers ------------------------------------------------------------------------------
    async def answer(self, conversation_id: str, rating: int, comment: str = "", *, via: str = "chat") -> Survey:
        if not isinstance(rating, int) or not 1 <= rating <= 5:
            raise SurveyError("invalid_rating", "评分应为1到5之间的整数。")
        now = self.clock()
        async with self.store.sessions() as s, s.begin():
            survey = (
                await s.execute(select(Survey).where(Survey.conversation_id == conversation_id))
            ).scalar_one_or_none()
            if survey is None:
                raise SurveyError("no_survey", "这次对话没有需要填写的回访问卷。")
            if survey.status == "answered":
                raise SurveyError("already_answered", "您已经评价过了，感谢您的反馈。")
            if survey.status not in OPEN_STATES:
                raise SurveyError("survey_closed", "这份回访问卷已经结束。")
            # conditional update: two answers racing, only one wins
            done = await s.execute(
                update(Survey)
                .where(Survey.id == survey.id, Survey.status.in_(OPEN_STATES))
                .values(
                    status="answered",
                    rating=rating,
                    comment=mask_pii(comment or "")[:500],
                    answered_via=via,
                    answered_at=now,
                )
            )
            if done.rowcount != 1:
                raise SurveyError("already_answered", "您已经评价过了，感谢您的反馈。")
        log.info("survey %s answered via %s: %d", survey.id, via, rating)
        return await self.for_conversation(conversation_id)  # type: ignore[return-value]

    # -- the phone side -----------------------------------------------------------------------
    async def run_due(self) -> int:
        """Place the calls that are due now (outside quiet hours); expire stale chat surveys.
        Returns the number of calls attempted."""
        now = self.clock()
        async with self.store.sessions() as s, s.begin():
            cutoff = now - dt.timedelta(hours=self.policy.expire_hours)
            await s.execute(
                update(Survey).where(Survey.status == "offered", Survey.created_at < cutoff).values(status="expired")
            )
        await self.sweep_closed_escalations()
        if self.phone_caller is None or self.policy.in_quiet_hours(now):
            return 0
        due = await self.claim(await self.due_ids(now), now)
        for survey in due:
            await self._call(survey)
        return len(due)

    async def due_ids(self, now: dt.datetime) -> list[int]:
        async with self.store.sessions() as s:
            rows = await s.execute(
                select(Survey.id)
                .where(Survey.status == "pending", Survey.due_at <= now)
                .order_by(Survey.due_at)
                .limit(20)
            )
            return list(rows.scalars())

    async def claim(self, survey_ids: list[int], now: dt.datetime) -> list[Survey]:
        """Take the surveys still pending for a call. With several hub replicas polling, each survey
        is claimed by one of them. While calling, due_at records when the call started (recover())."""
        claimed = []
        for survey_id in survey_ids:
            async with self.store.sessions() as s, s.begin():
                done = await s.execute(
                    update(Survey)
                    .where(Survey.id == survey_id, Survey.status == "pending")
                    .values(status="calling", attempts=Survey.attempts + 1, due_at=now)
                )
                if done.rowcount == 1:
                    claimed.append(await s.get(Survey, survey_id))
        return claimed

    async def _call(self, survey: Survey) -> None:
        assert self.phone_caller is not None
        error = ""
        try:
            digit = await self.phone_caller(survey)
        except Exception as exc:  # an unreachable trunk is a failed attempt, never a crash
            log.warning("survey %s call attempt %d failed: %s", survey.id, survey.attempts, exc)
            digit, error = None, f"{type(exc).__name__}: {exc}"[:200]
        if digit is not None and 1 <= digit <= 5:
            try:
                await self.answer(survey.conversation_id, digit, via="keypad")
                return
            except SurveyError as exc:
                log.info("survey %s keypad answer not stored: %s", survey.id, exc.code)
                return
        now = self.clock()
        async with self.store.sessions() as s, s.begin():
            row = await s.get(Survey, survey.id)
            if row is None or row.status != "calling":
                return
            row.last_error = error or ("no_key" if digit is None else f"bad_key:{digit}")
            if row.attempts >= self.policy.max_attempts:
                row.status = "failed"
            else:
                row.status = "pending"
                row.due_at = self.policy.retry_at(now, row.attempts)
        log.info("survey %s attempt %d unanswered (%s)", survey.id, survey.attempts, error or "no key")

    async def sweep_closed_escalations(self) -> int:
        """An agent can close the queue item and hand the conversation back to the bot without closing
        it: a person handled it, so it gets its survey too (found here, on the scheduler's round)."""
        from xiaozhi.hub.infra.store import Escalation

        since = self.clock() - dt.timedelta(hours=self.policy.expire_hours)
        async with self.store.sessions() as s:
            # IN, not JOIN + DISTINCT: PostgreSQL has no equality for the json column (conversations.meta).
            handled = select(Escalation.conversation_id).where(
                Escalation.status == "closed",
                Escalation.claimed_at.is_not(None),
                Escalation.closed_at >= since,
            )
            rows = await s.execute(
                select(Conversation)
                .outerjoin(Survey, Survey.conversation_id == Conversation.id)
                .where(Conversation.id.in_(handled), Survey.id.is_(None))
                .limit(100)
            )
            conversations = list(rows.scalars())
        for conv in conversations:
            await self.schedule(conv, "escalation_closed")
        return len(conversations)

    async def recover(self) -> None:
        """A call cut off by a crash or restart (of any replica) is tried again, its attempt still
        counted: one still "calling" CALL_STALE_S after it started. A call in progress on another
        replica is younger than that and is left alone."""
        started_before = self.clock() - dt.timedelta(seconds=CALL_STALE_S)
        async with self.store.sessions() as s, s.begin():
            await s.execute(
                update(Survey).where(Survey.status == "calling", Survey.due_at < started_before).values(status="pending")
            )

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.recover()
                await self.run_due()
            except Exception:
                log.exception("survey scheduler round failed")
            await asyncio.sleep(interval_s)
