"""The video channel: WebRTC video help and the agent's bridge into a phone call, as conversation-core calls.

``VideoChannel`` owns the hub's ``video.session.VideoManager`` (the peers and relays) and is its only user:
who may join a session (the resident's conversation token; the agent holding the claimed escalation, or a
supervisor), offers and answers, hang-up, chat beside the video, the system messages the transcript gets
when somebody joins or leaves, queueing a resident once their media connects, the phone bridge
(``PhoneService.attach_agent``), and hanging up when the conversation closes, on whichever replica
holds the session. The router (xiaozhi/hub/routers/video.py) only translates HTTP.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from video.ice import IceConfigError, ice_servers_for
from video.session import BadOffer, ClientSessionsFull, SessionGone, SessionsFull, VideoManager, VideoSession
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.conversation import preview
from xiaozhi.hub.infra.errors import ApiError
from xiaozhi.hub.infra.owner import owner_meta
from xiaozhi.hub.infra.store import Conversation, Escalation
from xiaozhi.log_context import bind_conversation

if TYPE_CHECKING:
    from xiaozhi.hub.domain.accounts import Accounts
    from xiaozhi.hub.domain.conversation import ConversationService
    from xiaozhi.hub.channels.phone.hotline import PhoneService
    from xiaozhi.hub.infra.store import Message, Store
    from xiaozhi.settings import Settings

log = logging.getLogger(__name__)

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


def capture(settings) -> dict:
    """XIAOZHI_VIDEO_CAPTURE (``640x480@15``) as getUserMedia constraints."""
    size, fps = settings.video_capture.split("@")
    width, height = size.split("x")
    return {"width": int(width), "height": int(height), "frameRate": int(fps)}


class VideoChannel:
    def __init__(self, settings: Settings, store: Store, conversations: ConversationService, accounts: Accounts,
                 phone: PhoneService | None) -> None:
        self.settings = settings
        self.store = store
        self.conversations = conversations
        self.accounts = accounts
        self.phone = phone
        self.manager = VideoManager(
            ice_servers=lambda: ice_servers_for(settings.ice_config(), "hub"),
            max_sessions=settings.video_max_sessions,
            recordings_dir=settings.var_dir / "recordings" if settings.video_recording else None,
            wait_timeout_s=settings.video_wait_timeout_s,
            connect_timeout_s=settings.video_connect_timeout_s,
            on_event=self.on_event,
            max_per_client=settings.video_max_sessions_per_client,
        )
        # The bus carries a close or an agent's logout from the replica where it happened to the one
        # holding the session.
        self.bus = conversations.bus
        self.bus.on("conversation", self._closed_on_another_replica)
        self.bus.on("video", self._agent_dropped_on_another_replica)

    # -- what the manager holds (read by tests and the metrics gauge) -------------------------------
    @property
    def sessions(self) -> dict[str, VideoSession]:
        return self.manager.sessions

    @property
    def peer_connections(self) -> int:
        return self.manager.peer_connections

    def get(self, conversation_id: str) -> VideoSession | None:
        return self.manager.get(conversation_id)

    async def close_all(self) -> None:
        await self.manager.close_all()

    # -- hooks ----------------------------------------------------------------------------------------
    async def conversation_closed(self, conv: Conversation, reason: str) -> None:
        """A closed hook: the conversation's session (if this replica holds it) hangs up."""
        await self.manager.close(conv.id, f"conversation_{reason}")

    def _closed_on_another_replica(self, payload: dict, origin: str):
        # Every replica publishes a conversation's "closed" event on the bus; the one holding its
        # video session (not necessarily the one that closed it) hangs up.
        conv_id, event = str(payload.get("id")), payload.get("event") or {}
        if origin != self.bus.replica and event.get("type") == "closed" and self.manager.get(conv_id) is not None:
            return self.manager.close(conv_id, f"conversation_{event.get('reason') or 'closed'}")
        return None

    def _agent_dropped_on_another_replica(self, payload: dict, origin: str):
        conv_id = str(payload.get("drop_agent"))
        if origin != self.bus.replica and self.manager.get(conv_id) is not None:
            return self.manager.drop_agent(conv_id, str(payload.get("agent")), "agent_logged_out")
        return None

    async def on_event(self, conversation_id: str, event: dict) -> None:
        """What the manager reports (joins, ends): published live, noted in the transcript, queued."""
        service = self.conversations
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
            conv = await self.store.get_conversation(conversation_id)
            if conv is not None and conv.status not in ("escalated", "with_agent", "closed"):
                await service.escalate(conv, reason="video")
        elif event.get("event") == "agent_connected":
            await service.post(conversation_id, "system", "工作人员已接入视频通话。", {"video": "agent_connected"})

    # -- who is asking ----------------------------------------------------------------------------------
    async def _latest_escalation(self, conversation_id: str) -> Escalation | None:
        async with self.store.sessions() as s:
            return (
                await s.execute(
                    select(Escalation)
                    .where(Escalation.conversation_id == conversation_id)
                    .order_by(Escalation.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()

    async def authorise_agent(self, conversation_id: str, user: StaffUser) -> Conversation:
        """The agent holding the conversation's escalation, or a supervisor/admin; otherwise 403."""
        conv = await self.store.get_conversation(conversation_id)
        if conv is None:
            raise ApiError(404, "not_found", "没有这个会话。")
        bind_conversation(conv.id)  # the session's log lines name the conversation (also a refusal's)
        if user.role_enum.at_least(Role.supervisor):
            return conv
        esc = await self._latest_escalation(conversation_id)
        if esc is not None and esc.status == "claimed" and getattr(esc, "agent", "") == user.username:
            return conv
        raise ApiError(403, "not_your_conversation", "这个会话不在您的名下，请先在工作台接起它。")

    async def identify(self, conversation_id: str, token: str | None) -> tuple[str, Conversation, StaffUser | None]:
        """("resident", conv, None) for the conversation's own token, ("agent", conv, user) for authorised staff."""
        if not token:
            raise ApiError(401, "missing_token", "缺少登录凭证。")
        conv = await self.store.conversation_for_token(token)
        if conv is not None:
            if conv.id != conversation_id:
                raise ApiError(403, "forbidden", "无权访问这个会话。")
            bind_conversation(conv.id)  # the session's log lines name the conversation
            return "resident", conv, None
        user = await self.accounts.staff_for_token(token)
        conv = await self.authorise_agent(conversation_id, user)
        return "agent", conv, user

    # -- what a page needs --------------------------------------------------------------------------------
    def ice(self, who: str) -> list[dict]:
        try:
            return ice_servers_for(self.settings.ice_config(), who)
        except IceConfigError:
            log.exception("bad ICE configuration")
            raise ApiError(503, "video_unavailable", "视频服务配置有误，暂时无法使用，请联系管理员。") from None

    def page_config(self) -> dict:
        """What a page shows before anything starts (recording notice); ICE servers come with a session."""
        s = self.settings
        return {
            "recording": s.video_recording,
            "consent_notice": CONSENT_NOTICE if s.video_recording else "",
            "capture": capture(s),
        }

    def session_config(self, who: str) -> dict:
        return {"ice_servers": self.ice(who), **self.page_config()}

    # -- the resident -------------------------------------------------------------------------------------
    async def create_kiosk_session(self) -> dict:
        """A kiosk (no chat before): a new conversation on the video channel."""
        conv, token = await self.store.create_conversation("video", self.settings.default_region, entry_point="kiosk")
        return {"session_id": conv.id, "token": token, **self.session_config("resident")}

    async def resident_offer(self, conv: Conversation, sdp: str, kind: str, *, consent: bool, client: str) -> dict:
        """The resident's peer answered; the conversation moves to the video channel (queued once media connects)."""
        if conv.status == "closed":
            raise ApiError(409, "conversation_closed", "这个会话已经结束，请重新发起视频咨询。")
        self.ice("hub")  # fail here, loudly, on a broken XIAOZHI_ICE_SERVERS
        video = self.manager
        record = self.settings.video_recording and consent
        try:
            answer = await video.resident_offer(conv.id, sdp, kind, record=record, client=client)
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
        if conv.channel != "video" or owner_meta(self.settings):
            # A chat conversation moves to video; with several replicas, this one now holds the session.
            meta = {**(conv.meta or {}), **owner_meta(self.settings)}
            if conv.channel != "video":
                meta["from_channel"] = conv.channel
            await self.store.update_conversation(conv.id, channel="video", meta=meta)
            conv.channel, conv.meta = "video", meta
        log.info("video session %s: resident's offer answered (recording %s); queued once its media connects",
                 conv.id, record)
        return {"sdp": answer.sdp, "type": answer.type, "recording": record}

    # -- the agent ----------------------------------------------------------------------------------------
    async def agent_offer(self, conv: Conversation, user: StaffUser, sdp: str, kind: str, *, client: str) -> dict:
        """The agent joins the resident's video, or (a phone conversation) is bridged into the live call."""
        self.ice("hub")
        video = self.manager
        try:
            if conv.channel == "phone":
                if self.phone is None:
                    raise ApiError(503, "phone_unavailable", "电话线路未启用，无法接通来电。")
                try:
                    leg = self.phone.attach_agent(conv.id)
                except KeyError:
                    raise ApiError(409, "call_ended", "来电已挂断，无法接通。") from None
                answer = await video.phone_offer(conv.id, user.username, leg, sdp, kind)
            else:
                answer = await video.agent_offer(conv.id, user.username, sdp, kind)
        except SessionsFull:
            raise ApiError(503, "video_full", "同时进行的音视频通话已达上限，请稍后再试。") from None
        except SessionGone:
            raise ApiError(409, "resident_not_here", "居民还没有进入视频通话，或已经离开。") from None
        except BadOffer as exc:
            log.info("bad SDP offer from agent %s for %s: %s", user.username, conv.id, preview(str(exc)))
            raise ApiError(400, "bad_sdp", "视频连接参数有误，请刷新页面重试。") from None
        medium = "phone" if conv.channel == "phone" else "video"
        await self.accounts.audit(user, f"{medium}.join", conv.id, {}, client=client)
        return {"sdp": answer.sdp, "type": answer.type, "kind": medium}

    async def drop_agent(self, conversation_id: str, username: str) -> None:
        """An agent whose login or claim has gone leaves the call, also when another replica holds it."""
        await self.manager.drop_agent(conversation_id, username, "agent_logged_out")
        self.bus.publish("video", {"drop_agent": conversation_id, "agent": username})

    # -- both -------------------------------------------------------------------------------------------
    async def hangup(self, conv: Conversation, who: str, user: StaffUser | None, *, client: str) -> bool:
        session = await self.manager.close(conv.id, f"{who}_hangup")
        if user is not None and session is not None:
            await self.accounts.audit(user, "video.hangup", conv.id, {}, client=client)
        return session is not None

    async def chat(self, conv: Conversation, who: str, user: StaffUser | None, text: str, *, client: str) -> Message:
        """Text beside the video; lands in the conversation's transcript (the bot does not answer here)."""
        meta = {"channel": "video"}
        if user is not None:
            meta["agent"] = user.username
        msg = await self.conversations.post(conv.id, who, text, meta)
        if user is not None:
            await self.accounts.audit(user, "video.message", conv.id, {"chars": len(text)}, client=client)
        return msg
