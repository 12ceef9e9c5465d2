"""Video help and the phone bridge over WebRTC: signalling (one HTTP offer/answer round trip per side),
chat beside the video, hang-up, live events, and the two pages (/video for residents, /agent/call).

Who may do what:
* the resident: the conversation token (kiosk: ``POST /api/video/sessions`` makes one, channel video);
* an agent: a staff token, and the conversation's escalation claimed by that agent
  (``status == "claimed"`` and ``agent == username``), or a supervisor/admin role.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from video.ice import IceConfigError, ice_servers_for
from video.session import BadOffer, ClientSessionsFull, SessionGone, SessionsFull, VideoManager
from xiaozhi.hub.accounts import Role, StaffUser
from xiaozhi.hub.conversation import message_out, preview
from xiaozhi.hub.errors import ApiError
from xiaozhi.hub.frames import receive_json_frame
from xiaozhi.hub.owner import elsewhere, forward, owner_meta
from xiaozhi.hub.routers.chat import check_length
from xiaozhi.hub.routers.staff import bearer_token, client_address, staff_for_token
from xiaozhi.hub.schemas import MessageText
from xiaozhi.hub.store import Conversation, Escalation
from xiaozhi.log_context import bind_conversation

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/video", tags=["video"])
pages = APIRouter(include_in_schema=False)

AGENT_RECHECK_S = 10.0  # how often an agent's open event socket re-checks the login and the claim
FULL_MESSAGE = "视频客服线路已满，请稍后再试，或先通过文字咨询，我们会尽快为您服务。"
CLIENT_FULL_MESSAGE = "您这里已有进行中的视频咨询，请先结束其他视频通话再试，或先通过文字咨询。"
CONSENT_NOTICE = (
    "为保障服务质量和您的权益，本次视频通话将全程录音录像，录像仅用于服务质量核查和纠纷处理，"
    "按规定保存后删除。点击“同意并开始”即表示您同意录音录像。"
)
ENDED_TEXT = {
    "resident_hangup": "居民已挂断视频通话。",
    "agent_hangup": "工作人员已结束视频通话。",
    "caller_hung_up": "来电已挂断。",
    "no_agent_in_time": "等待时间过长，视频通话已结束，请稍后再试或留言。",
}


class OfferIn(BaseModel):
    sdp: str = Field(min_length=10, max_length=60000)
    type: str = Field("offer", max_length=16)
    recording_consent: bool = False


class ChatIn(BaseModel):
    text: MessageText = Field(max_length=2000)


class HangupIn(BaseModel):
    token: str | None = Field(None, max_length=200, description="For navigator.sendBeacon, which sends no headers.")


# -- the manager (one per app, made on first use) ------------------------------------------------
def manager(app) -> VideoManager:
    video = getattr(app.state, "video", None)
    if video is None:
        settings = app.state.settings
        _ice_for(app, "hub")  # fail here, loudly, on a broken XIAOZHI_ICE_SERVERS
        video = VideoManager(
            ice_servers=lambda: ice_servers_for(settings, "hub"),
            max_sessions=settings.video_max_sessions,
            recordings_dir=settings.var_dir / "recordings" if settings.video_recording else None,
            wait_timeout_s=settings.video_wait_timeout_s,
            connect_timeout_s=settings.video_connect_timeout_s,
            on_event=lambda conv_id, event: _on_event(app, conv_id, event),
            max_per_client=settings.video_max_sessions_per_client,
        )
        app.state.video = video

        bus = app.state.conversations.bus

        async def conversation_closed(conv: Conversation, reason: str) -> None:
            await video.close(conv.id, f"conversation_{reason}")

        def closed_on_another_replica(payload: dict, origin: str):
            # Every replica publishes a conversation's "closed" event on the bus; the one holding its
            # video session (not necessarily the one that closed it) hangs up.
            conv_id, event = str(payload.get("id")), payload.get("event") or {}
            if origin != bus.replica and event.get("type") == "closed" and video.get(conv_id) is not None:
                return video.close(conv_id, f"conversation_{event.get('reason') or 'closed'}")
            return None

        def agent_dropped_on_another_replica(payload: dict, origin: str):
            conv_id = str(payload.get("drop_agent"))
            if origin != bus.replica and video.get(conv_id) is not None:
                return video.drop_agent(conv_id, str(payload.get("agent")), "agent_logged_out")
            return None

        app.state.conversations.closed_hooks.append(conversation_closed)
        bus.on("conversation", closed_on_another_replica)
        bus.on("video", agent_dropped_on_another_replica)
    return video


async def _on_event(app, conversation_id: str, event: dict) -> None:
    service = app.state.conversations
    service.publish(conversation_id, event)
    if event.get("event") == "ended":
        reason = event.get("reason", "")
        text = ENDED_TEXT.get(reason, "视频通话已结束。")
        await service.post(conversation_id, "system", text, {"video": "ended", "reason": reason})
    elif event.get("event") == "agent_left":
        await service.post(conversation_id, "system", "工作人员已离开视频通话，正在为您安排其他工作人员。",
                           {"video": "agent_left", "reason": event.get("reason", "")})
    elif event.get("event") == "resident_connected":
        # Queued only now: an offer whose media never connects (anyone can make one) adds no queue item.
        conv = await app.state.store.get_conversation(conversation_id)
        if conv is not None and conv.status not in ("escalated", "with_agent", "closed"):
            await service.escalate(conv, reason="video")
    elif event.get("event") == "agent_connected":
        await service.post(conversation_id, "system", "工作人员已接入视频通话。", {"video": "agent_connected"})


# -- who is asking -------------------------------------------------------------------------------
async def _latest_escalation(app, conversation_id: str) -> Escalation | None:
    async with app.state.store.sessions() as s:
        return (
            await s.execute(
                select(Escalation)
                .where(Escalation.conversation_id == conversation_id)
                .order_by(Escalation.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()


async def authorise_agent(app, conversation_id: str, user: StaffUser) -> Conversation:
    """The agent holding the conversation's escalation, or a supervisor/admin; otherwise 403."""
    conv = await app.state.store.get_conversation(conversation_id)
    if conv is None:
        raise ApiError(404, "not_found", "没有这个会话。")
    bind_conversation(conv.id)  # the session's log lines name the conversation (also a refusal's)
    if user.role_enum.at_least(Role.supervisor):
        return conv
    esc = await _latest_escalation(app, conversation_id)
    if esc is not None and esc.status == "claimed" and getattr(esc, "agent", "") == user.username:
        return conv
    raise ApiError(403, "not_your_conversation", "这个会话不在您的名下，请先在工作台接起它。")


async def identify(app, conversation_id: str, token: str | None) -> tuple[str, Conversation, StaffUser | None]:
    """("resident", conv, None) for the conversation's own token, ("agent", conv, user) for authorised staff."""
    if not token:
        raise ApiError(401, "missing_token", "缺少登录凭证。")
    conv = await app.state.store.conversation_for_token(token)
    if conv is not None:
        if conv.id != conversation_id:
            raise ApiError(403, "forbidden", "无权访问这个会话。")
        bind_conversation(conv.id)  # the session's log lines name the conversation
        return "resident", conv, None
    user = await staff_for_token(app, token)
    conv = await authorise_agent(app, conversation_id, user)
    return "agent", conv, user


def _ice_for(app, who: str) -> list[dict]:
    try:
        return ice_servers_for(app.state.settings, who)
    except IceConfigError:
        log.exception("bad ICE configuration")
        raise ApiError(503, "video_unavailable", "视频服务配置有误，暂时无法使用，请联系管理员。") from None


# -- resident ------------------------------------------------------------------------------------
@router.get("/config")
async def public_config(request: Request) -> dict:
    """What a page shows before anything starts (recording notice); ICE servers come with a session."""
    return _page_config(request.app.state.settings)


@router.post("/sessions", status_code=201)
async def create_kiosk_session(request: Request) -> dict:
    """A kiosk (no chat before): a new conversation on the video channel."""
    conv, token = await request.app.state.store.create_conversation(
        "video", request.app.state.settings.default_region, entry_point="kiosk"
    )
    return {"session_id": conv.id, "token": token, **_session_config(request.app, "resident")}


def capture(settings) -> dict:
    """XIAOZHI_VIDEO_CAPTURE (``640x480@15``) as getUserMedia constraints."""
    size, fps = settings.video_capture.split("@")
    width, height = size.split("x")
    return {"width": int(width), "height": int(height), "frameRate": int(fps)}


def _page_config(settings) -> dict:
    return {
        "recording": settings.video_recording,
        "consent_notice": CONSENT_NOTICE if settings.video_recording else "",
        "capture": capture(settings),
    }


def _session_config(app, who: str) -> dict:
    return {"ice_servers": _ice_for(app, who), **_page_config(app.state.settings)}


@router.get("/sessions/{conversation_id}")
async def session_info(conversation_id: str, request: Request, authorization: Annotated[str | None, Header()] = None) -> dict:
    """State of the video session, the ICE servers to use and (for an agent) the transcript so far."""
    who, conv, user = await identify(request.app, conversation_id, bearer_token(authorization))
    session = manager(request.app).get(conversation_id)
    owner = elsewhere(request.app.state.settings, conv)
    if owner and session is None:  # the session's state is known where it lives
        return await forward(request, owner)
    body = {
        "conversation_id": conv.id,
        "channel": conv.channel,
        "status": conv.status,
        "you": who,
        "session": session.describe() if session else None,
        **_session_config(request.app, user.username if user else "resident"),
    }
    if who == "agent":
        body["contact"] = conv.contact  # stored masked
        body["messages"] = [message_out(m) for m in await request.app.state.store.transcript(conv.id)]
        # Staff reading a resident's transcript is on the record, as on the agent desk.
        await request.app.state.accounts.audit(
            user, "video.view", conv.id, {"messages": len(body["messages"])}, client=client_address(request)
        )
    return body


@router.post("/sessions/{conversation_id}/resident/offer")
async def resident_offer(
    conversation_id: str, body: OfferIn, request: Request, authorization: Annotated[str | None, Header()] = None
) -> dict:
    app = request.app
    who, conv, _ = await identify(app, conversation_id, bearer_token(authorization))
    if who != "resident":
        raise ApiError(403, "residents_only", "这是居民端的入口。")
    if conv.status == "closed":
        raise ApiError(409, "conversation_closed", "这个会话已经结束，请重新发起视频咨询。")
    video = manager(app)
    record = app.state.settings.video_recording and body.recording_consent
    try:
        answer = await video.resident_offer(conv.id, body.sdp, body.type, record=record, client=client_address(request))
    except ClientSessionsFull:
        log.info("video session for %s refused: its address holds %d sessions already", conv.id,
                 video.max_per_client)
        raise ApiError(429, "video_busy_here", CLIENT_FULL_MESSAGE) from None
    except SessionsFull:
        log.info("video session for %s refused: %d sessions live", conv.id, len(video.sessions))
        raise ApiError(503, "video_full", FULL_MESSAGE) from None
    except BadOffer as exc:
        log.info("bad SDP offer from the resident of %s: %s", conv.id, preview(str(exc)))
        raise ApiError(400, "bad_sdp", "视频连接参数有误，请刷新页面重试。") from None
    if conv.channel != "video" or owner_meta(app.state.settings):
        # A chat conversation moves to video; with several replicas, this one now holds the session.
        meta = {**(conv.meta or {}), **owner_meta(app.state.settings)}
        if conv.channel != "video":
            meta["from_channel"] = conv.channel
        await app.state.store.update_conversation(conv.id, channel="video", meta=meta)
        conv.channel, conv.meta = "video", meta
    log.info("video session %s: resident's offer answered (recording %s); queued once its media connects",
             conv.id, record)
    return {"sdp": answer.sdp, "type": answer.type, "recording": record}


# -- agent ---------------------------------------------------------------------------------------
@router.post("/sessions/{conversation_id}/agent/offer")
async def agent_offer(
    conversation_id: str, body: OfferIn, request: Request, authorization: Annotated[str | None, Header()] = None
) -> dict:
    app = request.app
    user = await staff_for_token(app, bearer_token(authorization))
    conv = await authorise_agent(app, conversation_id, user)
    video = manager(app)
    owner = elsewhere(app.state.settings, conv)
    if owner and video.get(conv.id) is None:  # another replica holds the resident's peer (or the call)
        return await forward(request, owner)
    try:
        if conv.channel == "phone":
            phone = getattr(app.state, "phone", None)
            if phone is None:
                raise ApiError(503, "phone_unavailable", "电话线路未启用，无法接通来电。")
            try:
                leg = phone.attach_agent(conv.id)
            except KeyError:
                raise ApiError(409, "call_ended", "来电已挂断，无法接通。") from None
            answer = await video.phone_offer(conv.id, user.username, leg, body.sdp, body.type)
        else:
            answer = await video.agent_offer(conv.id, user.username, body.sdp, body.type)
    except SessionsFull:
        raise ApiError(503, "video_full", "同时进行的音视频通话已达上限，请稍后再试。") from None
    except SessionGone:
        raise ApiError(409, "resident_not_here", "居民还没有进入视频通话，或已经离开。") from None
    except BadOffer as exc:
        log.info("bad SDP offer from agent %s for %s: %s", user.username, conv.id, preview(str(exc)))
        raise ApiError(400, "bad_sdp", "视频连接参数有误，请刷新页面重试。") from None
    await app.state.accounts.audit(
        user, f"{'phone' if conv.channel == 'phone' else 'video'}.join", conv.id, {}, client=client_address(request)
    )
    return {"sdp": answer.sdp, "type": answer.type, "kind": "phone" if conv.channel == "phone" else "video"}


# -- both ----------------------------------------------------------------------------------------
@router.post("/sessions/{conversation_id}/hangup")
async def hangup(
    conversation_id: str,
    request: Request,
    body: HangupIn | None = None,
    authorization: Annotated[str | None, Header()] = None,
) -> dict:
    """Either side ends the call (also sent by ``navigator.sendBeacon`` when the page is closed)."""
    token = bearer_token(authorization) or (body.token if body else None)
    who, conv, user = await identify(request.app, conversation_id, token)
    owner = elsewhere(request.app.state.settings, conv)
    if owner and manager(request.app).get(conv.id) is None:
        return await forward(request, owner)
    session = await manager(request.app).close(conv.id, f"{who}_hangup")
    if user is not None and session is not None:
        await request.app.state.accounts.audit(user, "video.hangup", conv.id, {}, client=client_address(request))
    return {"closed": session is not None}


@router.post("/sessions/{conversation_id}/chat", status_code=201)
async def chat(
    conversation_id: str, body: ChatIn, request: Request, authorization: Annotated[str | None, Header()] = None
) -> dict:
    """Text beside the video; lands in the conversation's transcript (the bot does not answer here)."""
    who, conv, user = await identify(request.app, conversation_id, bearer_token(authorization))
    check_length(body.text, request.app.state.settings.max_message_chars)
    meta = {"channel": "video"}
    if user is not None:
        meta["agent"] = user.username
    msg = await request.app.state.conversations.post(conv.id, who, body.text, meta)
    if user is not None:
        await request.app.state.accounts.audit(
            user, "video.message", conv.id, {"chars": len(body.text)}, client=client_address(request)
        )
    return {"message": message_out(msg)}


@router.websocket("/sessions/{conversation_id}/ws")
async def events(websocket: WebSocket, conversation_id: str, token: str | None = None) -> None:
    """Live events of the conversation: messages, and ``{"type": "video", "event": ...}`` (joins, end)."""
    app = websocket.app
    try:
        who, conv, user = await identify(app, conversation_id, token)
    except ApiError as exc:
        await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.code)
        return
    await websocket.accept()
    if user is not None:  # staff following a resident's conversation live
        await app.state.accounts.audit(
            user, "video.watch", conv.id, {}, client=websocket.client.host if websocket.client else ""
        )
    service = app.state.conversations
    queue = service.subscribe(conv.id)
    session = manager(app).get(conv.id)
    await websocket.send_json({"type": "video", "event": "state", "session": session.describe() if session else None})

    async def pump() -> None:
        while True:
            await websocket.send_json(await queue.get())

    async def still_allowed() -> None:
        """Nothing after logout: an agent whose login or claim has gone leaves the call."""
        while True:
            await asyncio.sleep(AGENT_RECHECK_S)
            try:
                await identify(app, conv.id, token)
            except ApiError as exc:
                log.info("agent %s lost access to %s (%s): leaving the call", user.username, conv.id, exc.code)
                await manager(app).drop_agent(conv.id, user.username, "agent_logged_out")
                # ...also when the call is held by another replica
                app.state.conversations.bus.publish("video", {"drop_agent": conv.id, "agent": user.username})
                await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.code)
                return

    sender = asyncio.create_task(pump())
    watcher = asyncio.create_task(still_allowed()) if who == "agent" else None
    try:
        who_label = f"video {conv.id} ({user.username if user else 'resident'})"
        frame_limit = app.state.settings.ws_max_frame_bytes
        while True:
            # Nothing is accepted from the socket yet beyond keep-alive pings ("{}"); garbage gets an error.
            await receive_json_frame(websocket, websocket.send_json, frame_limit, who_label)
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        if watcher is not None:
            watcher.cancel()
        service.unsubscribe(conv.id, queue)


# -- pages ---------------------------------------------------------------------------------------
@pages.get("/video")
async def resident_page(request: Request) -> FileResponse:
    return FileResponse(_static(request) / "video.html", media_type="text/html; charset=utf-8")


@pages.get("/agent/call")
async def agent_call_page(request: Request) -> FileResponse:
    return FileResponse(_static(request) / "agent_call.html", media_type="text/html; charset=utf-8")


def _static(request: Request):
    from xiaozhi.hub.app import STATIC_DIR

    return STATIC_DIR
