"""Web chat: open a conversation, send a message, receive replies (HTTP or WebSocket), read the transcript.

A conversation is reached only with the token handed out when it was created.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from xiaozhi.hub.conversation import ConversationService, ensure_open, message_out, preview
from xiaozhi.hub.errors import TURN_FAILED, ApiError
from xiaozhi.hub.frames import close_if_open, receive_json_frame
from xiaozhi.hub.routers.staff import bearer_token
from xiaozhi.hub.contacts import VISITOR_PATTERN
from xiaozhi.hub.schemas import MessageText, clean_text, message_problem
from xiaozhi.hub.security import via_proxy
from xiaozhi.hub.store import Conversation, Store
from xiaozhi.log_context import bind_conversation

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/sessions", tags=["chat"])


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


def service(request: Request) -> ConversationService:
    return request.app.state.conversations


def store(request: Request) -> Store:
    return request.app.state.store


async def _authorised(session_id: str, token: str | None, store: Store) -> Conversation:
    if not token:
        raise ApiError(401, "missing_token")
    conv = await store.conversation_for_token(token)
    if conv is None:
        raise ApiError(401, "invalid_token")
    if conv.id != session_id:
        raise ApiError(403, "forbidden")
    bind_conversation(conv.id)  # this request's (or socket's) log lines name the conversation
    return conv


async def resident_conversation(
    session_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Conversation:
    return await _authorised(session_id, bearer_token(authorization), store(request))


def check_length(text: str, limit: int) -> None:
    """A message over the character limit: 413 with the count, and a masked log line."""
    if len(text) > limit:
        log.info("rejected a %d-character message (limit %d): %s", len(text), limit, preview(text))
        raise ApiError(413, "message_too_long", f"消息太长了（{len(text)}字），请控制在{limit}字以内，分几次发送。")


@router.post("", status_code=201, response_model=SessionCreated)
async def create_session(request: Request, body: SessionCreate | None = None) -> SessionCreated:
    body = body or SessionCreate()
    meta = {"visitor": body.visitor} if body.visitor else None
    conv, token = await store(request).create_conversation(body.channel, body.region or "", meta=meta)
    return SessionCreated(session_id=conv.id, token=token, greeting=GREETING)


@router.post("/{session_id}/messages")
async def send_message(
    body: MessageIn,
    request: Request,
    conv: Annotated[Conversation, Depends(resident_conversation)],
) -> dict:
    check_length(body.text, request.app.state.settings.max_message_chars)
    incoming, replies = await service(request).handle(conv, body.text)
    return {"message": message_out(incoming), "replies": [message_out(m) for m in replies]}


@router.get("/{session_id}/messages")
async def transcript(
    request: Request,
    conv: Annotated[Conversation, Depends(resident_conversation)],
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="Only messages after this sequence number")] = 0,
) -> dict:
    messages = await store(request).transcript(conv.id, after_seq=after)
    return {"session_id": conv.id, "status": conv.status, "messages": [message_out(m) for m in messages]}


class EscalateIn(BaseModel):
    elderly: bool = Field(False, description="The widget is in elderly mode (适老化): the queue serves them first.")


@router.post("/{session_id}/escalate")
async def escalate(
    request: Request,
    conv: Annotated[Conversation, Depends(resident_conversation)],
    body: EscalateIn | None = None,
) -> dict:
    """The "转人工" button: queue the conversation for a person (a callback ticket out of service hours).

    Asking again keeps the first request's place. ``status``: waiting, claimed or callback."""
    ensure_open(conv)
    details = {"announce": True, **({"elderly": True} if body and body.elderly else {})}
    item = await request.app.state.desk.enqueue(conv, "requested", **details)
    return {"queue_id": item.id, "status": item.status}


@router.websocket("/{session_id}/ws")
async def chat_socket(websocket: WebSocket, session_id: str, token: str | None = None) -> None:
    """Send ``{"text": "..."}``; receive ``{"type": "message", "message": {...}}`` events as they happen."""
    app = websocket.app
    try:
        conv = await _authorised(session_id, token, app.state.store)
    except ApiError as exc:
        await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.code)
        return
    await websocket.accept()
    conversations: ConversationService = app.state.conversations
    queue = conversations.subscribe(conv.id)
    limit = app.state.settings.max_message_chars
    frame_limit = app.state.settings.ws_max_frame_bytes
    limits = app.state.limits

    async def pump() -> None:
        while True:
            await websocket.send_json(await queue.get())

    pump_task = asyncio.create_task(pump())
    try:
        while True:
            payload = await receive_json_frame(websocket, websocket.send_json, frame_limit, f"conversation {conv.id}")
            # Every frame counts against the conversation's message rate, garbage too.
            wait = await limits.check_message(conv.id, websocket.client.host if websocket.client else "",
                                              via_proxy(websocket.headers))
            if payload is None:  # garbage, answered; a client that keeps sending it is cut off
                if wait > 0:
                    log.warning("conversation %s: WebSocket closed after too many unusable frames", conv.id)
                    await close_if_open(websocket, 1008, "too_many_bad_frames")
                    return
                continue
            if wait > 0:
                await websocket.send_json(
                    {"type": "error", "error": "rate_limited", "message": "发送太频繁，请稍后再试。",
                     "retry_after": max(1, math.ceil(wait))}
                )
                continue
            text = payload.get("text", "")
            problem = message_problem(text)
            if problem is not None:
                await websocket.send_json({"type": "error", "error": problem[0], "message": problem[1]})
                continue
            text = clean_text(text)
            if len(text) > limit:
                log.info("conversation %s: rejected %d-character WebSocket message", conv.id, len(text))
                await websocket.send_json(
                    {"type": "error", "error": "message_too_long", "message": f"消息太长了，请控制在{limit}字以内。"}
                )
                continue
            current = await app.state.store.get_conversation(conv.id) or conv
            try:
                ensure_open(current)
            except ApiError as exc:
                log.info("conversation %s: message on a closed conversation refused", conv.id)
                await websocket.send_json({"type": "error", "error": exc.code, "message": exc.message})
                continue
            if current.status != "with_agent":  # an agent answers in their own time
                await websocket.send_json({"type": "typing"})
            try:
                await conversations.handle(current, text)
            except ApiError as exc:
                await websocket.send_json({"type": "error", "error": exc.code, "message": exc.message})
            except Exception:  # the turn failed (the database?): say so honestly and keep the socket
                log.exception("conversation %s: a WebSocket turn failed", conv.id)
                await websocket.send_json({"type": "error", "error": "internal_error", "message": TURN_FAILED})
    except WebSocketDisconnect:
        pass
    except Exception:  # never drop the socket without a close frame
        log.exception("conversation %s: the chat socket failed", conv.id)
        await close_if_open(websocket, 1011, "internal_error")
    finally:
        pump_task.cancel()
        conversations.unsubscribe(conv.id, queue)
