"""The phone bridge end to end: a sipp caller presses 0, an agent joins from a WebRTC peer (aiortc in
Python standing in for the agent's browser, which uses the same endpoint), hears the caller, and the
caller hears the agent (checked in the hotline's own recording of what it sent to the caller).

Runs in a private network namespace (tests/support/netns.py): the hub's SIP endpoint, sipp and both WebRTC
peers all live inside it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.support.browser import serve
from tests.support import ADMIN_PASSWORD, free_port
from tests.support.netns import run_in_netns
from tests.support.video_clients import Peer

from telephony.testing import environment_has_sipp, run_sipp

SCENARIO = Path(__file__).parent.parent / "data" / "video" / "uac_zero_agent_talk.xml"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not environment_has_sipp(), reason="sipp not installed: apt-get install sip-tester"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("faster_whisper") is None,
                       reason="the hotline needs faster-whisper"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def chunk_freqs(pcm: np.ndarray, rate: int, loud: float = 1500) -> list[float]:
    """Dominant frequency of every loud 100 ms chunk."""
    size = rate // 10
    out = []
    for i in range(0, len(pcm) - size, size):
        chunk = pcm[i : i + size].astype(np.float64)
        if np.sqrt(np.mean(chunk**2)) < loud:
            continue
        spectrum = np.abs(np.fft.rfft(chunk * np.hanning(size)))
        out.append(float(np.fft.rfftfreq(size, 1 / rate)[int(np.argmax(spectrum))]))
    return out


def tone_share(frames: np.ndarray, hz: float, rate: int) -> np.ndarray:
    """Per frame (rows), the share of its energy that a sinusoid at ``hz`` explains (1: a pure tone; 0: silence)."""
    t = np.arange(frames.shape[1]) / rate
    basis = np.stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)], axis=1)
    fitted = frames @ (basis @ np.linalg.pinv(basis)).T
    return np.sum(fitted**2, axis=1) / np.maximum(np.sum(frames**2, axis=1), 1.0)


def test_sipp_caller_presses_0_and_is_bridged_to_an_agent_peer(hub_settings, knowledge_base, netns, tmp_path):
    from tests.support.phone import SHORT_PROMPTS

    from xiaozhi.hub.app import create_app

    assert shutil.which("sox")
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-t", "ul", str(tmp_path / "tone.ulaw"),
                    "synth", "3", "sine", "700", "vol", "0.5"], check=True)
    prompts = hub_settings.var_dir / "short_prompts.yaml"
    prompts.write_text(SHORT_PROMPTS, encoding="utf-8")

    def scenario() -> dict:
        from telephony.testing import free_udp_port

        settings = hub_settings.model_copy(update={
            "sip_enabled": True, "sip_port": free_udp_port(), "sip_rtp_ports": "", "phone_prompts_file": prompts})
        app = create_app(settings, knowledge_base=knowledge_base)
        with serve(app, free_port()) as url:
            return asyncio.run(call(app, url, settings))

    async def call(app, url: str, settings) -> dict:
        out: dict = {}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            admin = {"Authorization": "Bearer " + (await http.post("/api/staff/login", json={
                "username": "admin", "password": ADMIN_PASSWORD})).json()["token"]}
            await http.post("/api/staff/users", json={"username": "zhao", "password": "zhao-password-123",
                                                      "role": "agent"}, headers=admin)
            token = (await http.post("/api/staff/login", json={"username": "zhao",
                                                                "password": "zhao-password-123"})).json()["token"]
            sipp = asyncio.create_task(run_sipp(SCENARIO, settings.sip_port, "-s", "12393", cwd=tmp_path, timeout=40))
            # The caller's 0 puts the call in the queue; the desk hands it to zhao.
            deadline = time.monotonic() + 20
            conv_id = None
            while conv_id is None:
                assert time.monotonic() < deadline, "the call was never escalated"
                await asyncio.sleep(0.1)
                for cid in app.state.phone.live_conversations():
                    conv = await app.state.store.get_conversation(cid)
                    if conv and conv.status == "escalated":
                        conv_id = cid
            async with app.state.store.sessions() as s, s.begin():
                from sqlalchemy import update

                from xiaozhi.hub.infra.store import Escalation

                await s.execute(update(Escalation).where(Escalation.conversation_id == conv_id)
                                .values(status="claimed", agent="zhao"))
            info = (await http.get(f"/api/video/sessions/{conv_id}", headers={"Authorization": f"Bearer {token}"})).json()
            out["channel"], out["contact"] = info["channel"], info["contact"]
            agent = Peer("phone_agent", tone_hz=440)
            r = await agent.offer(http, f"/api/video/sessions/{conv_id}/agent/offer", token)
            assert r.status_code == 200, r.text
            out["kind"] = r.json()["kind"]
            out["m_lines"] = [line for line in r.json()["sdp"].splitlines() if line.startswith("m=")]
            result = await sipp
            assert result.returncode == 0, f"sipp failed:\n{result.errors}\n{result.output[-2000:]}"
            received = agent.received["audio"]
            out["agent_heard"] = np.frombuffer(bytes(received.audio), dtype=np.int16)
            out["agent_rate"] = received.last.sample_rate
            deadline = time.monotonic() + 10
            while app.state.video.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            out["sessions_after"] = len(app.state.video.sessions)
            out["pc_after"] = agent.pc.connectionState
            await agent.close()
            conv = await app.state.store.get_conversation(conv_id)
            out["recording"] = conv.meta.get("recording", {})
        return out

    out = run_in_netns(netns, scenario, timeout=120)
    assert out["channel"] == "phone" and "*" in out["contact"] and out["kind"] == "phone"
    assert out["m_lines"] and all(m.startswith("m=audio") for m in out["m_lines"])  # audio only
    # The agent heard the caller's 700 Hz (8 kHz G.711 -> 48 kHz Opus), for about the 3 s it played.
    freqs = chunk_freqs(out["agent_heard"], out["agent_rate"])
    tone_chunks = [f for f in freqs if abs(f - 700) < 20]
    assert len(tone_chunks) >= 20, freqs
    # The caller heard the agent's 440 Hz: the hotline recorded what it sent to the caller.
    with wave.open(out["recording"]["outbound"]) as w:
        outbound = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    agent_chunks = [f for f in chunk_freqs(outbound, 8000) if abs(f - 440) < 15]
    assert len(agent_chunks) >= 20, chunk_freqs(outbound, 8000)
    # ...all of it: from the first to the last 20 ms frame of the agent's voice, no frame is missing (a
    # frame the bridge lost is a silent frame on the caller's side). The agent's frames are told apart by
    # their tone, not their loudness: before the agent joined, the caller heard the hold message, whose
    # pauses are not the bridge's.
    frames = outbound[: outbound.size // 160 * 160].reshape(-1, 160).astype(np.float64)
    share = tone_share(frames, 440, 8000)
    agent = np.flatnonzero(share > 0.9)
    span = share[agent[0] : agent[-1] + 1]
    gaps = int(np.sum(span < 0.5))
    assert gaps <= 0.05 * len(span), f"{gaps} frames without the agent's voice among {len(span)} while the agent spoke"
    # The caller hung up: the bridge session and the agent's peer are gone.
    assert out["sessions_after"] == 0 and out["pc_after"] in ("closed", "failed")
