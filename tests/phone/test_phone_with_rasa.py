"""A phone call through the whole stack: `xiaozhi run` (Rasa, action server, hub with the hotline).

Slow (the shared `stack` fixture starts Rasa). The caller is a scripted SIP peer on loopback asking
a Mandarin fixture question; Rasa (not degraded mode) answers, and the transcript is read from the
stack's database.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from telephony.audio import load_wav
from telephony.testing import RtpCaller, SipPeer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(__import__("importlib").util.find_spec("faster_whisper") is None, reason="no faster-whisper"),
]

ASR = Path(__file__).parent.parent / "data" / "asr"


async def test_phone_call_answered_by_rasa(stack) -> None:
    peer = SipPeer(stack["sip_port"])
    call, ok = await peer.answered_call(dialled="057100000110", caller="13600001234")
    rtp = RtpCaller(peer, ok)
    try:
        # wait out the greeting (with the recording notice, about 8 s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await rtp.pause(0.1)
            if rtp.bot_audio() and not rtp.bot_audio(time.monotonic() - 0.8):
                break
        asked = await rtp.say(load_wav(ASR / "02_yidi_beian.wav"))
        deadline = time.monotonic() + 30
        while not rtp.bot_audio(asked) and time.monotonic() < deadline:
            await rtp.pause(0.1)
        assert rtp.bot_audio(asked), "the bot answered"
        await rtp.pause(1.0)
        peer.in_dialog("BYE", call)
        await peer.expect(200)
    finally:
        rtp.close()
        peer.close()
    await asyncio.sleep(1.0)
    db = sqlite3.connect(stack["var"] / "xiaozhi.db")
    try:
        conv = db.execute(
            "SELECT id, channel, contact, entry_point, region_code FROM conversations WHERE entry_point = ?",
            ("057100000110",),
        ).fetchone()
        assert conv is not None and conv[1:] == ("phone", "136******34", "057100000110", "330110")
        messages = db.execute("SELECT role, text, meta FROM messages WHERE conversation_id = ? ORDER BY seq",
                              (conv[0],)).fetchall()
    finally:
        db.close()
    said = [t for role, t, _ in messages if role == "resident"]
    bot = [(t, meta) for role, t, meta in messages if role == "bot"]
    assert any("异地" in t or "备案" in t for t in said), said
    assert bot and all('"degraded": true' not in (meta or "") for _, meta in bot), bot  # Rasa answered
