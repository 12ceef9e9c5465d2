"""The hub's FastAPI dependencies, in one place: the services, who is asking, and the limits.

Routers take what they need as typed parameters (``conv: ResidentConversation``, ``user: AgentUser``,
``desk: Desk``...) and import no other router. The services are the composition root's
(xiaozhi/hub/services.py), reached through ``app.state.services``.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.requests import HTTPConnection

from xiaozhi.hub.channels.video import VideoChannel
from xiaozhi.hub.domain.accounts import Accounts, Role, StaffUser
from xiaozhi.hub.domain.conversation import ConversationService, preview
from xiaozhi.hub.domain.desk import AgentDesk
from xiaozhi.hub.domain.surveys import SurveyService
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.store import Conversation, Store
from xiaozhi.hub.services import HubServices
from xiaozhi.log_context import bind_conversation
from xiaozhi.settings import Settings

log = logging.getLogger(__name__)


# -- the services ---------------------------------------------------------------------------------
def services_of(connection: HTTPConnection) -> HubServices:
    """The composition root of the app serving this request or WebSocket."""
    return connection.app.state.services


Services = Annotated[HubServices, Depends(services_of)]


def _service(name: str):
    """A dependency returning the running service ``name`` of the composition root."""

    def dependency(connection: HTTPConnection):
        return getattr(services_of(connection), name)

    dependency.__name__ = f"hub_{name}"
    return dependency


def loaded_knowledge_base(connection: HTTPConnection):
    """The hub's knowledge base; 503 while it is still loading."""
    kb = services_of(connection).knowledge_base
    if kb is None:
        raise ApiError(503, "kb_loading", "知识库正在加载，请稍后再试。")
    return kb


HubSettings = Annotated[Settings, Depends(_service("settings"))]
HubStore = Annotated[Store, Depends(_service("store"))]
Conversations = Annotated[ConversationService, Depends(_service("conversations"))]
StaffAccounts = Annotated[Accounts, Depends(_service("accounts"))]
Desk = Annotated[AgentDesk, Depends(_service("desk"))]
Surveys = Annotated[SurveyService, Depends(_service("surveys"))]
Video = Annotated[VideoChannel, Depends(_service("video"))]
KnowledgeBase = Annotated[object, Depends(loaded_knowledge_base)]  # 503 while it loads
MaybeKnowledgeBase = Annotated[object, Depends(_service("knowledge_base"))]  # None while it loads


# -- who is asking --------------------------------------------------------------------------------
def client_address(connection: HTTPConnection) -> str:
    return connection.client.host if connection.client else ""


ClientAddress = Annotated[str, Depends(client_address)]


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


def _bearer(authorization: Annotated[str | None, Header()] = None) -> str | None:
    return bearer_token(authorization)


Bearer = Annotated[str | None, Depends(_bearer)]


async def current_staff(request: Request, token: Bearer) -> StaffUser:
    user = await services_of(request).accounts.staff_for_token(token)
    request.state.staff = user
    return user


CurrentStaff = Annotated[StaffUser, Depends(current_staff)]


def require_role(minimum: Role):
    """A dependency that admits logged-in staff whose role is at least ``minimum``."""

    async def dependency(user: CurrentStaff) -> StaffUser:
        if not user.role_enum.at_least(minimum):
            raise ApiError(403, "forbidden", "您的账号没有这项操作的权限。")
        return user

    dependency.__name__ = f"require_{minimum.value}"
    return dependency


AgentUser = Annotated[StaffUser, Depends(require_role(Role.agent))]
SupervisorUser = Annotated[StaffUser, Depends(require_role(Role.supervisor))]
AdminUser = Annotated[StaffUser, Depends(require_role(Role.admin))]


async def conversation_for_token(session_id: str, token: str | None, store: Store) -> Conversation:
    """The resident's conversation ``session_id`` if ``token`` is its token (401/403 otherwise)."""
    if not token:
        raise ApiError(401, "missing_token")
    conv = await store.conversation_for_token(token)
    if conv is None:
        raise ApiError(401, "invalid_token")
    if conv.id != session_id:
        raise ApiError(403, "forbidden")
    bind_conversation(conv.id)  # this request's (or socket's) log lines name the conversation
    return conv


async def resident_conversation(session_id: str, token: Bearer, store: HubStore) -> Conversation:
    return await conversation_for_token(session_id, token, store)


ResidentConversation = Annotated[Conversation, Depends(resident_conversation)]


# -- limits ---------------------------------------------------------------------------------------
def check_length(text: str, limit: int) -> None:
    """A message over the character limit: 413 with the count, and a masked log line."""
    if len(text) > limit:
        log.info("rejected a %d-character message (limit %d): %s", len(text), limit, preview(text))
        raise ApiError(413, "message_too_long", f"消息太长了（{len(text)}字），请控制在{limit}字以内，分几次发送。")
