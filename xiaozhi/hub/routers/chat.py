"""Web chat: open a conversation, send a message, receive replies (HTTP or WebSocket), read the transcript.

A conversation is reached only with the token handed out when it was created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from xiaozhi.hub.channels.chat import serve_chat_socket
from xiaozhi.hub.domain.contacts import VISITOR_PATTERN
from xiaozhi.hub.domain.conversation import ensure_open, message_out
from xiaozhi.hub.deps import (Conversations, Desk, HubSettings, HubStore, ResidentConversation,
                              check_length, conversation_for_token, services_of)
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.frames import refuse
from xiaozhi.hub.infra.schemas import MessageText

router = APIRouter(prefix="/api/sessions", tags=["chat"])
pages = APIRouter(include_in_schema=False)
CHAT_PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


class SessionCreate(BaseModel):
    channel: Literal["web"] = "web"
    region: str | None = Field(None, pattern=r"^\d{6}$", description="GB/T 2260 code of the resident's region")
    visitor: str | None = Field(
        None,
        pattern=VISITOR_PATTERN,
        description="Random id the chat page keeps in the browser, so analytics can tell a visitor who comes "
        "back about the same question (repeat contact); nothing personal.",
    )


class SessionCreated(BaseModel):
    session_id: str
    token: str = Field(description="Keep it: it is the only way back into this conversation.")
    greeting: str


class MessageIn(BaseModel):
    text: MessageText = Field(description="What the resident wrote.")


GREETING = "您好，我是医保小智，可以为您解答医保电子凭证、异地就医、报销等问题。请问有什么可以帮您？"


@router.post("", status_code=201, response_model=SessionCreated)
async def create_session(store: HubStore, body: SessionCreate | None = None) -> SessionCreated:
    body = body or SessionCreate()
    meta = {"visitor": body.visitor} if body.visitor else None
    conv, token = await store.create_conversation(body.channel, body.region or "", meta=meta)
    return SessionCreated(session_id=conv.id, token=token, greeting=GREETING)


@router.post("/{session_id}/messages")
async def send_message(
    body: MessageIn, conv: ResidentConversation, conversations: Conversations, settings: HubSettings
) -> dict:
    check_length(body.text, settings.max_message_chars)
    incoming, replies = await conversations.handle(conv, body.text)
    return {"message": message_out(incoming), "replies": [message_out(m) for m in replies]}


@router.get("/{session_id}/messages")
async def transcript(
    store: HubStore,
    conv: ResidentConversation,
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="Only messages after this sequence number")] = 0,
) -> dict:
    messages = await store.transcript(conv.id, after_seq=after)
    return {"session_id": conv.id, "status": conv.status, "messages": [message_out(m) for m in messages]}


class EscalateIn(BaseModel):
    elderly: bool = Field(False, description="The widget is in elderly mode (适老化): the queue serves them first.")


@router.post("/{session_id}/escalate")
async def escalate(conv: ResidentConversation, desk: Desk, body: EscalateIn | None = None) -> dict:
    """The "转人工" button: queue the conversation for a person (a callback ticket out of service hours).

    Asking again keeps the first request's place. ``status``: waiting, claimed or callback."""
    ensure_open(conv)
    details = {"announce": True, **({"elderly": True} if body and body.elderly else {})}
    item = await desk.enqueue(conv, "requested", **details)
    return {"queue_id": item.id, "status": item.status}


@router.websocket("/{session_id}/ws")
async def chat_socket(websocket: WebSocket, session_id: str, token: str | None = None) -> None:
    """Send ``{"text": "..."}``; receive ``{"type": "message", "message": {...}}`` events as they happen."""
    services = services_of(websocket)
    try:
        conv = await conversation_for_token(session_id, token, services.store)
    except ApiError as exc:
        await refuse(websocket, exc)
        return
    await websocket.accept()
    await serve_chat_socket(websocket, conv, services)


@pages.get("/")
async def chat_page() -> FileResponse:
    return FileResponse(CHAT_PAGE, media_type="text/html; charset=utf-8")
