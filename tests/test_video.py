"""Video help through the hub: signalling, authorisation, session limits, and real media relayed both ways.

Media tests run in a private network namespace (tests/netns.py explains why and how) with aiortc
peers in Python playing resident and agent; tests/test_video_browser.py does the same with Chromium.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import av
import httpx
import pytest
from aiortc import RTCPeerConnection
from conftest import free_port, make_staff, open_session, staff_login
from netns import netns_available, private_netns, run_in_netns
from video_clients import Peer

from video.ice import rtc_configuration

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def claim(settings, conversation_id: str, agent: str) -> None:
    """What the agent desk does when an agent accepts the item (status/agent columns of the contract)."""
    with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
        rows = db.execute(
            "UPDATE escalations SET status='claimed', agent=? WHERE conversation_id=?", (agent, conversation_id)
        ).rowcount
    assert rows >= 1, "no escalation to claim"


def an_offer(kind: str = "resident") -> str:
    async def make():
        pc = RTCPeerConnection(rtc_configuration([]))
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        if kind == "resident":
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


@pytest.fixture
def video_settings(hub_settings):
    return hub_settings.model_copy(update={"video_max_sessions": 2, "video_connect_timeout_s": 20})


@pytest.fixture
def video_hub(video_settings, knowledge_base):
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    with TestClient(create_app(video_settings, knowledge_base=knowledge_base)) as client:
        yield client


@pytest.fixture
def netns():
    if not netns_available():
        pytest.skip("needs root and iproute2 for a private network namespace")
    with private_netns() as (name, _address):
        yield name


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
    assert info["you"] == "resident" and info["channel"] == "video" and info["status"] == "escalated"
    assert info["session"]["state"] == "waiting" and "messages" not in info
    app = video_hub.app
    assert app.state.video.peer_connections == 1
    r = video_hub.post(f"/api/video/sessions/{body['session_id']}/hangup", headers=auth)
    assert r.json() == {"closed": True} and app.state.video.peer_connections == 0 and not app.state.video.sessions
    transcript = video_hub.get(f"/api/sessions/{body['session_id']}/messages", headers=auth).json()["messages"]
    assert transcript[-1]["role"] == "system" and "挂断" in transcript[-1]["text"]


def test_chat_conversation_moves_to_video_and_is_queued(video_hub):
    session_id, auth = open_session(video_hub)
    r = video_hub.post(f"/api/video/sessions/{session_id}/resident/offer",
                       json={"sdp": an_offer(), "type": "offer"}, headers=auth)
    assert r.status_code == 200 and r.json()["recording"] is False  # no consent: no recording
    info = video_hub.get(f"/api/video/sessions/{session_id}", headers=auth).json()
    assert info["channel"] == "video" and info["status"] == "escalated"
    with sqlite3.connect(video_hub.app.state.settings.var_dir / "xiaozhi.db") as db:
        assert db.execute("SELECT channel, status FROM escalations WHERE conversation_id=?", (session_id,)).fetchall() == [
            ("video", "waiting")
        ]


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


def test_who_may_join_the_agent_side(video_hub):
    app = video_hub.app
    created = video_hub.post("/api/video/sessions", json={}).json()
    sid, resident = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    assert video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                          headers=resident).status_code == 200
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
    video_hub.post(f"/api/video/sessions/{sessions[0][0]}/hangup", headers=sessions[0][1])
    sid, auth = sessions[2]
    assert video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                          headers=auth).status_code == 200


# -- media relayed for real (aiortc peers in a private network namespace) ------------------------------
@pytest.mark.slow
def test_media_flows_both_ways_is_recorded_and_freed(video_settings, knowledge_base, netns):
    from browser import serve

    from xiaozhi.hub.app import create_app

    app = create_app(video_settings, knowledge_base=knowledge_base)

    async def scenario(url: str) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            created = (await http.post("/api/video/sessions", json={})).json()
            sid, token = created["session_id"], created["token"]
            resident = Peer("resident", colour=(200, 30, 30))
            r = await resident.offer(http, f"/api/video/sessions/{sid}/resident/offer", token, recording_consent=True)
            assert r.status_code == 200, r.text

            admin = (await http.post("/api/staff/login", json={"username": "admin", "password": "test-admin-password"})).json()
            await http.post("/api/staff/users", json={"username": "agent7", "password": "agent7-password-123",
                                                     "role": "agent"}, headers={"Authorization": f"Bearer {admin['token']}"})
            agent_token = (await http.post("/api/staff/login", json={"username": "agent7",
                                                                      "password": "agent7-password-123"})).json()["token"]
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

    def inside():
        with serve(app, free_port()) as url:
            return asyncio.run(scenario(url))

    out = run_in_netns(netns, inside, timeout=120)
    assert out["state"]["state"] == "connected" and out["state"]["recording"] is True
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
            frames = sum(1 for _ in container.decode(video=0))
            assert frames >= 10, (path, frames)


def test_an_agent_who_logs_out_leaves_the_call(video_hub, monkeypatch):
    from starlette.websockets import WebSocketDisconnect

    from xiaozhi.hub.routers import video as video_router

    monkeypatch.setattr(video_router, "AGENT_RECHECK_S", 0.2)
    app = video_hub.app
    created = video_hub.post("/api/video/sessions", json={}).json()
    sid, resident = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
    assert video_hub.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"},
                          headers=resident).status_code == 200
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
