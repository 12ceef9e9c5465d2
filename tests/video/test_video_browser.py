"""Video help in real browsers: the resident page (/video) and the agent page (/agent/call) in headless
Chromium connect through the hub's aiortc relay, inside a private network namespace (tests/support/netns.py).

Checked from each page's RTCPeerConnection.getStats(): inbound video frames decoded and audio packets
received keep increasing on both sides; the agent's screen share reaches the resident's third m-line;
chat lands in the transcript; the recordings exist; hang-up frees every server-side peer.
"""

from __future__ import annotations

import sqlite3
import time

import av
import httpx
import pytest
from tests.support.browser import SCREENSHOT_DIR, launch_chromium, serve
from tests.support import ADMIN_PASSWORD, free_port
from tests.support.netns import run_in_netns
from tests.support.video_clients import relay_counts

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

INBOUND = "() => XZVideo.inbound(window.xzCall.pc)"
SCREEN_FRAMES = """async () => {
  const pc = window.xzCall.pc; let frames = 0;
  const t = pc.getTransceivers()[2];
  (await t.receiver.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') frames += s.framesDecoded || 0; });
  return frames;
}"""


def _claim(settings, conversation_id: str, agent: str) -> None:
    with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
        assert db.execute("UPDATE escalations SET status='claimed', agent=? WHERE conversation_id=?",
                          (agent, conversation_id)).rowcount >= 1


def _wait_js(page, expression: str, timeout: float = 10000) -> None:
    """Poll a JS expression (page.wait_for_function compiles it with eval, which the pages' CSP forbids)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression} on {page.url}")
        time.sleep(0.1)


def _flowing(page, before: dict, timeout: float = 10.0) -> dict:
    """Wait until inbound video frames and audio packets have both grown since ``before``."""
    deadline = time.monotonic() + timeout
    while True:
        now = page.evaluate(INBOUND)
        if now["framesDecoded"] > before["framesDecoded"] + 5 and now["audioPackets"] > before["audioPackets"] + 10:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"media not flowing on {page.url}: {before} -> {now}")
        time.sleep(0.2)


def test_resident_and_agent_pages_talk_through_the_relay(hub_settings, knowledge_base, netns):
    from playwright.sync_api import sync_playwright

    from xiaozhi.hub.app import create_app

    settings = hub_settings.model_copy(update={"video_max_sessions": 4, "video_capture": "480x360@15"})
    app = create_app(settings, knowledge_base=knowledge_base)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)

    def scenario() -> dict:
        out: dict = {}
        with serve(app, free_port()) as url, httpx.Client(base_url=url, timeout=30) as http:
            admin = {"Authorization": "Bearer " + http.post("/api/staff/login", json={
                "username": "admin", "password": ADMIN_PASSWORD}).json()["token"]}
            for name in ("wang", "li"):
                assert http.post("/api/staff/users", json={"username": name, "password": f"{name}-password-123",
                                                           "role": "agent", "display_name": name}, headers=admin).status_code == 201
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                try:
                    resident_ctx = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
                    agent_ctx = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
                    resident = resident_ctx.new_page()
                    agent = agent_ctx.new_page()

                    # The resident: consent notice first, then camera and microphone, then the queue.
                    resident.goto(url + "/video")
                    resident.wait_for_selector("#consent:not(.hidden)")
                    out["consent"] = resident.inner_text("#consent")
                    resident.screenshot(path=str(SCREENSHOT_DIR / "video-resident-consent.png"))
                    resident.click("#start")
                    _wait_js(resident, "document.querySelector('#status').textContent.includes('请稍候')")
                    sid = resident.evaluate("window.xzCall.sessionId")
                    out["sid"] = sid
                    out["capture"] = resident.evaluate(
                        "(() => { const s = window.xzCall.stream.getVideoTracks()[0].getSettings();"
                        " return [s.width, s.height, Math.round(s.frameRate)]; })()")

                    # An agent who does not hold the item is turned away by the page.
                    agent.goto(f"{url}/agent/call?conversation={sid}")
                    agent.wait_for_selector("#login:not(.hidden)")
                    agent.fill("#username", "li")
                    agent.fill("#password", "li-password-123")
                    agent.click("#loginForm button")
                    agent.wait_for_selector("#problem:not(.hidden)")
                    out["not_holder"] = agent.inner_text("#problemText")
                    agent.evaluate("sessionStorage.removeItem('xz_staff_token')")

                    # The holder (the desk set the escalation to claimed/wang) connects.
                    _claim(settings, sid, "wang")
                    started = time.monotonic()
                    agent.goto(f"{url}/agent/call?conversation={sid}")
                    agent.wait_for_selector("#login:not(.hidden)")
                    agent.fill("#username", "wang")
                    agent.fill("#password", "wang-password-123")
                    agent.click("#loginForm button")
                    zero = {"framesDecoded": 0, "audioPackets": 0}
                    _wait_js(agent, "window.xzCall.pc && window.xzCall.pc.connectionState === 'connected'",
                                            timeout=15000)
                    first_agent = _flowing(agent, zero)
                    first_resident = _flowing(resident, zero)
                    out["connect_s"] = time.monotonic() - started
                    # ... and keeps flowing both ways.
                    out["agent_stats"] = (first_agent, _flowing(agent, first_agent))
                    out["resident_stats"] = (first_resident, _flowing(resident, first_resident))
                    _wait_js(resident, "document.querySelector('#status').textContent.includes('已接入')")

                    # Screen share: the agent's second video sender fills the resident's third m-line.
                    agent.click("#share")
                    _wait_js(agent, "document.querySelector('#share').textContent === '停止共享'", timeout=10000)
                    deadline = time.monotonic() + 10
                    while resident.evaluate(SCREEN_FRAMES) < 5:
                        assert time.monotonic() < deadline, "the shared screen did not reach the resident"
                        time.sleep(0.2)
                    resident.wait_for_selector("#screenBox:not(.hidden)")
                    out["screen_frames"] = resident.evaluate(SCREEN_FRAMES)

                    # Chat beside the video, both ways.
                    resident.fill("#chatInput", "我的医保电子凭证激活不了")
                    resident.click("#chatForm button")
                    agent.wait_for_selector("#log >> text=我的医保电子凭证激活不了")
                    agent.fill("#chatInput", "请打开国家医保服务平台，跟着我的屏幕操作")
                    agent.click("#chatForm button")
                    resident.wait_for_selector("#log >> text=请打开国家医保服务平台")
                    time.sleep(0.5)
                    resident.screenshot(path=str(SCREENSHOT_DIR / "video-resident-connected.png"))
                    agent.screenshot(path=str(SCREENSHOT_DIR / "video-agent-call.png"))
                    out["live"] = app.state.video.get(sid).describe()
                    out["relay"] = relay_counts(app.state.video.get(sid))
                    out["pcs_live"] = app.state.video.peer_connections

                    # The agent hangs up: the resident is told, the server frees both peers.
                    agent.click("#hangup")
                    resident.wait_for_selector("#ended:not(.hidden)", timeout=10000)
                    out["ended_text"] = resident.inner_text("#endedText")
                    agent.wait_for_selector("#ended:not(.hidden)")
                    out["pcs_after"] = app.state.video.peer_connections
                    out["sessions_after"] = len(app.state.video.sessions)
                    resident.screenshot(path=str(SCREENSHOT_DIR / "video-resident-ended.png"))

                    # A resident who closes the page (no hang-up click) frees the session too.
                    resident.goto(url + "/video")
                    resident.wait_for_selector("#consent:not(.hidden)")
                    resident.click("#start")
                    _wait_js(resident, "document.querySelector('#status').textContent.includes('请稍候')")
                    out["before_unload"] = len(app.state.video.sessions)
                    resident.close()
                    deadline = time.monotonic() + 10
                    while app.state.video.sessions and time.monotonic() < deadline:
                        time.sleep(0.1)
                    out["after_unload"] = len(app.state.video.sessions)
                finally:
                    browser.close()
        return out

    out = run_in_netns(netns, scenario, timeout=240)
    assert "录音录像" in out["consent"]
    assert out["capture"] == [480, 360, 15]  # XIAOZHI_VIDEO_CAPTURE reaches getUserMedia
    assert "不在您的名下" in out["not_holder"]
    a0, a1 = out["agent_stats"]
    r0, r1 = out["resident_stats"]
    assert a1["framesDecoded"] > a0["framesDecoded"] and a1["audioPackets"] > a0["audioPackets"]
    assert r1["framesDecoded"] > r0["framesDecoded"] and r1["audioPackets"] > r0["audioPackets"]
    assert out["screen_frames"] >= 5
    # Chromium sends and receives VP8 and Opus: the hub forwarded every frame without decoding or
    # encoding it (audio is decoded only for the recordings' AAC).
    relay = out["relay"]
    for name in ("to_agent.video", "to_resident.video", "to_resident.screen", "to_agent.audio", "to_resident.audio"):
        assert relay["sent"][name]["forwarded"] >= 5 and relay["sent"][name]["transcoded"] == 0, relay
    for name, received in relay["received"].items():
        if name.endswith(".audio"):
            assert received["codec"] == "audio/opus", relay
        else:
            assert received["codec"] == "video/vp8" and received["decoded"] == 0, relay
    assert out["live"]["state"] == "connected" and out["live"]["agent"] == "wang" and out["pcs_live"] == 2
    assert "工作人员已结束" in out["ended_text"]
    assert out["pcs_after"] == 0 and out["sessions_after"] == 0
    assert out["before_unload"] == 1 and out["after_unload"] == 0
    files = list((settings.var_dir / "recordings" / out["sid"]).glob("*.mkv"))
    assert len(files) == 2 and all(f.stat().st_size > 10_000 for f in files)
    for path in files:  # Chromium's VP8, remuxed: decodable, at the capture size
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "vp8"
            frames = list(container.decode(video=0))
            assert len(frames) >= 10 and (frames[0].width, frames[0].height) == (480, 360), (path, len(frames))
    with sqlite3.connect(settings.var_dir / "xiaozhi.db") as db:
        texts = [row[0] for row in db.execute(
            "SELECT role || ':' || text FROM messages WHERE conversation_id=? ORDER BY seq", (out["sid"],))]
    assert "resident:我的医保电子凭证激活不了" in texts
    assert "agent:请打开国家医保服务平台，跟着我的屏幕操作" in texts
    print(f"browser connect (agent login click -> media both ways): {out['connect_s']:.2f} s")
