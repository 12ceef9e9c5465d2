"""The hotline inside a test's hub: a hub with SIP on, calls placed by a scripted SIP peer, waits on what
the bot says, the conversations and escalations the calls made. Used by the phone, video, metrics and
long-turn tests."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from telephony.audio import load_wav
from telephony.vad import SILERO_WINDOW
from telephony.testing import RtpCaller, SipPeer, environment_has_sipp, free_udp_port
from xiaozhi.hub.infra.store import Conversation, Escalation

ASR = Path(__file__).resolve().parent.parent / "data" / "asr"
SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "telephony"
needs_sipp = pytest.mark.skipif(not environment_has_sipp(), reason="sipp not installed: apt-get install sip-tester")
needs_whisper = pytest.mark.skipif(
    __import__("importlib").util.find_spec("faster_whisper") is None, reason="faster-whisper not installed"
)
# Short prompts (a legitimate phone_prompts_file) keep the behaviour tests quick; the greeting test
# uses the real prompts.yaml.
SHORT_PROMPTS = """
prompts:
  greeting: 您好，请讲。
  greeting_no_recording: 您好，请讲。
  reprompt_silence: 您还在吗？
  goodbye_silence: 再见。
  menu: 按1咨询凭证，按2咨询异地就医，按0转人工。
  menu_repeat: 重听请按星号。
  not_heard: 请再说一遍。
  not_understood: 我不太明白。
  hold: 请稍候。
  hold_busy: 座席正忙。
  transfer_failed: 转接失败。
  agent_left: 请问还有什么可以帮您？
  hold_timeout: 座席无空闲，再见。
  goodbye: 再见。
  technical_error: 系统故障。
  asr_unavailable: 识别故障，请按键。
menu_options:
  "1": 医保电子凭证怎么激活
  "2": 异地就医怎么备案
"""


def trimmed(name: str) -> np.ndarray:
    """A fixture without its leading/trailing quiet (speech starts at sample 0)."""
    samples = load_wav(ASR / f"{name}.wav")
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 1500)
    return samples[max(0, loud[0] - 80) : loud[-1] + 400]


@asynccontextmanager
async def phone_hub(hub_settings, knowledge_base, tmp_path: Path | None = None, *, short_prompts: bool = True,
                    **overrides):
    """The hub app with the hotline on (lifespan run in this test's event loop)."""
    from xiaozhi.hub.app import create_app

    # no background pre-rendering of the whole knowledge base's answers (tests/phone/test_tts_kokoro.py covers it)
    update = {"sip_enabled": True, "sip_port": free_udp_port(), "sip_rtp_ports": "", "tts_prerender": False}
    if short_prompts:
        prompts = hub_settings.var_dir / "short_prompts.yaml"
        prompts.write_text(SHORT_PROMPTS, encoding="utf-8")
        update["phone_prompts_file"] = prompts
    update.update(overrides)
    app = create_app(hub_settings.model_copy(update=update), knowledge_base=knowledge_base)
    async with app.router.lifespan_context(app):
        assert app.state.phone.user_agent is not None, "the hotline did not start"
        yield app
    await asyncio.sleep(0.1)
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("voice-") and not t.done()]
    assert not left, f"the voice bot left tasks behind: {left}"


async def conversations(app) -> list[Conversation]:
    async with app.state.store.sessions() as s:
        return list((await s.execute(select(Conversation).order_by(Conversation.created_at))).scalars())


async def transcript_then_hang_up(app, peer, call) -> list:
    """The call's (only) conversation transcript as it is now; then the caller hangs up."""
    [conv] = await conversations(app)
    transcript = await app.state.store.transcript(conv.id)
    peer.in_dialog("BYE", call)
    await peer.expect(200)
    return transcript


async def escalations(app) -> list[Escalation]:
    async with app.state.store.sessions() as s:
        return list((await s.execute(select(Escalation))).scalars())


async def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


@asynccontextmanager
async def placed_call(app, dialled: str = "12393", caller: str = "13812345678"):
    peer = SipPeer(app.state.phone.user_agent.port)
    call, ok = await peer.answered_call(dialled=dialled, caller=caller)
    rtp = RtpCaller(peer, ok)
    try:
        yield peer, call, rtp
    finally:
        rtp.close()
        peer.close()


async def until_quiet(rtp: RtpCaller, quiet_s: float = 0.6, timeout: float = 30.0) -> float:
    """Keep sending silence until the bot has been quiet for ``quiet_s``; returns when it went quiet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await rtp.pause(0.1)
        heard = rtp.bot_audio(time.monotonic() - quiet_s)
        if not heard and rtp.bot_audio():
            return time.monotonic() - quiet_s
    raise AssertionError("the bot never went quiet")


async def until_heard(rtp: RtpCaller, since: float, timeout: float = 20.0, packets: int = 1) -> bool:
    """Send silence until the bot says something after ``since`` (at least ``packets`` packets of it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(rtp.bot_audio(since)) >= packets:
            return True
        await rtp.pause(0.1)
    return False


def backchannel() -> np.ndarray:
    """嗯: one 120 ms syllable of the fixtures, too short to barge in (VoiceConfig.barge_in_ms)."""
    return trimmed("01_pingzheng_jihuo")[5800:6760]


async def say_at_window_start(rtp: RtpCaller, session, samples: np.ndarray, phase: int = 64) -> float:
    """Say ``samples`` so that they start ``phase`` samples into one of Silero's 32 ms windows.

    Silero decides on 256-sample windows laid over the 160-sample frames, so where a short sound falls
    in them changes how many frames it is heard in: the 120 ms ``backchannel`` is 60-160 ms of speech
    depending on that place and on how long the line was silent before (measured over 40-700 silent
    frames). How long the caller waited for the bot depends on the machine's load; at this place it is
    heard as 100 ms every time, so a test of a sound just short of ``barge_in_ms`` does not depend on it.
    """
    deadline = time.monotonic() + 2.0
    while session.vad.samples_seen < rtp.audio_frames * 160 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # the hub has not read every frame sent yet
    frames = 0
    while (session.vad.samples_seen + frames * 160) % SILERO_WINDOW != phase:
        frames += 1
    if frames:
        await rtp.pause(frames * 0.02)
    return await rtp.say(samples)


def faint_speech() -> list[np.ndarray]:
    """A caller far from the handset on a faint line: speech to the VAD (Silero, unlike the energy VAD,
    does not go by level; nor does it take white noise for speech), too faint for the recogniser."""
    faint = [trimmed(name).astype(np.float64) for name in ("07_canbao_jiaofei", "01_pingzheng_jihuo")]
    return [(x * 50 / np.sqrt(np.mean(x**2))).astype(np.int16) for x in faint]  # RMS 50: about -56 dBFS


async def faint_caller_reaches_the_menu(app, peer, call, rtp: RtpCaller) -> list:
    """Two faint turns bring the keypad menu, whose key 2 asks its question; the transcript, then hang-up."""
    await until_quiet(rtp)
    session = app.state.phone.bot.sessions[call.call_id]
    for burst in faint_speech():
        sent = await rtp.say(burst)
        assert await until_heard(rtp, sent), "the bot says it did not understand"
        await until_quiet(rtp)
    assert session.mode == "menu", session.timings
    pressed = time.monotonic()
    await rtp.key("2")
    assert await until_heard(rtp, pressed + 0.3), "the answer to the menu's question"
    return await transcript_then_hang_up(app, peer, call)
