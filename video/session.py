"""Video help sessions: the server is a WebRTC peer on both sides and relays between them.

    resident browser ──pc──► server ──pc──► agent browser
       camera, mic  ─────────relay──────────► resident video + audio
       agent video, audio, screen ◄──relay── camera, mic, screen (getDisplayMedia)

Each side negotiates once (HTTP POST offer -> answer; aiortc gathers its candidates first). The
tracks a side sends are ``SwitchableTrack``s: they exist from the first answer and start carrying
media when the other side's tracks arrive, so nobody has to renegotiate when the agent joins or
starts/stops sharing the screen. Video and audio are forwarded as they arrived (VP8 and Opus
frames, no decoding or encoding: ``video.relay``, ``video.passthrough``) unless a peer cannot do
VP8; the recorder decodes the audio for AAC and remuxes the VP8. A phone
conversation has no resident peer: the agent's peer is bridged to the call (``video.bridge``).

Either side leaving (hang-up, connection failed/closed, page unload, timeout) closes the whole
session: both peer connections, the recorders, the phone leg.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from video import passthrough
from video.bridge import AgentToCaller, CallerAudioTrack
from video.ice import rtc_configuration
from video.recording import Recorder
from video.relay import MediaSource, SwitchableTrack

log = logging.getLogger(__name__)


class SessionsFull(Exception):
    """The concurrent-session limit is reached."""


class ClientSessionsFull(SessionsFull):
    """This client address holds as many sessions as one address may."""


class SessionGone(Exception):
    """No live session for this conversation (never started, or already closed)."""


class BadOffer(ValueError):
    """The SDP offer could not be applied."""


@dataclass
class Side:
    """One peer connection (resident or agent) and what it receives."""

    pc: RTCPeerConnection
    user: str = ""  # agent user name; "" for the resident
    audio: MediaStreamTrack | None = None  # received tracks
    video: MediaStreamTrack | None = None
    screen: MediaStreamTrack | None = None
    sources: dict = field(default_factory=dict)  # received track -> MediaSource (not for a phone bridge's audio)
    recorder: Recorder | None = None
    connected_at: float | None = None


@dataclass
class VideoSession:
    conversation_id: str
    kind: str  # "video" (resident peer) or "phone" (the agent is bridged to a call)
    client: str = ""  # the resident's address (per-address limit); "" for phone bridges
    created_at: float = field(default_factory=time.monotonic)
    record: bool = False
    resident: Side | None = None
    agent: Side | None = None
    # What each side is sent (created with the first answer to that side).
    to_resident: dict[str, SwitchableTrack] = field(default_factory=dict)
    to_agent: dict[str, SwitchableTrack] = field(default_factory=dict)
    relay: MediaRelay = field(default_factory=MediaRelay)
    leg: object | None = None
    caller_track: CallerAudioTrack | None = None
    pump: AgentToCaller | None = None
    closed: bool = False
    tasks: set = field(default_factory=set)

    @property
    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.agent is not None and self.agent.connected_at:
            return "connected"
        return "waiting"

    def describe(self) -> dict:
        return {
            "conversation_id": self.conversation_id,
            "kind": self.kind,
            "state": self.state,
            "agent": self.agent.user if self.agent else "",
            "resident_connected": bool(self.resident and self.resident.connected_at),
            "agent_connected": bool(self.agent and self.agent.connected_at),
            "recording": self.record,
            "age_s": round(time.monotonic() - self.created_at, 1),
        }


async def _drain(track: MediaStreamTrack) -> None:
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        return


class VideoManager:
    """All live sessions of one hub. ``on_event(conversation_id, event)`` reports joins and ends."""

    def __init__(
        self,
        *,
        ice_servers: Callable[[], list[dict]],
        max_sessions: int,
        recordings_dir: Path | None,
        wait_timeout_s: float,
        connect_timeout_s: float,
        on_event: Callable[[str, dict], Awaitable[None]] | None = None,
        max_per_client: int = 0,
    ) -> None:
        self.ice_servers = ice_servers
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client  # sessions one resident address may hold (0: no limit)
        self.recordings_dir = recordings_dir
        self.wait_timeout_s = wait_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.on_event = on_event
        self.sessions: dict[str, VideoSession] = {}

    def get(self, conversation_id: str) -> VideoSession | None:
        return self.sessions.get(conversation_id)

    @property
    def peer_connections(self) -> int:
        """Open peer connections (tests check that hang-up frees them)."""
        return sum(
            1 for s in self.sessions.values() for side in (s.resident, s.agent)
            if side is not None and side.pc.connectionState != "closed"
        )

    def _new_session(self, conversation_id: str, kind: str, record: bool, client: str = "") -> VideoSession:
        if len(self.sessions) >= self.max_sessions:
            raise SessionsFull
        if client and self.max_per_client and \
                sum(1 for s in self.sessions.values() if s.client == client) >= self.max_per_client:
            raise ClientSessionsFull
        session = VideoSession(conversation_id=conversation_id, kind=kind, record=record, client=client)
        self.sessions[conversation_id] = session
        self._spawn(session, self._wait_timeout(session))
        return session

    def _spawn(self, session: VideoSession, coro) -> None:
        task = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    async def _emit(self, session: VideoSession, event: dict) -> None:
        if self.on_event is not None:
            try:
                await self.on_event(session.conversation_id, event)
            except Exception:
                log.exception("video event handler failed")

    # -- the resident side -----------------------------------------------------------------------
    async def resident_offer(self, conversation_id: str, sdp: str, sdp_type: str, *, record: bool,
                             client: str = "") -> RTCSessionDescription:
        old = self.sessions.get(conversation_id)
        if old is not None:  # the resident reloaded the page: the old peer is dead, start again
            await self.close(conversation_id, "resident_rejoined")
        session = self._new_session(conversation_id, "video", record, client)
        try:
            pc = RTCPeerConnection(rtc_configuration(self.ice_servers()))
            session.resident = side = Side(pc=pc)
            for kind in ("audio", "video", "screen"):
                session.to_resident[kind] = SwitchableTrack("audio" if kind == "audio" else "video")
            self._receive(session, side, "resident")
            answer = await self._answer(pc, sdp, sdp_type, list(session.to_resident.values()))
        except BaseException:
            await self.close(conversation_id, "bad_offer", quiet=True)
            raise
        if session.record and self.recordings_dir is not None:
            await self._start_recording(session, side, "resident")
        return answer

    # -- the agent side --------------------------------------------------------------------------
    async def agent_offer(self, conversation_id: str, user: str, sdp: str, sdp_type: str) -> RTCSessionDescription:
        session = self.sessions.get(conversation_id)
        if session is None or session.closed:
            raise SessionGone
        if session.agent is not None:  # the same or another (authorised) agent takes over
            await self._drop_agent(session, "agent_replaced")
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers()))
        session.agent = side = Side(pc=pc, user=user)
        session.to_agent = {"audio": SwitchableTrack("audio"), "video": SwitchableTrack("video")}
        self._receive(session, side, "agent")
        # The resident's camera and microphone go to the agent through the relay.
        if session.resident is not None:
            for track in (session.resident.audio, session.resident.video):
                if track is not None:
                    self._route(session, "resident", track)
        try:
            answer = await self._answer(pc, sdp, sdp_type, list(session.to_agent.values()))
        except BaseException:
            await self._drop_agent(session, "bad_offer")
            raise
        if session.record and self.recordings_dir is not None:
            await self._start_recording(session, side, "agent")
        return answer

    async def phone_offer(
        self, conversation_id: str, user: str, leg, sdp: str, sdp_type: str
    ) -> RTCSessionDescription:
        """The agent joins a phone call: audio only, bridged to ``leg`` (an AgentAudioLeg)."""
        if conversation_id in self.sessions:
            await self.close(conversation_id, "agent_replaced")
        try:
            session = self._new_session(conversation_id, "phone", record=False)
        except SessionsFull:
            leg.close()
            raise
        session.leg = leg
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers()))
        session.agent = side = Side(pc=pc, user=user)
        session.caller_track = CallerAudioTrack(leg)
        self._spawn(session, self._watch_call(session))
        self._receive(session, side, "agent")
        try:
            return await self._answer(pc, sdp, sdp_type, [session.caller_track])
        except BaseException:
            await self.close(conversation_id, "bad_offer", quiet=True)
            raise

    async def _watch_call(self, session: VideoSession) -> None:
        await session.caller_track.ended.wait()
        await self.close(session.conversation_id, "caller_hung_up")

    # -- shared ----------------------------------------------------------------------------------
    async def _answer(self, pc: RTCPeerConnection, sdp: str, sdp_type: str, tracks) -> RTCSessionDescription:
        if sdp_type != "offer":
            raise BadOffer(f"expected an offer, got {sdp_type!r}")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
        except Exception as exc:  # aiortc raises ValueError and friends on malformed SDP
            raise BadOffer(str(exc) or type(exc).__name__) from None
        if passthrough.available():
            passthrough.answer_vp8_only(pc)  # VP8 both ways when the peer can: frames are forwarded as they are
        # Video transceivers are taken in m-line order: the first carries the camera, the second the screen.
        for track in tracks:
            try:
                sender = pc.addTrack(track)
            except Exception:  # the offer has no m-line for it (e.g. an audio-only agent)
                log.debug("offer has no room for a %s track", track.kind)
                continue
            if isinstance(track, SwitchableTrack):
                transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
                track.attach(sender, transceiver)
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise BadOffer(str(exc) or type(exc).__name__) from None
        return pc.localDescription

    def _receive(self, session: VideoSession, side: Side, who: str) -> None:
        pc = side.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                side.audio = track
            else:
                videos = [t for t in pc.getTransceivers() if t.kind == "video"]
                index = next((i for i, t in enumerate(videos) if t.receiver.track is track), 0)
                if index == 0:
                    side.video = track
                else:
                    side.screen = track
            # Before aiortc starts the receiver's decoder: the encoded frames become available for
            # forwarding, and nothing is decoded unless a consumer asks for decoded frames. (A phone
            # bridge's audio goes to the caller as PCM: decoded, as aiortc does it.)
            if session.kind != "phone" or track.kind == "video":
                transceiver = next((t for t in pc.getTransceivers() if t.receiver.track is track), None)
                tap = None
                if passthrough.available() and transceiver is not None:
                    try:
                        tap = passthrough.install_tap(transceiver.receiver)
                    except RuntimeError:
                        log.exception("video %s: cannot tap the %s's %s", session.conversation_id, who, track.kind)
                side.sources[track] = MediaSource(track, session.relay, tap, transceiver)
            # A received track must always be read, or its decoded frames pile up in memory (the
            # resident waiting for an agent): one unbuffered relay consumer keeps it drained.
            self._spawn(session, _drain(session.relay.subscribe(track, buffered=False)))
            self._route(session, who, track)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            log.info("video %s: %s peer %s", session.conversation_id, who, state)
            if state == "connected":
                if side.connected_at is None:
                    side.connected_at = time.monotonic()
                    await self._emit(session, {"type": "video", "event": f"{who}_connected", "user": side.user})
            elif state in ("failed", "closed"):
                if who == "agent" and session.agent is not side:
                    return  # a replaced agent peer
                await self.close(session.conversation_id, f"{who}_{state}")

        self._spawn(session, self._connect_timeout(session, side, who))

    def _route(self, session: VideoSession, who: str, track: MediaStreamTrack) -> None:
        """A received track feeds the other side (and the phone leg)."""
        if who == "resident":
            sink = session.to_agent
            if session.agent is not None:
                kind = "audio" if track.kind == "audio" else "video"
                if track is session.resident.screen:
                    return
                sink[kind].set_source(self._source(session, session.resident, track))
            return
        # agent -> resident, or agent -> caller
        if session.kind == "phone":
            if track.kind == "audio" and session.leg is not None:
                # through the relay like every other consumer: the drain above reads this track too,
                # and two readers of one received track would each get every other frame
                session.pump = AgentToCaller(session.relay.subscribe(track), session.leg)
            return
        if track.kind == "audio":
            target = session.to_resident["audio"]
        elif track is session.agent.screen:
            target = session.to_resident["screen"]
        else:
            target = session.to_resident["video"]
        target.set_source(self._source(session, session.agent, track))

    @staticmethod
    def _source(session: VideoSession, side: Side, track: MediaStreamTrack):
        """What a SwitchableTrack (or a recorder) takes: the MediaSource of a received track."""
        if track in side.sources:
            return side.sources[track]
        return session.relay.subscribe(track)

    async def _start_recording(self, session: VideoSession, side: Side, who: str) -> None:
        if side.audio is None and side.video is None:
            return
        folder = self.recordings_dir / session.conversation_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{who}.mkv"
        recorder = Recorder(
            path,
            audio=self._source(session, side, side.audio) if side.audio is not None else None,
            video=self._source(session, side, side.video) if side.video is not None else None,
        )
        recorder.start()
        side.recorder = recorder
        log.info("video %s: recording the %s side to %s", session.conversation_id, who, path)

    async def _connect_timeout(self, session: VideoSession, side: Side, who: str) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if side.connected_at is None and not session.closed:
            if who == "agent" and session.agent is not side:
                return
            log.info("video %s: %s peer did not connect within %.0f s", session.conversation_id, who,
                     self.connect_timeout_s)
            await self.close(session.conversation_id, f"{who}_connect_timeout")

    async def _wait_timeout(self, session: VideoSession) -> None:
        await asyncio.sleep(self.wait_timeout_s)
        if not session.closed and session.agent is None:
            await self.close(session.conversation_id, "no_agent_in_time")

    async def _stop_side(self, side: Side) -> None:
        if side.recorder is not None:
            recorder, side.recorder = side.recorder, None
            try:
                await recorder.stop()
            except Exception:
                log.exception("stopping a recorder failed")
        await side.pc.close()

    async def drop_agent(self, conversation_id: str, user: str, reason: str) -> bool:
        """Take ``user`` out of the session (logged out, lost the item); the resident waits for the next agent.

        A phone bridge has nobody else in it: it ends."""
        session = self.sessions.get(conversation_id)
        if session is None or session.agent is None or session.agent.user != user:
            return False
        if session.kind == "phone":
            await self.close(conversation_id, reason)
            return True
        await self._drop_agent(session, reason)
        await self._emit(session, {"type": "video", "event": "agent_left", "reason": reason})
        return True

    async def _drop_agent(self, session: VideoSession, reason: str) -> None:
        side, session.agent = session.agent, None
        for track in session.to_agent.values():
            track.stop()
        for kind in ("audio", "video", "screen"):
            if kind in session.to_resident:
                session.to_resident[kind].set_source(None)
        if side is not None:
            await self._stop_side(side)
        log.info("video %s: agent %s left (%s)", session.conversation_id, side.user if side else "", reason)

    async def close(self, conversation_id: str, reason: str, *, quiet: bool = False) -> VideoSession | None:
        """End a session and free everything it holds; idempotent. ``quiet``: no "ended" event (it never began)."""
        session = self.sessions.pop(conversation_id, None)
        if session is None or session.closed:
            return None
        session.closed = True
        for track in list(session.to_resident.values()) + list(session.to_agent.values()):
            track.stop()
        if session.caller_track is not None:
            session.caller_track.stop()
        if session.pump is not None:
            session.pump.stop()
        for side in (session.resident, session.agent):
            if side is not None:
                await self._stop_side(side)
        if session.leg is not None:
            try:
                session.leg.close()
            except Exception:
                log.exception("closing the phone leg failed")
        current = asyncio.current_task()
        for task in list(session.tasks):
            if task is not current:
                task.cancel()
        log.info("video %s closed (%s)", conversation_id, reason)
        if not quiet:
            await self._emit(session, {"type": "video", "event": "ended", "reason": reason})
        return session

    async def close_all(self, reason: str = "shutdown") -> None:
        for conversation_id in list(self.sessions):
            await self.close(conversation_id, reason)
