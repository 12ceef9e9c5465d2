"""One reader for the hub's WebSocket frames (chat, agent desk, video): every socket answers
garbage the same way and never crashes on it."""

from __future__ import annotations

import contextlib
import json
import logging

import anyio
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

log = logging.getLogger(__name__)


async def close_if_open(websocket: WebSocket, code: int, reason: str) -> None:
    """Send the close frame unless one was sent or the client has gone; never skipped by a cancellation
    (the other half of a socket ending cancels this one: the close must still go out)."""
    if websocket.application_state != WebSocketState.CONNECTED or websocket.client_state == WebSocketState.DISCONNECTED:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.close(code=code, reason=reason)


async def receive_json_frame(websocket: WebSocket, send, frame_limit: int, who: str) -> dict | None:
    """The next JSON object from a staff or video socket, or None after answering garbage.

    A binary frame, invalid JSON or JSON that is not an object gets an error frame (code and a
    Chinese message) and the socket stays open; a frame over ``ws_max_frame_bytes`` (the chat
    socket's limit) closes it with 1009. A client that left raises WebSocketDisconnect.
    """
    frame = await websocket.receive()
    if frame["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(frame.get("code", 1000))
    raw = frame.get("text")
    if raw is None:
        log.info("%s: refused a binary WebSocket frame", who)
        await send({"type": "error", "error": "binary_not_supported", "message": "只支持文字（JSON）消息。"})
        return None
    if len(raw.encode("utf-8")) > frame_limit:
        log.info("%s: closed on a %d-character WebSocket frame", who, len(raw))
        with anyio.CancelScope(shield=True):  # the answer and the close go out together, or neither
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await send({"type": "error", "error": "frame_too_large", "message": "消息太长了，请分几次发送。"})
            await close_if_open(websocket, 1009, "frame_too_large")
        raise WebSocketDisconnect(1009)
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        log.info("%s: invalid JSON on the WebSocket", who)
        await send({"type": "error", "error": "invalid_json", "message": "消息不是合法的 JSON。"})
        return None
    if not isinstance(payload, dict):
        log.info("%s: a WebSocket message that is not a JSON object", who)
        await send({"type": "error", "error": "bad_message", "message": "消息格式有误，应为 JSON 对象。"})
        return None
    return payload


async def refuse(websocket: WebSocket, exc) -> None:
    """A socket whose token does not admit it (an ``ApiError``): closed before it is accepted, 4401 or 4403."""
    await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.code)
