"""Durable conversations and messages (SQLAlchemy; SQLite by default, PostgreSQL by URL).

A resident's message is written here, committed, and only then handed to the dialogue engine:
whatever fails afterwards, what the resident said is kept.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import secrets
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import (
    JSON, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, event, func, select, text, update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from xiaozhi.hub.infra.schemas import clean_stored


log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives datetimes back naive; they were stored as UTC. (None stays None.)"""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Base(DeclarativeBase):
    pass


def _private_file(path: Path) -> None:
    """Create the SQLite file readable by this user only (0600; SQLite gives its -wal and -shm files the
    same mode), and tighten one an older release left world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if existing.exists():
            os.chmod(existing, 0o600)


def _storable(value):
    if isinstance(value, str):
        return clean_stored(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_storable(v) for v in value)
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    return value


def _storable_parameters(conn, cursor, statement, parameters, context, executemany):
    """Last line of defence: no text reaches the database with NUL (PostgreSQL refuses it, and the whole
    commit with it) or lone surrogates (not UTF-8): they are stored as U+FFFD. The API cleans what residents
    and staff write first (xiaozhi/hub/infra/schemas.py); this catches every other field."""
    return statement, _storable(parameters)


class Conversation(Base):
    __tablename__ = "conversations"
    # Live conversations by status and channel: the idle close's scan (status, channel, quiet since) and the
    # metrics' count of open conversations read this, not the whole table of closed ones (revision 0002).
    __table_args__ = (Index("ix_conversations_status_channel_updated", "status", "channel", "updated_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    channel: Mapped[str] = mapped_column(String(16))  # web, phone, video
    region_code: Mapped[str] = mapped_column(String(6), default="")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open, escalated, with_agent, closed
    # Who and where, masked before it is stored: a phone caller's number (138****5678), never in full.
    contact: Mapped[str] = mapped_column(String(32), default="")
    # Where the conversation came in: the dialled number on the merged hotline, the host page of the widget.
    entry_point: Mapped[str] = mapped_column(String(128), default="")
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


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


# A queue item still open: waiting in the queue, held by an agent, or waiting for a callback.
OPEN_STATUSES = ("waiting", "claimed", "callback")


class Escalation(Base):
    """A conversation waiting for a person. The agent desk works this queue."""

    __tablename__ = "escalations"
    # One open item per conversation, also when two replicas queue the same conversation at once.
    __table_args__ = (
        Index("uq_escalations_open_conversation", "conversation_id", unique=True,
              postgresql_where=text(f"status IN {OPEN_STATUSES!r}"), sqlite_where=text(f"status IN {OPEN_STATUSES!r}")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))  # requested, repeated_failure, urgent, degraded
    # waiting (in the queue), claimed (an agent holds it), callback (out of hours: call back), closed.
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The agent desk's fields (xiaozhi/hub/domain/desk.py). Analytics and the video desk read them by name.
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher first: urgent, elderly, repeated failure
    topic: Mapped[str] = mapped_column(String(32), default="")  # skill: knowledge-base topic, "" for anyone
    agent: Mapped[str] = mapped_column(String(64), default="")  # user name of the agent holding it
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # first claim
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    disposition: Mapped[str] = mapped_column(String(32), default="")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)  # what the resident wanted, notes of hand-offs


_SCHEMA_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> asyncio.Lock


class Store:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                _private_file(Path(path))
        self.engine: AsyncEngine = create_async_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(self.engine.sync_engine, "before_cursor_execute", _storable_parameters, retval=True)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """Run a block in one replica at a time (a PostgreSQL advisory lock named ``name``).

        Hub replicas starting together on an empty database otherwise all create the tables at once
        (all but one fail on PostgreSQL's catalog constraints) and could each create a first admin.
        SQLite is one hub's file: the block just runs.
        """
        if self.engine.dialect.name != "postgresql":
            yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        async with self.engine.connect() as conn:  # the lock belongs to this connection's session
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    async def schema_work(self, work):
        """``work(sync_connection)`` in one transaction, one replica at a time (migrations, ``xiaozhi db``).

        Also one at a time within a process: Alembic's ``op`` and ``context`` are module globals, which two
        migrations interleaving on one event loop would take from each other."""
        local = _SCHEMA_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with local, self.exclusive("xiaozhi.schema"), self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                # WAL keeps readers (transcripts) from blocking the writer (new messages). With WAL,
                # synchronous=NORMAL survives a killed process (only power loss can drop the last
                # commits) and saves an fsync per message.
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                # Python's sqlite3 starts a transaction only before a write of rows, so DDL before it would
                # commit as it goes: a failed migration would leave half its tables. One explicit BEGIN makes
                # the whole migration one transaction, as on PostgreSQL.
                await conn.exec_driver_sql("BEGIN")
            return await conn.run_sync(work)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- conversations ----------------------------------------------------------------------------
    async def create_conversation(
        self,
        channel: str,
        region_code: str = "",
        *,
        contact: str = "",
        entry_point: str = "",
        meta: dict | None = None,
    ) -> tuple[Conversation, str]:
        """``contact`` must already be masked (see ``yibao_common.masking``)."""
        token = secrets.token_urlsafe(32)
        conv = Conversation(
            id=str(uuid.uuid4()),
            token_hash=hash_token(token),
            channel=channel,
            region_code=region_code,
            contact=contact,
            entry_point=entry_point,
            meta=meta or {},
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

    async def close_conversation(self, conversation_id: str) -> bool:
        """Mark it closed unless it already is; True for the one caller (of any replica) that closed it."""
        async with self.sessions() as s, s.begin():
            done = await s.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.status != "closed")
                .values(status="closed", closed_at=utcnow(), updated_at=utcnow())
            )
            return done.rowcount == 1

    async def idle_conversations(self, channel: str, status: str, quiet_since: dt.datetime, limit: int = 200) -> list[Conversation]:
        """Conversations in ``status`` with neither a message nor a change since ``quiet_since``."""
        recent = select(Message.id).where(Message.conversation_id == Conversation.id, Message.created_at >= quiet_since)
        async with self.sessions() as s:
            rows = await s.execute(
                select(Conversation)
                .where(
                    Conversation.channel == channel,
                    Conversation.status == status,
                    Conversation.updated_at < quiet_since,
                    ~recent.exists(),
                )
                .limit(limit)
            )
            return list(rows.scalars())

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

    async def add_escalation(self, conversation_id: str, channel: str, reason: str, **fields) -> Escalation:
        """Queue a conversation; one that is already queued, held or waiting for a callback keeps its item.

        ``fields``: further Escalation columns (priority, topic, status, summary)."""
        open_item = (
            select(Escalation)
            .where(Escalation.conversation_id == conversation_id, Escalation.status.in_(OPEN_STATUSES))
            .order_by(Escalation.id.desc())
            .limit(1)
        )
        try:
            async with self.sessions() as s, s.begin():
                waiting = (await s.execute(open_item)).scalar_one_or_none()
                if waiting is not None:
                    return waiting
                esc = Escalation(conversation_id=conversation_id, channel=channel, reason=reason, **fields)
                s.add(esc)
            return esc
        except IntegrityError:  # another replica queued it between our read and our insert
            async with self.sessions() as s:
                waiting = (await s.execute(open_item)).scalar_one_or_none()
            if waiting is None:
                raise
            return waiting

    async def escalations(self, status: str = "waiting") -> list[Escalation]:
        async with self.sessions() as s:
            rows = await s.execute(select(Escalation).where(Escalation.status == status).order_by(Escalation.id))
            return list(rows.scalars())
