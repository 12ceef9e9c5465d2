"""Staff accounts (agents, supervisors, admins), their login sessions, and the audit log.

Residents never have accounts: they hold a conversation token and nothing else. Staff log in with
a user name and password (argon2id hashes), receive a bearer token that is stored only as a hash,
and lose it on logout, on expiry, or when an admin disables the account. Every action an agent
or admin takes on someone else's data goes into the audit log.

Hashing and checking a password costs 0.1-0.25 s of CPU (argon2 is slow on purpose): it runs in a
worker thread, a few at a time, never on the event loop that answers chat and paces live calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import secrets
import time
from contextlib import asynccontextmanager

import anyio
from anyio import to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, delete, exists, func, select, update
from sqlalchemy.orm import Mapped, mapped_column

from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.store import Base, Store, aware, hash_token, utcnow

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    """Each role can do everything the roles below it can."""

    agent = "agent"  # works the escalation queue, talks to residents
    supervisor = "supervisor"  # + analytics, transfers, reassigns, sees every agent's work
    admin = "admin"  # + accounts and configuration

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: "Role") -> bool:
        return self.rank >= other.rank


_RANK = {Role.agent: 1, Role.supervisor: 2, Role.admin: 3}


class StaffUser(Base):
    __tablename__ = "staff_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    display_name: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    # Skills route queue items (topics such as cross_region, reimbursement); empty means all.
    skills: Mapped[list] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def role_enum(self) -> Role:
        return Role(self.role)


class StaffSession(Base):
    __tablename__ = "staff_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("staff_users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The address the login came from: addresses an account has logged in from are never slowed down.
    client: Mapped[str] = mapped_column(String(64), default="")


class LoginFailure(Base):
    """A wrong password (or unknown user), kept for the lockout window only.

    In the database, not in one replica's memory: behind a load balancer every replica must count
    the same guesses, or N replicas would allow N times as many.
    """

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_username_at", "username", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(64), default="")
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # user name, or "system"
    role: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(64))  # e.g. login, queue.claim, user.create
    target: Mapped[str] = mapped_column(String(128), default="")  # e.g. conversation id, user name
    detail: Mapped[dict] = mapped_column(JSON, default=dict)  # never raw personal data
    client: Mapped[str] = mapped_column(String(64), default="")


class UserExists(ValueError):
    """A user of this name exists already; names differing only in case count as the same name."""


class LoginRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # bad_credentials, locked (this address), throttled (this account)


class Accounts:
    """Staff users, login sessions and the audit log, on the hub's store."""

    def __init__(
        self,
        store: Store,
        *,
        session_hours: float = 12.0,
        max_failures: int = 5,
        lockout_s: float = 900.0,
        account_max_failures: int = 50,
        account_backoff_s: float = 60.0,
        hash_concurrency: int = 1,
        clock=time.time,
    ) -> None:
        self.store = store
        self.session_hours = session_hours
        # Lockout (docs/threat-model.md, "Staff login"): ``max_failures`` wrong passwords for one
        # account from one client address lock that pair for ``lockout_s``; other addresses are not
        # affected, so nobody can lock a colleague out from elsewhere. Across all addresses, more than
        # ``account_max_failures`` failures within ``lockout_s`` slow the account down instead: one
        # attempt per backoff period (doubling up to ``account_backoff_s``) from addresses the account
        # has not logged in from successfully; addresses it has logged in from are never slowed.
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.account_max_failures = account_max_failures
        self.account_backoff_s = account_backoff_s
        # Failures and known addresses live in the database (shared by every replica); ``clock``
        # gives wall-clock seconds (replicas compare each other's timestamps).
        self._clock = clock
        self._hasher = PasswordHasher()
        # Every argon2 hash/check runs in a worker thread, at most ``hash_concurrency`` at a time: a
        # burst of logins (200 wrong passwords from many addresses) waits its turn instead of blocking
        # the event loop or taking every core; the lockout and the per-address rate limit bound it.
        self._hash_limiter = anyio.CapacityLimiter(max(1, hash_concurrency))
        # Checking the lockout and recording the attempt happen under one lock per (account, address):
        # concurrent wrong passwords from one address no longer all pass the check before any is counted.
        self._attempt_locks = [asyncio.Lock() for _ in range(64)]
        # Verifying a hash for an unknown user costs the same as for a known one (no user probing).
        # Made (in a thread) by the first login, whatever its name, so even that one costs the same.
        self._dummy_hash: str | None = None

    # -- password hashing, in worker threads ----------------------------------------------------
    async def _in_thread(self, fn, *args):
        """Run argon2 work in a worker thread under the limiter. Not abandoned when the request is
        cancelled: the thread keeps its slot until it is done, so the limit really holds."""
        return await to_thread.run_sync(fn, *args, limiter=self._hash_limiter)

    async def _hash(self, password: str) -> str:
        return await self._in_thread(self._hasher.hash, password)

    def _check(self, password_hash: str, password: str) -> tuple[bool, str | None]:
        """(password matches, a new hash when the stored one uses outdated parameters); in a thread."""
        try:
            self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False, None
        return True, self._hasher.hash(password) if self._hasher.check_needs_rehash(password_hash) else None

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    # -- users ----------------------------------------------------------------------------------
    async def create_user(
        self,
        username: str,
        password: str,
        role: Role | str,
        *,
        display_name: str = "",
        skills: list[str] | None = None,
    ) -> StaffUser:
        role = Role(role)
        if len(password) < 10:
            raise ValueError("password must have at least 10 characters")
        if await self.name_taken(username):
            raise UserExists(f"user {username!r} exists (names are compared without regard to case)")
        user = StaffUser(
            username=username,
            display_name=display_name or username,
            role=role.value,
            password_hash=await self._hash(password),
            skills=skills or [],
        )
        async with self.store.sessions() as s, s.begin():
            s.add(user)
        return user

    async def name_taken(self, username: str) -> bool:
        """Whether a user of this name exists, ignoring case: "Admin" and "admin" cannot both exist."""
        async with self.store.sessions() as s:
            return (await s.execute(
                select(exists().where(func.lower(StaffUser.username) == username.lower()))
            )).scalar_one()

    async def get_user(self, username: str) -> StaffUser | None:
        async with self.store.sessions() as s:
            return (await s.execute(select(StaffUser).where(StaffUser.username == username))).scalar_one_or_none()

    async def list_users(self) -> list[StaffUser]:
        async with self.store.sessions() as s:
            return list((await s.execute(select(StaffUser).order_by(StaffUser.id))).scalars())

    async def count_users(self) -> int:
        return len(await self.list_users())

    async def update_user(
        self,
        username: str,
        *,
        role: Role | str | None = None,
        active: bool | None = None,
        password: str | None = None,
        display_name: str | None = None,
        skills: list[str] | None = None,
    ) -> StaffUser | None:
        new_hash = None
        if password is not None:
            if len(password) < 10:
                raise ValueError("password must have at least 10 characters")
            new_hash = await self._hash(password)  # before the transaction: no connection held while hashing
        async with self.store.sessions() as s, s.begin():
            user = (await s.execute(select(StaffUser).where(StaffUser.username == username))).scalar_one_or_none()
            if user is None:
                return None
            if role is not None:
                user.role = Role(role).value
            if display_name is not None:
                user.display_name = display_name
            if skills is not None:
                user.skills = skills
            if new_hash is not None:
                user.password_hash = new_hash
            if active is not None:
                user.active = active
            if active is False or password is not None or role is not None:
                # Whoever held this account's tokens must log in again with the new rights.
                await s.execute(
                    update(StaffSession)
                    .where(StaffSession.user_id == user.id, StaffSession.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                )
        return user

    # -- sessions -------------------------------------------------------------------------------
    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc)

    async def _locked(self, username: str, client: str) -> str | None:
        """Why a login attempt is refused before its password is checked: locked, throttled or None."""
        now = self._now()
        since = now - dt.timedelta(seconds=self.lockout_s)
        recent = (LoginFailure.username == username, LoginFailure.at > since)
        async with self.store.sessions() as s:
            pair = (await s.execute(
                select(func.count()).select_from(LoginFailure).where(*recent, LoginFailure.client == client)
            )).scalar_one()
            if pair >= self.max_failures:
                return "locked"
            count, last = (await s.execute(select(func.count(), func.max(LoginFailure.at)).where(*recent))).one()
            over = count - self.account_max_failures
            if over < 0:
                return None
            known = (await s.execute(select(exists().where(
                StaffSession.client == client,
                StaffSession.user_id == select(StaffUser.id).where(StaffUser.username == username).scalar_subquery(),
            )))).scalar_one()
        if known:
            return None
        wait = min(self.account_backoff_s, 2.0 ** min(over, 16))
        return "throttled" if (now - aware(last)).total_seconds() < wait else None

    @asynccontextmanager
    async def _attempt(self, username: str, client: str):
        """One login attempt at a time per (account, address): in this process by an asyncio lock, across
        replicas by the store's advisory lock (PostgreSQL)."""
        key = f"login:{username[:64]}:{client[:64]}"
        async with self._attempt_locks[hash(key) % len(self._attempt_locks)], self.store.exclusive(key):
            yield

    async def _failed(self, username: str, client: str) -> None:
        now = self._now()
        async with self.store.sessions() as s, s.begin():
            s.add(LoginFailure(username=username[:64], client=client[:64], at=now))
            # What has left every window goes: the table holds at most one lockout period of guesses.
            await s.execute(delete(LoginFailure).where(LoginFailure.at <= now - dt.timedelta(seconds=self.lockout_s)))

    async def login(self, username: str, password: str, client: str = "") -> tuple[StaffUser, str, dt.datetime]:
        """Returns the user, a new bearer token and its expiry; raises ``LoginRejected``.

        ``client`` is the caller's address: lockout counts failures per account and address.
        """
        async with self._attempt(username, client):
            refused = await self._locked(username, client)
            if refused:
                raise LoginRejected(refused)
            # Counted as a failure before the password is checked; a success below clears it. Attempts
            # running at the same time therefore see each other, and the sixth is locked out.
            await self._failed(username, client)
        dummy = await self._dummy()
        user = await self.get_user(username)
        matches, rehashed = await self._in_thread(self._check, user.password_hash if user else dummy, password)
        ok = matches and user is not None and user.active
        if not ok:
            raise LoginRejected("bad_credentials")  # recorded above
        token = secrets.token_urlsafe(32)
        expires = utcnow() + dt.timedelta(hours=self.session_hours)
        async with self.store.sessions() as s, s.begin():
            # Success clears this address's failures for the account (not other addresses').
            await s.execute(delete(LoginFailure).where(LoginFailure.username == username, LoginFailure.client == client))
            s.add(StaffSession(token_hash=hash_token(token), user_id=user.id, expires_at=expires, client=client[:64]))
            if rehashed is not None:
                fresh = await s.get(StaffUser, user.id)
                fresh.password_hash = rehashed
        return user, token, expires

    async def user_for_token(self, token: str) -> StaffUser | None:
        """The active user a live (not expired, not revoked) token belongs to."""
        async with self.store.sessions() as s:
            row = (
                await s.execute(
                    select(StaffSession, StaffUser)
                    .join(StaffUser, StaffUser.id == StaffSession.user_id)
                    .where(StaffSession.token_hash == hash_token(token))
                )
            ).first()
        if row is None:
            return None
        session, user = row
        if session.revoked_at is not None or aware(session.expires_at) <= utcnow() or not user.active:
            return None
        return user

    async def staff_for_token(self, token: str | None) -> StaffUser:
        """The logged-in staff user behind ``token``; 401 (login_required, invalid_token) otherwise."""
        if not token:
            raise ApiError(401, "login_required", "请先登录工作台。")
        user = await self.user_for_token(token)
        if user is None:
            raise ApiError(401, "invalid_token", "登录已失效，请重新登录。")
        return user

    async def logout(self, token: str) -> None:
        async with self.store.sessions() as s, s.begin():
            await s.execute(
                update(StaffSession)
                .where(StaffSession.token_hash == hash_token(token), StaffSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )

    # -- audit ----------------------------------------------------------------------------------
    async def audit(
        self,
        actor: StaffUser | str,
        action: str,
        target: str = "",
        detail: dict | None = None,
        client: str = "",
    ) -> None:
        name, role = (actor.username, actor.role) if isinstance(actor, StaffUser) else (actor, "")
        async with self.store.sessions() as s, s.begin():
            s.add(AuditEntry(actor=name, role=role, action=action, target=target, detail=detail or {}, client=client))
        log.info("audit: %s (%s) %s %s", name, role or "-", action, target)

    async def audit_log(self, limit: int = 200, actor: str | None = None) -> list[AuditEntry]:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if actor:
            query = query.where(AuditEntry.actor == actor)
        async with self.store.sessions() as s:
            return list((await s.execute(query)).scalars())
