"""The agent desk API (/api/agent/...), its WebSocket and the console page (/agent).

Only logged-in staff (role agent or above) reach these endpoints; a resident's conversation token
is never accepted. Every action on a resident's conversation goes into the audit log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, WebSocket
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from xiaozhi.hub.channels.desk import serve_desk_socket
from xiaozhi.hub.deps import AgentUser, ClientAddress, Desk, KnowledgeBase, StaffAccounts, services_of
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.conversation import message_out
from xiaozhi.hub.domain.desk import DISPOSITIONS, OPEN_STATUSES, REASON_LABELS, TOPIC_LABELS
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.frames import refuse
from xiaozhi.hub.infra.schemas import MessageText

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/agent", tags=["agent desk"])
page_router = APIRouter(include_in_schema=False)
AGENT_PAGE = Path(__file__).resolve().parent.parent / "static" / "agent" / "index.html"

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
    await serve_desk_socket(websocket, user, token, services)


@page_router.get("/agent")
async def agent_page() -> FileResponse:
    """The agent console (plain HTML/JS/CSS under static/agent/)."""
    return FileResponse(AGENT_PAGE, media_type="text/html; charset=utf-8")
