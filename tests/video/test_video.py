"""Video help through the hub: signalling, authorisation, session limits, and real media relayed both ways.

Media tests run in a private network namespace (tests/support/netns.py explains why and how) with aiortc
peers in Python playing resident and agent; tests/video/test_video_browser.py does the same with Chromium.
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import sqlite3
import time

import av
import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from tests.support import client_from, free_port, make_staff, open_session, staff_login
from tests.support.netns import run_in_netns
from tests.support.video_clients import Peer, an_offer, relay_counts

from video.ice import rtc_configuration

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def claim(settings, conversation_id: str, agent: str) -> None:
    """What the agent desk does when an agent accepts the item (status/agent columns of the contract)."""
    with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
        rows = db.execute(
            "UPDATE escalations SET status='claimed', agent=? WHERE conversation_id=?", (agent, conversation_id)
        ).rowcount
    assert rows >= 1, "no escalation to claim"


async def until_queued(settings, conversation_id: str, timeout: float = 20.0) -> None:
    """A video item is queued once the resident's media connects (issue 19): wait for it, without
    blocking the peers' event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
            if db.execute("SELECT count(*) FROM escalations WHERE conversation_id=?", (conversation_id,)).fetchone()[0]:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the video session was never queued: did the resident's media connect?")


@pytest.fixture
def video_settings(hub_settings):
    return hub_settings.model_copy(update={"video_max_sessions": 2, "video_connect_timeout_s": 20})


@pytest.fixture
def video_hub(video_settings, knowledge_base):
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    with TestClient(create_app(video_settings, knowledge_base=knowledge_base)) as client:
        yield client


# -- signalling and authorisation (no media needs to flow) ---------------------------------------------
def test_kiosk_session_and_resident_offer(video_hub):
    public = video_hub.get("/api/video/config").json()  # shown before a conversation exists
    assert public["recording"] is True and "录音录像" in public["consent_notice"] and "ice_servers" not in public
    assert public["capture"] == {"width": 640, "height": 480, "frameRate": 15}
    created = video_hub.post("/api/video/sessions", json={})
    assert created.status_code == 201
    body = created.json()
    assert body["ice_servers"] == [] and body["recording"] is True and "录音录像" in body["consent_notice"]
    auth = {"Authorization": f"Bearer {body['token']}"}
    r = video_hub.post(f"/api/video/sessions/{body['session_id']}/resident/offer",
                       json={"sdp": an_offer(), "type": "offer", "recording_consent": True}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "answer" and "m=video" in r.json()["sdp"] and r.json()["recording"] is True
    info = video_hub.get(f"/api/video/sessions/{body['session_id']}", headers=auth).json()
    # not queued yet: an offer whose media never connects adds no queue item (issue 19)
    assert info["you"] == "resident" and info["channel"] == "video" and info["status"] == "open"
    assert info["session"]["state"] == "waiting" and "messages" not in info
    app = video_hub.app
    assert app.state.video.peer_connections == 1
    r = video_hub.post(f"/api/video/sessions/{body['session_id']}/hangup", headers=auth)
    assert r.json() == {"closed": True} and app.state.video.peer_connections == 0 and not app.state.video.sessions
    transcript = video_hub.get(f"/api/sessions/{body['session_id']}/messages", headers=auth).json()["messages"]
    assert transcript[-1]["role"] == "system" and "挂断" in transcript[-1]["text"]


def test_chat_conversation_moves_to_video_and_is_queued_once_its_media_connects(video_hub):
    session_id, auth = open_session(video_hub)
    r = video_hub.post(f"/api/video/sessions/{session_id}/resident/offer",
                       json={"sdp": an_offer(), "type": "offer"}, headers=auth)
    assert r.status_code == 200 and r.json()["recording"] is False  # no consent: no recording
    info = video_hub.get(f"/api/video/sessions/{session_id}", headers=auth).json()
    assert info["channel"] == "video" and info["status"] == "open"
    db_path = video_hub.app.state.settings.var_dir / "xiaozhi.db"
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM escalations WHERE conversation_id=?", (session_id,)).fetchone() == (0,)
    # what the resident's peer reports when it connects (its offer here has no live peer behind it)
    video_hub.portal.call(video_hub.app.state.video.on_event, session_id,
                          {"type": "video", "event": "resident_connected", "user": ""})
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT channel, status FROM escalations WHERE conversation_id=?", (session_id,)).fetchall() == [
            ("video", "waiting")
        ]
    assert video_hub.get(f"/api/video/sessions/{session_id}", headers=auth).json()["status"] == "escalated"


def test_bad_input_is_refused_clearly(video_hub):
    created = video_hub.post("/api/video/sessions", json={}).json()
    sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    r = video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": "v=0 not really sdp", "type": "offer"},
                       headers=auth)
    assert r.status_code == 400 and r.json()["error"] == "bad_sdp" and "刷新" in r.json()["message"]
    r = video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "answer"},
                       headers=auth)
    assert r.status_code == 400
    r = video_hub.post(f"/api/video/sessions/{sid}/resident/offer", content=b"{broken", headers={
        **auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["message"]
    assert not video_hub.app.state.video.sessions  # nothing half-open left behind
    transcript = video_hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]
    assert not [m for m in transcript if m["role"] == "system"]  # no "call ended" for a call that never began
    assert video_hub.get("/healthz").status_code == 200


def escalated_session(video_hub) -> tuple[str, dict]:
    """A resident's session that has made its offer and asked for an agent (no media flows here): its id
    and the resident's authorization header."""
    created = video_hub.post("/api/video/sessions", json={}).json()
    sid, resident = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    assert video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                          headers=resident).status_code == 200
    assert video_hub.post(f"/api/sessions/{sid}/escalate", headers=resident).status_code == 200
    return sid, resident


def test_who_may_join_the_agent_side(video_hub):
    app = video_hub.app
    sid, resident = escalated_session(video_hub)
    agent1 = make_staff(video_hub, "agent1", "agent")
    agent2 = make_staff(video_hub, "agent2", "agent")
    supervisor = make_staff(video_hub, "super1", "supervisor")
    offer = {"sdp": an_offer("agent"), "type": "offer"}
    path = f"/api/video/sessions/{sid}/agent/offer"

    # A resident token opens nothing on the agent side, not even its own conversation's.
    assert video_hub.post(path, json=offer, headers=resident).status_code == 401
    assert video_hub.post(path, json=offer).status_code == 401
    # Another resident cannot read this conversation's video state.
    _, other = open_session(video_hub)
    assert video_hub.get(f"/api/video/sessions/{sid}", headers=other).status_code == 403
    # An agent who does not hold the item cannot join, read or hang up.
    r = video_hub.post(path, json=offer, headers=agent1)
    assert r.status_code == 403 and "接起" in r.json()["message"]
    assert video_hub.get(f"/api/video/sessions/{sid}", headers=agent1).status_code == 403
    assert video_hub.post(f"/api/video/sessions/{sid}/hangup", headers=agent1).status_code == 403
    claim(app.state.settings, sid, "agent2")
    assert video_hub.post(path, json=offer, headers=agent1).status_code == 403
    # The holder may.
    info = video_hub.get(f"/api/video/sessions/{sid}", headers=agent2)
    assert info.status_code == 200 and info.json()["you"] == "agent" and "messages" in info.json()
    r = video_hub.post(path, json=offer, headers=agent2)
    assert r.status_code == 200 and r.json()["kind"] == "video"
    assert app.state.video.get(sid).agent.user == "agent2"
    # A supervisor may join any conversation (taking the agent seat over).
    assert video_hub.post(path, json={"sdp": an_offer("agent"), "type": "offer"}, headers=supervisor).status_code == 200
    assert app.state.video.get(sid).agent.user == "super1"
    assert app.state.video.peer_connections == 2  # the replaced agent peer was closed
    # Nothing after logout.
    assert video_hub.post("/api/staff/logout", headers=agent2).status_code == 204
    for method, url in (("post", path), ("get", f"/api/video/sessions/{sid}"), ("post", f"/api/video/sessions/{sid}/chat")):
        kwargs = {"json": offer if url == path else {"text": "你好"}} if method == "post" else {}
        assert getattr(video_hub, method)(url, headers=agent2, **kwargs).status_code == 401
    audit = video_hub.get("/api/staff/audit", params={"actor": "agent2"}, headers=staff_login(video_hub)).json()
    assert any(e["action"] == "video.join" and e["target"] == sid for e in audit)


def test_phone_conversation_without_a_live_call(video_hub):
    """A phone item whose call has ended: the agent is told so, nothing is left open."""
    app = video_hub.app

    async def phone_conversation():
        conv, _ = await app.state.store.create_conversation("phone", contact="138****5678")
        await app.state.store.add_escalation(conv.id, "phone", "requested")
        return conv.id

    sid = video_hub.portal.call(phone_conversation)
    supervisor = make_staff(video_hub, "super2", "supervisor")
    r = video_hub.post(f"/api/video/sessions/{sid}/agent/offer", json={"sdp": an_offer("agent"), "type": "offer"},
                       headers=supervisor)
    assert r.status_code in (409, 503) and r.json()["message"]
    assert not app.state.video.sessions


def test_concurrent_session_limit_and_freeing(video_hub):
    sessions = []
    for _ in range(3):
        created = video_hub.post("/api/video/sessions", json={}).json()
        sessions.append((created["session_id"], {"Authorization": f"Bearer {created['token']}"}))
    codes = []
    for sid, auth in sessions:
        r = video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                           headers=auth)
        codes.append(r.status_code)
    assert codes == [200, 200, 503]
    assert r.json()["message"].startswith("视频客服线路已满")
    assert "xiaozhi_active_video_sessions 2.0" in video_hub.get("/metrics").text  # what operations see
    video_hub.post(f"/api/video/sessions/{sessions[0][0]}/hangup", headers=sessions[0][1])
    assert "xiaozhi_active_video_sessions 1.0" in video_hub.get("/metrics").text
    sid, auth = sessions[2]
    assert video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                          headers=auth).status_code == 200


async def resident_joins(http: httpx.AsyncClient, colour=(200, 30, 30), **offer_options):
    """A kiosk session and its resident peer's offer: (session id, token, peer, the answer response)."""
    created = (await http.post("/api/video/sessions", json={})).json()
    sid, token = created["session_id"], created["token"]
    resident = Peer("resident", colour=colour)
    r = await resident.offer(http, f"/api/video/sessions/{sid}/resident/offer", token, **offer_options)
    return sid, token, resident, r


def served_scenario(app, netns, scenario, timeout: float = 120):
    """Serve the hub inside the private network namespace and run ``scenario(base_url)`` against it."""
    from tests.support.browser import serve

    def inside():
        with serve(app, free_port()) as url:
            return asyncio.run(scenario(url))

    return run_in_netns(netns, inside, timeout=timeout)


# -- media relayed for real (aiortc peers in a private network namespace) ------------------------------
@pytest.mark.slow
def test_media_flows_both_ways_is_recorded_and_freed(video_settings, knowledge_base, netns):
    from xiaozhi.hub.app import create_app

    app = create_app(video_settings, knowledge_base=knowledge_base)

    async def scenario(url: str) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            sid, token, resident, r = await resident_joins(http, recording_consent=True)
            assert r.status_code == 200, r.text

            admin = (await http.post("/api/staff/login", json={"username": "admin", "password": "test-admin-password"})).json()
            await http.post("/api/staff/users", json={"username": "agent7", "password": "agent7-password-123",
                                                     "role": "agent"}, headers={"Authorization": f"Bearer {admin['token']}"})
            agent_token = (await http.post("/api/staff/login", json={"username": "agent7",
                                                                      "password": "agent7-password-123"})).json()["token"]
            await until_queued(video_settings, sid)
            claim(video_settings, sid, "agent7")
            agent = Peer("agent", colour=(30, 200, 30), screen_colour=(30, 30, 220), tone_hz=660)
            started = time.monotonic()
            r = await agent.offer(http, f"/api/video/sessions/{sid}/agent/offer", agent_token)
            assert r.status_code == 200, r.text
            await agent.wait_frames("video", 20)
            await agent.wait_frames("audio", 50)
            await resident.wait_frames("video", 20)
            await resident.wait_frames("audio", 50)
            await resident.wait_frames("screen", 10)
            connect_s = time.monotonic() - started
            out = {
                "agent_sees": agent.received["video"].mean_rgb(),
                "resident_sees": resident.received["video"].mean_rgb(),
                "resident_screen": resident.received["screen"].mean_rgb(),
                "connect_s": connect_s,
                "state": app.state.video.get(sid).describe(),
                "relay": relay_counts(app.state.video.get(sid)),
                "plis_to_resident_camera": resident.plis["video"],
            }
            # Chat beside the video lands in the transcript.
            assert (await http.post(f"/api/video/sessions/{sid}/chat", json={"text": "请把医保卡对准摄像头"},
                                    headers={"Authorization": f"Bearer {agent_token}"})).status_code == 201
            assert (await http.post(f"/api/video/sessions/{sid}/chat", json={"text": "好的"},
                                    headers={"Authorization": f"Bearer {token}"})).status_code == 201
            await asyncio.sleep(1.0)  # a little more media into the recordings
            r = await http.post(f"/api/video/sessions/{sid}/hangup", headers={"Authorization": f"Bearer {agent_token}"})
            assert r.json() == {"closed": True}
            out["pcs_after"] = app.state.video.peer_connections
            out["sessions_after"] = len(app.state.video.sessions)
            for _ in range(100):  # the server closed its peers: both clients see the connection go
                if agent.pc.connectionState in ("closed", "failed") and resident.pc.connectionState in ("closed", "failed"):
                    break
                await asyncio.sleep(0.1)
            out["client_states"] = (agent.pc.connectionState, resident.pc.connectionState)
            transcript = (await http.get(f"/api/sessions/{sid}/messages", headers={"Authorization": f"Bearer {token}"})).json()
            out["roles"] = [(m["role"], m["text"]) for m in transcript["messages"]]
            await resident.close()
            await agent.close()
            out["sid"] = sid
            return out

    out = served_scenario(app, netns, scenario)
    assert out["state"]["state"] == "connected" and out["state"]["recording"] is True
    # VP8 both ways: every video frame was forwarded as it arrived, none decoded or encoded by the hub.
    relay = out["relay"]
    for name in ("to_agent.video", "to_resident.video", "to_resident.screen"):
        assert relay["sent"][name]["forwarded"] >= 10 and relay["sent"][name]["transcoded"] == 0, relay
    for name in ("resident.video", "agent.video", "agent.screen"):
        received = relay["received"][name]
        assert received["codec"] == "video/vp8" and received["frames"] >= 10 and received["decoded"] == 0, relay
    # Opus both ways: audio forwarded too; decoded only for the recordings' AAC.
    for name in ("to_agent.audio", "to_resident.audio"):
        assert relay["sent"][name]["forwarded"] >= 50 and relay["sent"][name]["transcoded"] == 0, relay
    for name in ("resident.audio", "agent.audio"):
        assert relay["received"][name]["codec"] == "audio/opus" and relay["received"][name]["decoded"] >= 50, relay
    # The agent joined after the resident's camera had started: the hub asked it for a keyframe.
    assert relay["received"]["resident.video"]["plis"] >= 1 and out["plis_to_resident_camera"] >= 1
    # Colours survive the relay (VP8 is lossy, so only roughly).
    assert out["agent_sees"][0] > 150 and out["agent_sees"][1] < 80       # resident's red
    assert out["resident_sees"][1] > 150 and out["resident_sees"][0] < 80  # agent camera's green
    assert out["resident_screen"][2] > 150 and out["resident_screen"][0] < 80  # agent's screen: blue
    assert out["pcs_after"] == 0 and out["sessions_after"] == 0
    assert out["client_states"] != ("connected", "connected")
    assert ("agent", "请把医保卡对准摄像头") in out["roles"] and ("resident", "好的") in out["roles"]
    assert ("system", "工作人员已接入视频通话。") in out["roles"]
    folder = video_settings.var_dir / "recordings" / out["sid"]
    files = sorted(folder.glob("*.mkv"))
    assert sorted(f.name.rsplit("-", 1)[1] for f in files) == ["agent.mkv", "resident.mkv"]
    for path in files:
        assert path.stat().st_size > 10_000
        with av.open(str(path)) as container:
            kinds = {s.type for s in container.streams}
            assert kinds == {"audio", "video"}
            assert container.streams.video[0].codec_context.name == "vp8"  # remuxed as received, not re-encoded
            frames = list(container.decode(video=0))
            assert len(frames) >= 10, (path, len(frames))
            assert (frames[0].width, frames[0].height) == (320, 240)
            colour = frames[-1].to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
            assert colour[0] > 150 if path.name.endswith("resident.mkv") else colour[1] > 150, (path, colour)


def test_an_agent_who_logs_out_leaves_the_call(video_hub, monkeypatch):
    from starlette.websockets import WebSocketDisconnect

    from xiaozhi.hub.routers import video as video_router

    monkeypatch.setattr(video_router, "AGENT_RECHECK_S", 0.2)
    app = video_hub.app
    sid, resident = escalated_session(video_hub)
    agent = make_staff(video_hub, "agent3", "agent")
    claim(app.state.settings, sid, "agent3")
    assert video_hub.post(f"/api/video/sessions/{sid}/agent/offer", json={"sdp": an_offer("agent"), "type": "offer"},
                          headers=agent).status_code == 200
    token = agent["Authorization"].split()[1]
    events = []
    with video_hub.websocket_connect(f"/api/video/sessions/{sid}/ws?token={token}") as ws:
        events.append(ws.receive_json())
        assert video_hub.post("/api/staff/logout", headers=agent).status_code == 204
        with pytest.raises(WebSocketDisconnect) as closed:
            for _ in range(20):
                events.append(ws.receive_json())
    assert closed.value.code == 4401
    assert events[0]["event"] == "state" and events[0]["session"]["agent"] == "agent3"
    assert any(e.get("event") == "agent_left" for e in events)
    session = app.state.video.get(sid)
    assert session is not None and session.agent is None and app.state.video.peer_connections == 1  # resident waits
    transcript = video_hub.get(f"/api/sessions/{sid}/messages", headers=resident).json()["messages"]
    assert "工作人员已离开" in transcript[-1]["text"]
    # A resident's socket has no such watcher and a bad token gets no socket at all.
    with pytest.raises(WebSocketDisconnect):
        with video_hub.websocket_connect(f"/api/video/sessions/{sid}/ws?token={token}") as ws:
            ws.receive_json()


# -- forwarding video without transcoding (video/passthrough.py, video/relay.py) -----------------------
def test_aiortc_internals_the_video_forwarding_relies_on():
    """Fails loudly when an aiortc upgrade moves what video/passthrough.py reaches into."""
    import aiortc

    from video import passthrough

    assert passthrough.check_aiortc() == [], (
        f"aiortc {aiortc.__version__} changed internals video/passthrough.py uses (written for "
        f"{passthrough.AIORTC_VERSION}): {passthrough.check_aiortc()}")

    async def live() -> tuple:
        pc = RTCPeerConnection(rtc_configuration([]))
        transceiver = pc.addTransceiver("video")
        receiver = transceiver.receiver
        plain = getattr(receiver, passthrough.DECODER_QUEUE)
        tap = passthrough.install_tap(receiver)
        installed = getattr(receiver, passthrough.DECODER_QUEUE)
        await pc.close()
        return type(plain).__name__, installed is tap, type(receiver.getSynchronizationSources()).__name__

    assert asyncio.run(live()) == ("Queue", True, "list")


class FakeReceiver:
    """Stands in for RTCRtpReceiver: one media SSRC, records the PLIs it is asked to send."""

    def __init__(self) -> None:
        self.plis: list[tuple[float, int]] = []

    def getSynchronizationSources(self):
        from types import SimpleNamespace

        return [SimpleNamespace(source=1111)]

    async def _send_rtcp_pli(self, ssrc: int) -> None:
        self.plis.append((time.monotonic(), ssrc))


def vp8_frames(count: int = 30, rgb=(30, 200, 30)) -> list[bytes]:
    from tests.support.video_clients import vp8_clip

    return list(vp8_clip(rgb, seconds=count / 15))[:count]


def test_encoded_tap_forwards_from_a_keyframe_and_decodes_only_on_demand():
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.mediastreams import MediaStreamError
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from video import passthrough

    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    clip = vp8_frames()
    key, deltas = clip[0], clip[1:]
    assert passthrough.is_vp8_keyframe(key) and not any(passthrough.is_vp8_keyframe(d) for d in deltas)
    assert passthrough.vp8_size(key) == (320, 240) and passthrough.vp8_size(deltas[0]) is None

    async def scenario() -> dict:
        receiver = FakeReceiver()
        tap = passthrough.EncodedTap(receiver, asyncio.get_running_loop())
        put = lambda data, ts: tap.put((vp8, JitterFrame(data, ts)))  # what aiortc's receiver does
        put(key, 0)
        put(deltas[0], 6000)
        reader = tap.open_reader()  # a destination joins mid-stream: no delta before the next keyframe
        put(deltas[1], 12000)
        put(deltas[2], 18000)
        await asyncio.sleep(0)
        first_pli = len(receiver.plis)
        await asyncio.sleep(0.4)  # the requests inside the 300 ms window were folded into one more
        plis_after_window = len(receiver.plis)
        put(key, 24000)
        put(deltas[3], 30000)
        got = [await reader.recv(), await reader.recv()]
        queued_for_decoder = tap.qsize()  # nobody wants decoded frames: aiortc's decoder gets nothing
        release = tap.hold_decoding()  # the fallback path starts: decoding from the next keyframe on
        put(deltas[4], 36000)
        put(key, 42000)
        put(deltas[5], 48000)
        decoder_items = [tap.get_nowait() for _ in range(tap.qsize())]
        release()
        put(deltas[6], 54000)
        after_release = tap.qsize()
        tap.put(None)  # aiortc stops the receiver: the decoder thread and our readers end
        await reader.recv()  # deltas[4], key, deltas[5], deltas[6] were forwarded meanwhile
        for _ in range(3):
            await reader.recv()
        try:
            await reader.recv()
            ended = False
        except MediaStreamError:
            ended = True
        return {"first_pli": first_pli, "plis": plis_after_window, "got": got, "queued": queued_for_decoder,
                "decoder": decoder_items, "after_release": after_release, "stop": tap.get_nowait(), "ended": ended,
                "dropped": reader.dropped, "pli_times": [t for t, _ in receiver.plis]}

    out = asyncio.run(scenario())
    assert out["first_pli"] == 1 and out["plis"] == 2  # rate-limited: one at once, one after 300 ms
    assert out["pli_times"][1] - out["pli_times"][0] >= 0.29
    assert [f.keyframe for f in out["got"]] == [True, False] and out["got"][0].timestamp == 24000
    assert out["dropped"] == 2 and out["queued"] == 0
    assert [item[1].timestamp for item in out["decoder"]] == [42000, 48000]  # from the keyframe on
    assert out["after_release"] == 0 and out["stop"] is None and out["ended"]


def test_switchable_track_forwards_packets_on_its_own_clock():
    from types import SimpleNamespace

    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from video import passthrough
    from video.relay import MediaSource, SwitchableTrack

    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    vp8_mline = SimpleNamespace(_codecs=[vp8])
    clip = vp8_frames(10)

    async def scenario() -> dict:
        loop = asyncio.get_running_loop()
        sources = []
        for _ in range(2):
            receiver = FakeReceiver()
            sources.append((passthrough.EncodedTap(receiver, loop), receiver))
        camera = MediaSource(None, None, sources[0][0], vp8_mline)
        screen = MediaSource(None, None, sources[1][0], vp8_mline)
        track = SwitchableTrack("video")
        track.transceiver = vp8_mline  # what attach() learns from the sender's m-line
        track.set_source(camera)
        pending = asyncio.ensure_future(track.recv())
        await asyncio.sleep(0.05)
        cam_tap, screen_tap = sources[0][0], sources[1][0]
        cam_tap.put((vp8, JitterFrame(clip[1], 900000)))  # a delta: not sent
        cam_tap.put((vp8, JitterFrame(clip[0], 906000)))
        pts = [(await pending).pts]
        for i, data in enumerate(clip[1:4]):
            cam_tap.put((vp8, JitterFrame(data, 912000 + 6000 * i)))
            pts.append((await track.recv()).pts)
        # Screen share switched in: its clock starts at 0, ours must not go back; it starts at a keyframe.
        track.set_source(screen)
        pending = asyncio.ensure_future(track.recv())
        await asyncio.sleep(0.05)
        screen_tap.put((vp8, JitterFrame(clip[2], 0)))
        screen_tap.put((vp8, JitterFrame(clip[0], 6000)))
        packet = await pending
        pts.append(packet.pts)
        screen_tap.put((vp8, JitterFrame(clip[1], 12000)))
        pts.append((await track.recv()).pts)
        await asyncio.sleep(0.35)
        before = len(sources[1][1].plis)
        track._keyframe_requested()  # the receiving browser sent a PLI: the source is asked
        await asyncio.sleep(0.35)
        out = {"pts": pts, "frames": track.frames, "forwarded": track.forwarded, "transcoded": track.transcoded,
               "first": bytes(packet) == clip[0], "time_base": packet.time_base, "requests": track.keyframe_requests,
               "plis": (before, len(sources[1][1].plis)), "cam_readers": len(cam_tap.readers)}
        track.stop()
        return out

    out = asyncio.run(scenario())
    pts = out["pts"]
    assert all(b > a for a, b in itertools.pairwise(pts)), pts
    assert pts[1] - pts[0] == 6000 and pts[-1] - pts[-2] == 6000  # the source's own frame timing is kept
    assert pts[4] >= pts[3] + 1 and pts[4] - pts[3] < 90000  # the switch continues on our clock
    assert out["first"] and out["time_base"] == fractions.Fraction(1, 90000)
    assert out["frames"] == out["forwarded"] == 6 and out["transcoded"] == 0
    assert out["plis"][0] >= 1 and out["plis"][1] == out["plis"][0] + 1 and out["requests"] == 1
    assert out["cam_readers"] == 0  # the old source's reader is gone


async def _staff_token(http: httpx.AsyncClient, username: str, role: str) -> str:
    admin = (await http.post("/api/staff/login", json={"username": "admin", "password": "test-admin-password"})).json()
    await http.post("/api/staff/users", json={"username": username, "password": f"{username}-password-123", "role": role},
                    headers={"Authorization": f"Bearer {admin['token']}"})
    return (await http.post("/api/staff/login", json={"username": username,
                                                      "password": f"{username}-password-123"})).json()["token"]


async def _wait_colour(peer: Peer, name: str, check, timeout: float = 10.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while True:
        received = peer.received.get(name)
        if received is not None and received.last is not None:
            colour = received.mean_rgb()
            if check(colour):
                return colour
        if time.monotonic() > deadline:
            raise AssertionError(f"{peer.role} {name}: colour {colour if received else None} after {timeout} s")
        await asyncio.sleep(0.1)


def _on_hub_loop(session, fn, *args) -> None:
    """Run ``fn(*args)`` in the hub's event loop (the uvicorn thread), e.g. a source switch."""
    tap = next(s.tap for side in (session.resident, session.agent) if side for s in side.sources.values())
    tap.loop.call_soon_threadsafe(fn, *args)


@pytest.mark.slow
def test_agent_replaced_and_screen_switched_start_at_keyframes(video_settings, knowledge_base, netns):
    """A new agent and a source switch each start with a keyframe the hub asked the source for (PLI)."""
    from xiaozhi.hub.app import create_app

    app = create_app(video_settings, knowledge_base=knowledge_base)
    red, green, blue = (200, 30, 30), (30, 200, 30), (30, 30, 220)
    yellow, magenta = (210, 210, 30), (200, 30, 200)

    async def scenario(url: str) -> dict:
        out: dict = {}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            sid, token, resident, r = await resident_joins(http, colour=red)
            assert r.status_code == 200, r.text
            await until_queued(video_settings, sid)
            claim(video_settings, sid, "agent8")
            agent = Peer("agent", colour=green, screen_colour=blue)
            r = await agent.offer(http, f"/api/video/sessions/{sid}/agent/offer", await _staff_token(http, "agent8", "agent"))
            assert r.status_code == 200, r.text
            await _wait_colour(resident, "video", lambda c: c[1] > 150)
            await agent.wait_frames("video", 10)
            out["resident_plis_first_agent"] = resident.plis["video"]

            # A supervisor takes the seat over: the resident's camera starts again at a keyframe for them,
            # and the resident sees and hears the new agent.
            supervisor = Peer("agent", colour=yellow, screen_colour=magenta, tone_hz=550)
            r = await supervisor.offer(http, f"/api/video/sessions/{sid}/agent/offer",
                                       await _staff_token(http, "super8", "supervisor"))
            assert r.status_code == 200, r.text
            audio_before = resident.frames("audio")
            await _wait_colour(resident, "video", lambda c: c[0] > 150 and c[1] > 150 and c[2] < 100)
            await supervisor.wait_frames("video", 10)
            await resident.wait_frames("audio", audio_before + 50)
            out["resident_plis_second_agent"] = resident.plis["video"]
            out["supervisor_sees"] = supervisor.received["video"].mean_rgb()

            # The hub switches what the resident's camera m-line shows to the supervisor's screen and back.
            session = app.state.video.get(sid)
            side = session.agent
            before = dict(supervisor.plis)
            _on_hub_loop(session, session.to_resident["video"].set_source, side.sources[side.screen])
            out["switched"] = await _wait_colour(resident, "video", lambda c: c[0] > 150 and c[2] > 150 and c[1] < 100)
            out["screen_plis"] = supervisor.plis["screen"] - before["screen"]
            before = dict(supervisor.plis)
            _on_hub_loop(session, session.to_resident["video"].set_source, side.sources[side.video])
            out["back"] = await _wait_colour(resident, "video", lambda c: c[0] > 150 and c[1] > 150 and c[2] < 100)
            out["camera_plis"] = supervisor.plis["video"] - before["video"]
            out["relay"] = relay_counts(session)
            await http.post(f"/api/video/sessions/{sid}/hangup", headers={"Authorization": f"Bearer {token}"})
            for peer in (resident, agent, supervisor):
                await peer.close()
        return out

    out = served_scenario(app, netns, scenario)
    assert out["resident_plis_first_agent"] >= 1
    assert out["resident_plis_second_agent"] > out["resident_plis_first_agent"]
    assert out["supervisor_sees"][0] > 150 and out["supervisor_sees"][1] < 80  # the resident's red
    assert out["screen_plis"] >= 1 and out["camera_plis"] >= 1
    sent = out["relay"]["sent"]
    assert all(t["transcoded"] == 0 for t in sent.values()), sent
    assert sent["to_resident.audio"]["forwarded"] >= 100  # both agents' voices reached the resident
    # Nothing recorded, no phone: the hub decoded nothing at all, audio or video.
    assert all(r["decoded"] == 0 for r in out["relay"]["received"].values()), out["relay"]


@pytest.mark.slow
def test_a_peer_without_vp8_is_decoded_and_reencoded(video_settings, knowledge_base, netns):
    """An agent whose browser offers only H.264: the hub falls back to decoding and re-encoding (both
    ways), the recording of that side is H.264; the resident side stays VP8 end to end."""
    from xiaozhi.hub.app import create_app

    app = create_app(video_settings, knowledge_base=knowledge_base)

    async def scenario(url: str) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            sid, token, resident, r = await resident_joins(http, recording_consent=True)
            assert r.status_code == 200 and "VP8" in r.json()["sdp"] and "H264" not in r.json()["sdp"]
            await until_queued(video_settings, sid)
            claim(video_settings, sid, "agent9")
            agent = Peer("agent", colour=(30, 200, 30), screen_colour=(30, 30, 220), video_codec="video/H264")
            r = await agent.offer(http, f"/api/video/sessions/{sid}/agent/offer", await _staff_token(http, "agent9", "agent"))
            assert r.status_code == 200, r.text
            assert "H264" in r.json()["sdp"] and "VP8" not in r.json()["sdp"]
            await agent.wait_frames("video", 15)
            await resident.wait_frames("video", 15)
            await resident.wait_frames("screen", 10)
            out = {"agent_sees": await _wait_colour(agent, "video", lambda c: c[0] > 150),
                   "resident_sees": await _wait_colour(resident, "video", lambda c: c[1] > 150),
                   "resident_screen": await _wait_colour(resident, "screen", lambda c: c[2] > 150)}
            await asyncio.sleep(1.0)
            out["relay"] = relay_counts(app.state.video.get(sid))
            await http.post(f"/api/video/sessions/{sid}/hangup", headers={"Authorization": f"Bearer {token}"})
            out["sid"] = sid
            await resident.close()
            await agent.close()
            return out

    out = served_scenario(app, netns, scenario)
    sent, received = out["relay"]["sent"], out["relay"]["received"]
    for name in ("to_agent.video", "to_resident.video", "to_resident.screen"):
        assert sent[name]["transcoded"] >= 10 and sent[name]["forwarded"] == 0, out["relay"]
    assert received["agent.video"]["codec"] == "video/h264" and received["agent.video"]["decoded"] >= 10
    assert received["resident.video"]["codec"] == "video/vp8" and received["resident.video"]["decoded"] >= 10
    folder = video_settings.var_dir / "recordings" / out["sid"]
    codecs = {}
    for path in folder.glob("*.mkv"):
        with av.open(str(path)) as container:
            codecs[path.name.rsplit("-", 1)[1]] = container.streams.video[0].codec_context.name
            assert sum(1 for _ in container.decode(video=0)) >= 10
    assert codecs == {"resident.mkv": "vp8", "agent.mkv": "h264"}


def test_garbage_on_the_video_socket_gets_an_error_not_a_crash(video_hub):
    from starlette.websockets import WebSocketDisconnect

    created = video_hub.post("/api/video/sessions", json={}).json()
    sid, token = created["session_id"], created["token"]
    limit = video_hub.app.state.settings.ws_max_frame_bytes
    with video_hub.websocket_connect(f"/api/video/sessions/{sid}/ws?token={token}") as ws:
        assert ws.receive_json()["event"] == "state"
        ws.send_bytes(b"\xff\xfe")
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"] == "binary_not_supported" and error["message"]
        ws.send_text("{not json")
        assert ws.receive_json()["error"] == "invalid_json"
        ws.send_text('"just a string"')
        assert ws.receive_json()["error"] == "bad_message"
        ws.send_text("{}")  # the page's keep-alive: accepted silently
        ws.send_bytes(b"again")
        assert ws.receive_json()["error"] == "binary_not_supported"  # the socket is still there
        ws.send_text("{}" + " " * limit)
        assert ws.receive_json()["error"] == "frame_too_large"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1009


def test_staff_reads_messages_and_live_watching_are_audited(video_hub):
    """A supervisor may read any transcript: each read, message and socket is on the record."""
    created = video_hub.post("/api/video/sessions", json={}).json()
    sid = created["session_id"]
    supervisor = make_staff(video_hub, "super_audit", "supervisor")
    assert video_hub.get(f"/api/video/sessions/{sid}", headers=supervisor).status_code == 200
    assert video_hub.post(f"/api/video/sessions/{sid}/chat", json={"text": "您好，我来帮您看看"},
                          headers=supervisor).status_code == 201
    token = supervisor["Authorization"].split()[1]
    with video_hub.websocket_connect(f"/api/video/sessions/{sid}/ws?token={token}") as ws:
        ws.receive_json()
    # The resident's own reads are not staff actions.
    assert video_hub.get(f"/api/video/sessions/{sid}", headers={"Authorization": f"Bearer {created['token']}"}).status_code == 200
    audit = video_hub.get("/api/staff/audit", params={"actor": "super_audit"}, headers=staff_login(video_hub)).json()
    actions = {(e["action"], e["target"]) for e in audit}
    assert {("video.view", sid), ("video.message", sid), ("video.watch", sid)} <= actions, actions
    message = next(e for e in audit if e["action"] == "video.message")
    assert message["detail"] == {"chars": len("您好，我来帮您看看")} and message["client"]
    assert "您好" not in str(audit)  # the audit log holds no message text
    everyone = video_hub.get("/api/staff/audit", headers=staff_login(video_hub)).json()
    assert not any(e["actor"] == "" and e["target"] == sid for e in everyone)


# -- issue 19: video slots cannot be held by anyone ---------------------------------------------------
def test_one_address_holds_at_most_its_share_of_the_video_slots(hub_settings, knowledge_base):
    """Six unconnected kiosk offers from one address held every slot; now an address holds at most
    XIAOZHI_VIDEO_MAX_SESSIONS_PER_CLIENT (2) and others still get a session."""
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    settings = hub_settings.model_copy(update={"video_max_sessions": 6, "video_connect_timeout_s": 20})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as hub:
        one, other = client_from(hub, "203.0.113.7"), client_from(hub, "198.51.100.9")

        def offer(client) -> tuple[int, dict, tuple]:
            created = client.post("/api/video/sessions", json={}).json()
            auth = {"Authorization": f"Bearer {created['token']}"}
            r = client.post(f"/api/video/sessions/{created['session_id']}/resident/offer",
                            json={"sdp": an_offer(), "type": "offer"}, headers=auth)
            return r.status_code, r.json(), (created["session_id"], auth)

        first, second, third = offer(one), offer(one), offer(one)
        assert [first[0], second[0], third[0]] == [200, 200, 429]
        assert third[1]["error"] == "video_busy_here" and "已有进行中的视频咨询" in third[1]["message"]
        assert offer(other)[0] == 200  # another address is not affected
        sid, auth = first[2]
        one.post(f"/api/video/sessions/{sid}/hangup", headers=auth)
        assert offer(one)[0] == 200  # a slot given back can be used again
        assert len(hub.app.state.video.sessions) == 3


def test_an_offer_that_never_connects_is_dropped_soon_and_never_queued(hub_settings, knowledge_base):
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app
    from xiaozhi.settings import Settings

    assert Settings().video_connect_timeout_s <= 10  # was 30 s: a slot held that long per unconnected offer
    settings = hub_settings.model_copy(update={"video_connect_timeout_s": 0.5})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as hub:
        created = hub.post("/api/video/sessions", json={}).json()
        sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
        assert hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                        headers=auth).status_code == 200
        deadline = time.monotonic() + 5
        while hub.app.state.video.sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hub.app.state.video.sessions and hub.app.state.video.peer_connections == 0
        with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
            assert db.execute("SELECT count(*) FROM escalations").fetchone() == (0,)
        assert hub.get(f"/api/video/sessions/{sid}", headers=auth).json()["status"] == "open"
