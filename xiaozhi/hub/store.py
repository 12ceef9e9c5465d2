"""Durable conversations and messages (SQLAlchemy; SQLite by default, PostgreSQL by URL).

A resident's message is written here, committed, and only then handed to the dialogue engine:
whatever fails afterwards, what the resident said is kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from pathlib import Path

from sqlalchemy import JSON, event, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    channel: Mapped[str] = mapped_column(String(16))  # web, phone, video
    region_code: Mapped[str] = mapped_column(String(6), default="")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open, escalated, closed
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("conversation_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # resident, bot, agent, system
    text: Mapped[str] = mapped_column(Text)
    # For resident messages: received -> answered (or failed). Bot messages are stored answered.
    status: Mapped[str] = mapped_column(String(16), default="received")
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    reply_to: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Escalation(Base):
    """A conversation waiting for a person. The agent desk works this queue."""

    __tablename__ = "escalations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))  # requested, repeated_failure, urgent, degraded
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Store:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def create_schema(self) -> None:
        async with self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                # WAL keeps readers (transcripts) from blocking the writer (new messages). With WAL,
                # synchronous=NORMAL survives a killed process (only power loss can drop the last
                # commits) and saves an fsync per message.
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            await conn.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- conversations ----------------------------------------------------------------------------
    async def create_conversation(self, channel: str, region_code: str = "") -> tuple[Conversation, str]:
        token = secrets.token_urlsafe(32)
        conv = Conversation(
            id=str(uuid.uuid4()), token_hash=hash_token(token), channel=channel, region_code=region_code
        )
        async with self.sessions() as s, s.begin():
            s.add(conv)
        return conv, token

    async def conversation_for_token(self, token: str) -> Conversation | None:
        async with self.sessions() as s:
            return (
                await s.execute(select(Conversation).where(Conversation.token_hash == hash_token(token)))
            ).scalar_one_or_none()

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self.sessions() as s:
            return await s.get(Conversation, conversation_id)

    async def update_conversation(self, conversation_id: str, **fields) -> None:
        async with self.sessions() as s, s.begin():
            conv = await s.get(Conversation, conversation_id)
            if conv is not None:
                for key, value in fields.items():
                    setattr(conv, key, value)

    # -- messages ---------------------------------------------------------------------------------
    async def add_message(
        self,
        conversation_id: str,
        role: str,
        text: str,
        *,
        status: str = "received",
        meta: dict | None = None,
        reply_to: int | None = None,
    ) -> Message:
        (msg,) = await self.add_messages(
            conversation_id, [(role, text, meta or {})], status=status, reply_to=reply_to
        )
        return msg

    async def add_messages(
        self,
        conversation_id: str,
        messages: list[tuple[str, str, dict]],
        *,
        status: str = "answered",
        reply_to: int | None = None,
        answered: int | None = None,
    ) -> list[Message]:
        """Store (role, text, meta) messages in order, in one transaction; ``answered`` marks the
        resident message they reply to as answered in the same commit."""
        for attempt in range(5):
            try:
                async with self.sessions() as s, s.begin():
                    last = (
                        await s.execute(
                            select(func.max(Message.seq)).where(Message.conversation_id == conversation_id)
                        )
                    ).scalar() or 0
                    stored = [
                        Message(
                            conversation_id=conversation_id,
                            seq=last + i,
                            role=role,
                            text=text,
                            status=status,
                            meta=meta,
                            reply_to=reply_to,
                        )
                        for i, (role, text, meta) in enumerate(messages, start=1)
                    ]
                    s.add_all(stored)
                    if answered is not None:
                        incoming = await s.get(Message, answered)
                        if incoming is not None:
                            incoming.status = "answered"
                return stored
            except IntegrityError:  # two writers took the same seq: the loser takes the next one
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def transcript(self, conversation_id: str, after_seq: int = 0) -> list[Message]:
        async with self.sessions() as s:
            rows = await s.execute(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.seq > after_seq)
                .order_by(Message.seq)
            )
            return list(rows.scalars())

    async def add_escalation(self, conversation_id: str, channel: str, reason: str) -> Escalation:
        async with self.sessions() as s, s.begin():
            waiting = (
                await s.execute(
                    select(Escalation).where(
                        Escalation.conversation_id == conversation_id, Escalation.status == "waiting"
                    )
                )
            ).scalar_one_or_none()
            if waiting is not None:
                return waiting
            esc = Escalation(conversation_id=conversation_id, channel=channel, reason=reason)
            s.add(esc)
        return esc

    async def escalations(self, status: str = "waiting") -> list[Escalation]:
        async with self.sessions() as s:
            rows = await s.execute(select(Escalation).where(Escalation.status == status).order_by(Escalation.id))
            return list(rows.scalars())
