"""The web-chat channel's live half: a resident's WebSocket turned into conversation-core turns.

Each text frame is checked (rate, shape, length, the conversation still open) and becomes
``ConversationService.handle``; the conversation's live events (the echo, the replies, an agent's words,
the close) come back through ``channels.live.Following``. HTTP turns are the chat router's and call the
same ``handle``.
"""

from __future__ import annotations

import logging
import math

from fastapi import WebSocket, WebSocketDisconnect

from xiaozhi.hub.channels.live import Following
from xiaozhi.hub.domain.conversation import ensure_open
from xiaozhi.hub.infra.errors import TURN_FAILED, ApiError
from xiaozhi.hub.infra.frames import close_if_open, receive_json_frame
from xiaozhi.hub.infra.schemas import clean_text, message_problem
from xiaozhi.hub.infra.security import via_proxy
from xiaozhi.hub.infra.store import Conversation

log = logging.getLogger(__name__)


async def serve_chat_socket(websocket: WebSocket, conv: Conversation, services) -> None:
    """An accepted socket of ``conv``: frames in, live events out, until the resident goes."""
    conversations = services.conversations
    settings = services.settings
    limit, frame_limit, limits = settings.max_message_chars, settings.ws_max_frame_bytes, services.limits
    try:
        async with Following(conversations, conv.id, websocket.send_json):
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
                await _turn(websocket, conv, payload.get("text", ""), services, limit)
    except WebSocketDisconnect:
        pass
    except Exception:  # never drop the socket without a close frame
        log.exception("conversation %s: the chat socket failed", conv.id)
        await close_if_open(websocket, 1011, "internal_error")


async def _turn(websocket: WebSocket, conv: Conversation, text, services, limit: int) -> None:
    problem = message_problem(text)
    if problem is not None:
        await websocket.send_json({"type": "error", "error": problem[0], "message": problem[1]})
        return
    text = clean_text(text)
    if len(text) > limit:
        log.info("conversation %s: rejected %d-character WebSocket message", conv.id, len(text))
        await websocket.send_json(
            {"type": "error", "error": "message_too_long", "message": f"消息太长了，请控制在{limit}字以内。"}
        )
        return
    current = await services.store.get_conversation(conv.id) or conv
    try:
        ensure_open(current)
    except ApiError as exc:
        log.info("conversation %s: message on a closed conversation refused", conv.id)
        await websocket.send_json({"type": "error", "error": exc.code, "message": exc.message})
        return
    if current.status != "with_agent":  # an agent answers in their own time
        await websocket.send_json({"type": "typing"})
    try:
        await services.conversations.handle(current, text)
    except ApiError as exc:
        await websocket.send_json({"type": "error", "error": exc.code, "message": exc.message})
    except Exception:  # the turn failed (the database?): say so honestly and keep the socket
        log.exception("conversation %s: a WebSocket turn failed", conv.id)
        await websocket.send_json({"type": "error", "error": "internal_error", "message": TURN_FAILED})
