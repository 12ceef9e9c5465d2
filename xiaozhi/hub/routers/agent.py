"""The agent desk API (/api/agent/...), its WebSocket and the console page (/agent).

Only logged-in staff (role agent or above) reach these endpoints; a resident's conversation token
is never accepted. Every action on a resident's conversation goes into the audit log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Literal

import anyio
import anyio.abc
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from xiaozhi.hub.channels.live import Following
from xiaozhi.hub.deps import AgentUser, ClientAddress, Desk, KnowledgeBase, StaffAccounts, services_of
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.conversation import message_out
from xiaozhi.hub.domain.desk import DISPOSITIONS, OPEN_STATUSES, REASON_LABELS, TOPIC_LABELS
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.frames import close_if_open, receive_json_frame, refuse
from xiaozhi.hub.infra.schemas import MessageText

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/agent", tags=["agent desk"])
page_router = APIRouter(include_in_schema=False)
AGENT_PAGE = Path(__file__).resolve().parent.parent / "static" / "agent" / "index.html"
# The socket re-sends the queue this often (waiting times, SLA flags stay current) and re-checks the
# login each time: a logged-out agent's socket closes within this many seconds at most.
QUEUE_REFRESH_S = 15.0

Agent = AgentUser
# Queue ids are database integers: anything outside them is a 422, not an overflow deep in the driver.
ItemId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


class TextIn(BaseModel):
    text: MessageText = Field(max_length=2000)


class TransferIn(BaseModel):
    to_agent: str | None = Field(None, max_length=64, description="User name of the agent to hand over to.")
    topic: str | None = Field(None, max_length=32, description="Back to the queue under this skill (topic).")
    note: str = Field("", max_length=500, description="For whoever picks it up next.")


class ReleaseIn(BaseModel):
    note: str = Field("", max_length=500)


class CloseIn(BaseModel):
    disposition: str = Field(description="One of GET /api/agent/config `dispositions`.")
    note: str = Field("", max_length=500)
    end_conversation: bool = Field(False, description="Also end the resident's conversation (e.g. hang up).")


async def _act(accounts: StaffAccounts, client: str, user: StaffUser, action: str, item,
               detail: dict | None = None) -> None:
    await accounts.audit(user, action, item.conversation_id, {"item": item.id, **(detail or {})}, client=client)


@router.get("/config")
async def config(user: Agent, d: Desk) -> dict:
    """What the console needs to draw itself: who is logged in, labels, dispositions, SLA, service hours."""
    return {
        "user": {"username": user.username, "display_name": user.display_name, "role": user.role,
                 "skills": list(user.skills or [])},
        "topics": TOPIC_LABELS,
        "reasons": REASON_LABELS,
        "dispositions": DISPOSITIONS,
        "sla_warning_s": d.sla_warning_s,
        "service_hours": d.hours.text,
        "in_service": d.in_service(),
    }


@router.get("/queue")
async def queue(
    d: Desk,
    user: Agent,
    status: Annotated[Literal["open", "waiting", "claimed", "callback", "closed"], Query()] = "open",
) -> dict:
    """Items this user may see: agents their skills' open items and their own; supervisors everything."""
    statuses = OPEN_STATUSES if status == "open" else (status,)
    return {
        "items": await d.queue_for(user, statuses),
        "online": d.online,
        "in_service": d.in_service(),
        "sla_warning_s": d.sla_warning_s,
    }


@router.get("/queue/{item_id}")
async def item_detail(item_id: ItemId, user: Agent, d: Desk, accounts: StaffAccounts, client: ClientAddress) -> dict:
    """The item, a summary of what the resident wanted and the full transcript."""
    item = await d.visible_item(user, item_id)
    await _act(accounts, client, user, "queue.view", item)
    return await d.detail(item)


@router.post("/queue/{item_id}/claim")
async def claim(item_id: ItemId, user: Agent, d: Desk, accounts: StaffAccounts, client: ClientAddress) -> dict:
    item = await d.claim(user, item_id)
    await _act(accounts, client, user, "queue.claim", item)
    return await d.detail(item)


@router.post("/queue/{item_id}/transfer")
async def transfer(item_id: ItemId, body: TransferIn, user: Agent, d: Desk, accounts: StaffAccounts,
                   client: ClientAddress) -> dict:
    if not body.to_agent and body.topic is None and not body.note.strip():
        raise ApiError(422, "transfer_target", "请选择转给哪位工作人员，或者转回队列时写明备注。")
    item = await d.transfer(user, item_id, to_agent=body.to_agent, topic=body.topic, note=body.note)
    detail = {"to_agent": body.to_agent or "", "topic": body.topic or "", "note": bool(body.note.strip())}
    await _act(accounts, client, user, "queue.transfer", item, detail)
    return {"item": d.item_out(item)}


@router.post("/queue/{item_id}/release")
async def release(item_id: ItemId, user: Agent, d: Desk, accounts: StaffAccounts, client: ClientAddress,
                  body: ReleaseIn | None = None) -> dict:
    note = body.note if body else ""
    item = await d.release(user, item_id, note)
    await _act(accounts, client, user, "queue.release", item)
    return {"item": d.item_out(item)}


@router.post("/queue/{item_id}/close")
async def close(item_id: ItemId, body: CloseIn, user: Agent, d: Desk, accounts: StaffAccounts,
                client: ClientAddress) -> dict:
    item = await d.close(user, item_id, body.disposition, body.note, end_conversation=body.end_conversation)
    detail = {"disposition": body.disposition, "end_conversation": body.end_conversation}
    await _act(accounts, client, user, "queue.close", item, detail)
    return {"item": d.item_out(item)}


@router.post("/queue/{item_id}/messages", status_code=201)
async def say(item_id: ItemId, body: TextIn, user: Agent, d: Desk, accounts: StaffAccounts,
              client: ClientAddress) -> dict:
    """Send a message to the resident (only the agent holding the item, or a supervisor)."""
    item, msg = await d.say(user, item_id, body.text)
    await _act(accounts, client, user, "queue.message", item, {"chars": len(body.text)})
    return {"message": message_out(msg)}


@router.get("/canned")
async def canned(d: Desk, _: Agent) -> dict:
    """Canned responses (xiaozhi/hub/domain/canned_responses.yaml)."""
    return {"responses": d.canned}


@router.get("/kb/search")
async def kb_search(
    kb: KnowledgeBase,
    _: Agent,
    q: Annotated[str, Query(min_length=1, max_length=500)],
    region: Annotated[str | None, Query(pattern=r"^\d{6}$")] = None,
    k: Annotated[int, Query(ge=1, le=10)] = 5,
) -> dict:
    """Knowledge-base search for the console: ranked entries with their answers, steps and sources."""
    result = await asyncio.to_thread(kb.search, q, region=region, k=k)
    return {
        "confidence": round(result.confidence, 3),
        "abstain": result.abstain,
        "results": [
            {
                "id": hit.entry.id,
                "title": hit.entry.title,
                "answer": hit.entry.answer,
                "steps": list(hit.entry.steps),
                "citation": hit.entry.citation(),
            }
            for hit in result.hits
        ],
    }


@router.websocket("/ws")
async def agent_socket(websocket: WebSocket, token: str | None = None) -> None:
    """Live queue and held conversations.

    Receives ``{"type": "queue", "items": [...], "online": [...]}`` whenever the queue changes (and every
    15 s), ``{"type": "message", "conversation_id", "message"}`` for conversations this agent holds,
    ``{"type": "closed", "conversation_id"}``. Send ``{"type": "ping"}`` to get a pong.
    """
    services = services_of(websocket)
    try:
        user = await services.accounts.staff_for_token(token)
    except ApiError as exc:
        await refuse(websocket, exc)
        return
    if not user.role_enum.at_least(Role.agent):
        await websocket.close(code=4403, reason="forbidden")
        return
    await websocket.accept()
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


@page_router.get("/agent")
async def agent_page() -> FileResponse:
    """The agent console (plain HTML/JS/CSS under static/agent/)."""
    return FileResponse(AGENT_PAGE, media_type="text/html; charset=utf-8")
