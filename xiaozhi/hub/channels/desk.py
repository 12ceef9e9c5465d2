"""The agent desk's live half: a logged-in agent's WebSocket serving the queue and the conversations the
agent holds.

The socket gets the queue whenever it changes (and every ``QUEUE_REFRESH_S``, which also re-checks the
login: a logged-out, expired or disabled agent's socket closes), and the live events of each conversation
the agent holds, through ``channels.live.Following`` as chat and video get theirs. The router checks the
token and role and accepts the socket; the rest is here.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc
from fastapi import WebSocket, WebSocketDisconnect

from xiaozhi.hub.channels.live import Following
from xiaozhi.hub.domain.accounts import StaffUser
from xiaozhi.hub.infra.frames import close_if_open, receive_json_frame

log = logging.getLogger(__name__)
# The socket re-sends the queue this often (waiting times, SLA flags stay current) and re-checks the
# login each time: a logged-out agent's socket closes within this many seconds at most.
QUEUE_REFRESH_S = 15.0


async def serve_desk_socket(websocket: WebSocket, user: StaffUser, token: str | None, services) -> None:
    """An accepted socket of ``user`` (an agent or above): queue and held conversations out, pings in."""
    d, conversations = services.desk, services.conversations
    changes = d.watch()
    d.agent_online(user.username)
    held: dict[str, Following] = {}  # the conversations this agent holds, each forwarded to the socket
    send_lock = anyio.Lock()
    gone = (WebSocketDisconnect, RuntimeError, anyio.ClosedResourceError, anyio.BrokenResourceError)

    async def send(payload: dict) -> None:
        async with send_lock:
            await websocket.send_json(payload)

    def labelled(conversation_id: str):
        async def forward(event: dict) -> None:
            await send({**event, "conversation_id": conversation_id})

        return forward

    def follow_held(items: list[dict]) -> None:
        """Subscribe to the conversations this agent holds now; drop the ones it no longer holds."""
        holding = {i["conversation_id"] for i in items if i["status"] == "claimed" and i["agent"] == user.username}
        for conversation_id in list(held):
            if conversation_id not in holding:
                held.pop(conversation_id).stop()
        for conversation_id in holding - set(held):
            held[conversation_id] = Following(conversations, conversation_id, labelled(conversation_id)).start()

    async def push_queue(tg: anyio.abc.TaskGroup) -> None:
        nonlocal user
        while True:
            # Never cancelled half-way through a database query (the agent leaving cancels this task):
            # an abandoned query would leave its connection mid-transaction.
            with anyio.CancelScope(shield=True):
                fresh = await services.accounts.user_for_token(token)
                items = await d.queue_for(fresh) if fresh is not None else []
            if fresh is None:  # logged out, expired or disabled: the socket goes too
                await websocket.close(code=4401, reason="invalid_token")
                tg.cancel_scope.cancel()
                return
            user = fresh
            follow_held(items)
            await send({"type": "queue", "items": items, "online": d.online, "in_service": d.in_service()})
            with anyio.move_on_after(QUEUE_REFRESH_S):
                await changes.get()

    async def receive(tg: anyio.abc.TaskGroup) -> None:
        frame_limit = services.settings.ws_max_frame_bytes
        while True:
            payload = await receive_json_frame(websocket, send, frame_limit, f"agent {user.username}")
            if payload is None:
                continue
            if payload.get("type") == "ping":
                await send({"type": "pong"})
            else:
                await send({"type": "error", "error": "unknown_type", "message": "不支持的消息类型，只接受 ping。"})

    async def guarded(part, tg: anyio.abc.TaskGroup) -> None:
        """Either half ending (the agent left, the login died, a fault) ends the socket."""
        try:
            await part(tg)
        except gone:
            pass
        except Exception:
            log.exception("agent %s: desk socket failed; closing it", user.username)
        finally:
            tg.cancel_scope.cancel()

    try:
        await send({"type": "hello", "user": {"username": user.username, "display_name": user.display_name,
                                               "role": user.role}})
        async with anyio.create_task_group() as tg:
            tg.start_soon(guarded, push_queue, tg)
            tg.start_soon(guarded, receive, tg)
    except gone:
        pass
    finally:
        # Ended by a fault or a cancellation before any close was sent: the console is told
        # (1011) and reconnects, rather than waiting on a socket nobody serves any more.
        await close_if_open(websocket, 1011, "internal_error")
        d.unwatch(changes)
        d.agent_offline(user.username)
        for following in held.values():
            following.stop()
