"""Staff login, logout, who-am-I, account administration and the audit log.

Other routers protect their endpoints with the role dependencies of xiaozhi/hub/deps.py (``AgentUser``,
``SupervisorUser``, ``AdminUser``); a resident's conversation token is never accepted here.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, field_validator

from xiaozhi.hub.deps import AdminUser, Bearer, ClientAddress, CurrentStaff, Services, StaffAccounts
from xiaozhi.hub.domain.accounts import LoginRejected, Role, StaffUser, UserExists
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.store import aware

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/staff", tags=["staff"])


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class StaffOut(BaseModel):
    username: str
    display_name: str
    role: Role
    skills: list[str] = []
    active: bool = True

    @classmethod
    def of(cls, user: StaffUser) -> "StaffOut":
        return cls(
            username=user.username,
            display_name=user.display_name,
            role=user.role_enum,
            skills=list(user.skills or []),
            active=user.active,
        )


class LoginOut(BaseModel):
    token: str = Field(description="Send as `Authorization: Bearer <token>`; revoked by logout.")
    expires_at: dt.datetime
    user: StaffOut


class UserCreate(BaseModel):
    username: str = Field(min_length=2, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    password: str = Field(min_length=10, max_length=256)
    role: Role
    display_name: str = Field("", max_length=64)
    skills: list[str] = Field(default_factory=list, max_length=20)


class UserUpdate(BaseModel):
    role: Role | None = None
    active: bool | None = None
    password: str | None = Field(None, min_length=10, max_length=256)
    display_name: str | None = Field(None, max_length=64)
    skills: list[str] | None = Field(None, max_length=20)


@router.post("/login", response_model=LoginOut)
async def login(body: LoginIn, accounts: StaffAccounts, client: ClientAddress) -> LoginOut:
    try:
        user, token, expires = await accounts.login(body.username, body.password, client)
    except LoginRejected as exc:
        log.info("staff login rejected for %r from %s: %s", body.username, client, exc.reason)
        await accounts.audit(body.username, f"login.{exc.reason}", client=client)
        if exc.reason == "locked":
            raise ApiError(429, "too_many_attempts", "登录失败次数过多，请15分钟后再试。") from None
        if exc.reason == "throttled":
            raise ApiError(429, "too_many_attempts", "这个账号近期登录失败次数过多，请稍等一分钟再试。") from None
        raise ApiError(401, "bad_credentials", "用户名或密码不正确。") from None
    await accounts.audit(user, "login", client=client)
    return LoginOut(token=token, expires_at=expires, user=StaffOut.of(user))


@router.post("/logout", status_code=204)
async def logout(user: CurrentStaff, token: Bearer, hub: Services, client: ClientAddress) -> None:
    await hub.accounts.logout(token or "")
    hub.desk.recheck_logins()  # open agent-desk sockets re-check their login at once: a dead login gets nothing more
    await hub.accounts.audit(user, "logout", client=client)


@router.get("/me", response_model=StaffOut)
async def me(user: CurrentStaff) -> StaffOut:
    return StaffOut.of(user)


@router.get("/users", response_model=list[StaffOut])
async def list_users(admin: AdminUser, accounts: StaffAccounts, client: ClientAddress) -> list[StaffOut]:
    users = await accounts.list_users()
    await accounts.audit(admin, "user.list", "", {"count": len(users)}, client=client)
    return [StaffOut.of(u) for u in users]


@router.post("/users", response_model=StaffOut, status_code=201)
async def create_user(body: UserCreate, admin: AdminUser, accounts: StaffAccounts, client: ClientAddress) -> StaffOut:
    try:
        user = await accounts.create_user(
            body.username, body.password, body.role, display_name=body.display_name, skills=body.skills
        )
    except UserExists:  # also when the name differs only in case ("Admin" beside "admin")
        raise ApiError(409, "user_exists", "这个用户名已经存在（用户名不区分大小写）。") from None
    await accounts.audit(admin, "user.create", body.username, {"role": body.role.value}, client=client)
    return StaffOut.of(user)


@router.patch("/users/{username}", response_model=StaffOut)
async def update_user(username: str, body: UserUpdate, admin: AdminUser, hub: Services,
                      client: ClientAddress) -> StaffOut:
    user = await hub.accounts.update_user(username, **body.model_dump(exclude_none=True))
    if user is None:
        raise ApiError(404, "not_found", "没有这个用户。")
    hub.desk.recheck_logins()
    changes = body.model_dump(exclude_none=True)
    if "password" in changes:
        changes["password"] = "changed"
    await hub.accounts.audit(admin, "user.update", username, changes, client=client)
    return StaffOut.of(user)


class AuditOut(BaseModel):
    at: dt.datetime

    @field_validator("at")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        return aware(value)  # RFC 3339 wants the offset

    actor: str
    role: str
    action: str
    target: str
    detail: dict
    client: str


@router.get("/audit", response_model=list[AuditOut])
async def audit_log(
    admin: AdminUser,
    accounts: StaffAccounts,
    client: ClientAddress,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    actor: str | None = None,
) -> list[AuditOut]:
    entries = await accounts.audit_log(limit, actor)
    # Reading the audit log is itself recorded (after the read, so the answer does not show it).
    await accounts.audit(admin, "audit.read", actor or "", {"limit": limit, "count": len(entries)}, client=client)
    return [
        AuditOut(at=e.at, actor=e.actor, role=e.role, action=e.action, target=e.target, detail=e.detail, client=e.client)
        for e in entries
    ]
