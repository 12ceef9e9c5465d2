"""Staff login, logout, who-am-I, account administration and the audit log.

Other routers protect their endpoints with ``Depends(require_role(Role.agent))`` (or supervisor,
admin); a resident's conversation token is never accepted here.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field, field_validator

from xiaozhi.hub.accounts import Accounts, LoginRejected, Role, StaffUser, UserExists
from xiaozhi.hub.errors import ApiError
from xiaozhi.hub.store import aware

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/staff", tags=["staff"])


def accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


async def staff_for_token(app, token: str | None) -> StaffUser:
    """The logged-in staff user behind ``token`` (also used by WebSocket endpoints)."""
    if not token:
        raise ApiError(401, "login_required", "请先登录工作台。")
    user = await app.state.accounts.user_for_token(token)
    if user is None:
        raise ApiError(401, "invalid_token", "登录已失效，请重新登录。")
    return user


async def current_staff(request: Request, authorization: Annotated[str | None, Header()] = None) -> StaffUser:
    user = await staff_for_token(request.app, bearer_token(authorization))
    request.state.staff = user
    return user


def require_role(minimum: Role):
    """A dependency that admits logged-in staff whose role is at least ``minimum``."""

    async def dependency(user: Annotated[StaffUser, Depends(current_staff)]) -> StaffUser:
        if not user.role_enum.at_least(minimum):
            raise ApiError(403, "forbidden", "您的账号没有这项操作的权限。")
        return user

    dependency.__name__ = f"require_{minimum.value}"
    return dependency


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


def _recheck_agent_sockets(request: Request) -> None:
    """Open agent-desk sockets re-check their login at once, so a dead login gets nothing more."""
    desk = getattr(request.app.state, "desk", None)
    if desk is not None:
        desk.recheck_logins()


@router.post("/login", response_model=LoginOut)
async def login(body: LoginIn, request: Request) -> LoginOut:
    try:
        user, token, expires = await accounts(request).login(body.username, body.password, client_address(request))
    except LoginRejected as exc:
        log.info("staff login rejected for %r from %s: %s", body.username, client_address(request), exc.reason)
        await accounts(request).audit(body.username, f"login.{exc.reason}", client=client_address(request))
        if exc.reason == "locked":
            raise ApiError(429, "too_many_attempts", "登录失败次数过多，请15分钟后再试。") from None
        if exc.reason == "throttled":
            raise ApiError(429, "too_many_attempts", "这个账号近期登录失败次数过多，请稍等一分钟再试。") from None
        raise ApiError(401, "bad_credentials", "用户名或密码不正确。") from None
    await accounts(request).audit(user, "login", client=client_address(request))
    return LoginOut(token=token, expires_at=expires, user=StaffOut.of(user))


@router.post("/logout", status_code=204)
async def logout(
    request: Request,
    user: Annotated[StaffUser, Depends(current_staff)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    await accounts(request).logout(bearer_token(authorization) or "")
    _recheck_agent_sockets(request)
    await accounts(request).audit(user, "logout", client=client_address(request))


@router.get("/me", response_model=StaffOut)
async def me(user: Annotated[StaffUser, Depends(current_staff)]) -> StaffOut:
    return StaffOut.of(user)


@router.get("/users", response_model=list[StaffOut])
async def list_users(request: Request, admin: Annotated[StaffUser, Depends(require_role(Role.admin))]) -> list[StaffOut]:
    users = await accounts(request).list_users()
    await accounts(request).audit(admin, "user.list", "", {"count": len(users)}, client=client_address(request))
    return [StaffOut.of(u) for u in users]


@router.post("/users", response_model=StaffOut, status_code=201)
async def create_user(
    body: UserCreate, request: Request, admin: Annotated[StaffUser, Depends(require_role(Role.admin))]
) -> StaffOut:
    try:
        user = await accounts(request).create_user(
            body.username, body.password, body.role, display_name=body.display_name, skills=body.skills
        )
    except UserExists:  # also when the name differs only in case ("Admin" beside "admin")
        raise ApiError(409, "user_exists", "这个用户名已经存在（用户名不区分大小写）。") from None
    await accounts(request).audit(
        admin, "user.create", body.username, {"role": body.role.value}, client=client_address(request)
    )
    return StaffOut.of(user)


@router.patch("/users/{username}", response_model=StaffOut)
async def update_user(
    username: str,
    body: UserUpdate,
    request: Request,
    admin: Annotated[StaffUser, Depends(require_role(Role.admin))],
) -> StaffOut:
    user = await accounts(request).update_user(username, **body.model_dump(exclude_none=True))
    if user is None:
        raise ApiError(404, "not_found", "没有这个用户。")
    _recheck_agent_sockets(request)
    changes = body.model_dump(exclude_none=True)
    if "password" in changes:
        changes["password"] = "changed"
    await accounts(request).audit(admin, "user.update", username, changes, client=client_address(request))
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
    request: Request,
    admin: Annotated[StaffUser, Depends(require_role(Role.admin))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    actor: str | None = None,
) -> list[AuditOut]:
    entries = await accounts(request).audit_log(limit, actor)
    # Reading the audit log is itself recorded (after the read, so the answer does not show it).
    await accounts(request).audit(
        admin, "audit.read", actor or "", {"limit": limit, "count": len(entries)}, client=client_address(request)
    )
    return [
        AuditOut(at=e.at, actor=e.actor, role=e.role, action=e.action, target=e.target, detail=e.detail, client=e.client)
        for e in entries
    ]
