"""Video help and the phone bridge over WebRTC, the HTTP side: signalling (one HTTP offer/answer round trip per
side), chat beside the video, hang-up, live events, and the two pages (/video for residents, /agent/call).
What these do is the video channel's (xiaozhi/hub/channels/video.py); this module only translates HTTP.

Who may do what:
* the resident: the conversation token (kiosk: ``POST /api/video/sessions`` makes one, channel video);
* an agent: a staff token, and the conversation's escalation claimed by that agent
  (``status == "claimed"`` and ``agent == username``), or a supervisor/admin role.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from xiaozhi.hub.channels.live import Following
from xiaozhi.hub.deps import Bearer, ClientAddress, HubSettings, HubStore, StaffAccounts, Video, check_length, services_of
from xiaozhi.hub.domain.conversation import message_out
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.frames import receive_json_frame, refuse
from xiaozhi.hub.infra.owner import elsewhere, forward
from xiaozhi.hub.infra.schemas import MessageText

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/video", tags=["video"])
pages = APIRouter(include_in_schema=False)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

AGENT_RECHECK_S = 10.0  # how often an agent's open event socket re-checks the login and the claim


class OfferIn(BaseModel):
    sdp: str = Field(min_length=10, max_length=60000)
    type: str = Field("offer", max_length=16)
    recording_consent: bool = False


class ChatIn(BaseModel):
    text: MessageText = Field(max_length=2000)


class HangupIn(BaseModel):
    token: str | None = Field(None, max_length=200, description="For navigator.sendBeacon, which sends no headers.")


# -- resident ------------------------------------------------------------------------------------
@router.get("/config")
async def public_config(video: Video) -> dict:
    """What a page shows before anything starts (recording notice); ICE servers come with a session."""
    return video.page_config()


@router.post("/sessions", status_code=201)
async def create_kiosk_session(video: Video) -> dict:
    """A kiosk (no chat before): a new conversation on the video channel."""
    return await video.create_kiosk_session()


@router.get("/sessions/{conversation_id}")
async def session_info(conversation_id: str, request: Request, video: Video, token: Bearer, store: HubStore,
                       accounts: StaffAccounts, client: ClientAddress) -> dict:
    """State of the video session, the ICE servers to use and (for an agent) the transcript so far."""
    who, conv, user = await video.identify(conversation_id, token)
    session = video.get(conversation_id)
    owner = elsewhere(video.settings, conv)
    if owner and session is None:  # the session's state is known where it lives
        return await forward(request, owner)
    body = {
        "conversation_id": conv.id,
        "channel": conv.channel,
        "status": conv.status,
        "you": who,
        "session": session.describe() if session else None,
        **video.session_config(user.username if user else "resident"),
    }
    if who == "agent":
        body["contact"] = conv.contact  # stored masked
        body["messages"] = [message_out(m) for m in await store.transcript(conv.id)]
        # Staff reading a resident's transcript is on the record, as on the agent desk.
        await accounts.audit(user, "video.view", conv.id, {"messages": len(body["messages"])}, client=client)
    return body


@router.post("/sessions/{conversation_id}/resident/offer")
async def resident_offer(conversation_id: str, body: OfferIn, video: Video, token: Bearer, client: ClientAddress) -> dict:
    who, conv, _ = await video.identify(conversation_id, token)
    if who != "resident":
        raise ApiError(403, "residents_only", "这是居民端的入口。")
    return await video.resident_offer(conv, body.sdp, body.type, consent=body.recording_consent, client=client)


# -- agent ---------------------------------------------------------------------------------------
@router.post("/sessions/{conversation_id}/agent/offer")
async def agent_offer(conversation_id: str, body: OfferIn, request: Request, video: Video, token: Bearer,
                      accounts: StaffAccounts, client: ClientAddress) -> dict:
    user = await accounts.staff_for_token(token)
    conv = await video.authorise_agent(conversation_id, user)
    owner = elsewhere(video.settings, conv)
    if owner and video.get(conv.id) is None:  # another replica holds the resident's peer (or the call)
        return await forward(request, owner)
    return await video.agent_offer(conv, user, body.sdp, body.type, client=client)


# -- both ----------------------------------------------------------------------------------------
@router.post("/sessions/{conversation_id}/hangup")
async def hangup(conversation_id: str, request: Request, video: Video, token: Bearer, client: ClientAddress,
                 body: HangupIn | None = None) -> dict:
    """Either side ends the call (also sent by ``navigator.sendBeacon`` when the page is closed)."""
    who, conv, user = await video.identify(conversation_id, token or (body.token if body else None))
    owner = elsewhere(video.settings, conv)
    if owner and video.get(conv.id) is None:
        return await forward(request, owner)
    return {"closed": await video.hangup(conv, who, user, client=client)}


@router.post("/sessions/{conversation_id}/chat", status_code=201)
async def chat(conversation_id: str, body: ChatIn, video: Video, token: Bearer, settings: HubSettings,
               client: ClientAddress) -> dict:
    """Text beside the video; lands in the conversation's transcript (the bot does not answer here)."""
    who, conv, user = await video.identify(conversation_id, token)
    check_length(body.text, settings.max_message_chars)
    return {"message": message_out(await video.chat(conv, who, user, body.text, client=client))}


@router.websocket("/sessions/{conversation_id}/ws")
async def events(websocket: WebSocket, conversation_id: str, token: str | None = None) -> None:
    """Live events of the conversation: messages, and ``{"type": "video", "event": ...}`` (joins, end)."""
    services = services_of(websocket)
    video = services.video
    try:
        who, conv, user = await video.identify(conversation_id, token)
    except ApiError as exc:
        await refuse(websocket, exc)
        return
    await websocket.accept()
    if user is not None:  # staff following a resident's conversation live
        await services.accounts.audit(
            user, "video.watch", conv.id, {}, client=websocket.client.host if websocket.client else ""
        )
    following = Following(services.conversations, conv.id, websocket.send_json).start()
    session = video.get(conv.id)
    await websocket.send_json({"type": "video", "event": "state", "session": session.describe() if session else None})

    async def still_allowed() -> None:
        """Nothing after logout: an agent whose login or claim has gone leaves the call."""
        while True:
            await asyncio.sleep(AGENT_RECHECK_S)
            try:
                await video.identify(conv.id, token)
            except ApiError as exc:
                log.info("agent %s lost access to %s (%s): leaving the call", user.username, conv.id, exc.code)
                await video.drop_agent(conv.id, user.username)  # ...also when the call is held by another replica
                await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.code)
                return

    watcher = asyncio.create_task(still_allowed()) if who == "agent" else None
    try:
        who_label = f"video {conv.id} ({user.username if user else 'resident'})"
        frame_limit = services.settings.ws_max_frame_bytes
        while True:
            # Nothing is accepted from the socket yet beyond keep-alive pings ("{}"); garbage gets an error.
            await receive_json_frame(websocket, websocket.send_json, frame_limit, who_label)
    except WebSocketDisconnect:
        pass
    finally:
        following.stop()
        if watcher is not None:
            watcher.cancel()


# -- pages ---------------------------------------------------------------------------------------
@pages.get("/video")
async def resident_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "video.html", media_type="text/html; charset=utf-8")


@pages.get("/agent/call")
async def agent_call_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "agent_call.html", media_type="text/html; charset=utf-8")
