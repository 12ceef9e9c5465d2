"""Shared by bench/voice_latency.py and bench/voice_concurrency.py: a hub with the hotline on, callers.

The hub runs in this process (as `xiaozhi hub` does, lifespan included), on a temporary database,
with Rasa at --rasa-url (default: a dead port, so the hub's degraded mode answers from the
knowledge base: the dialogue share is then the knowledge-base search). Each caller is a scripted
SIP peer (telephony.testing.SipPeer + RtpCaller) sending one of the Mandarin fixtures of
tests/data/asr/ as paced µ-law RTP and timing the bot's first RTP packet with sound.

"End of the caller's speech" is when the caller sent its last voiced packet (fixtures are trimmed
to their speech); "first bot RTP packet" is the arrival of the first packet of the reply that is
not silence. Caller and bot share one event loop, as a PBX and the hub would share the machine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from telephony.audio import load_wav
from telephony.testing import RtpCaller, SipPeer, free_udp_port

ASR = REPO / "tests" / "data" / "asr"
FIXTURES = [line.split("\t") for line in (ASR / "transcripts.tsv").read_text("utf-8").splitlines() if line]


def trim(samples: np.ndarray) -> np.ndarray:
    """Speech only: the call times the answer from the last voiced packet."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 1500)
    return samples[max(0, loud[0] - 80) : loud[-1] + 400]


def trimmed(name: str) -> np.ndarray:
    return trim(load_wav(ASR / f"{name}.wav"))


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@asynccontextmanager
async def hotline(rasa_url: str | None = None, **overrides):
    """Yields the hub app with the hotline on."""
    from knowledge_base.factory import open_knowledge_base
    from xiaozhi.hub.app import create_app
    from xiaozhi.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as var:
        settings = Settings(var_dir=Path(var), rasa_url=rasa_url or f"http://127.0.0.1:{dead_port()}",
                            kb_reload_interval_s=0, sip_enabled=True, sip_port=free_udp_port(), sip_rtp_ports="",
                            sip_max_calls=100, phone_recording=False, survey_poll_interval_s=0,
                            tts_prerender=False,  # answers are cached by warm_up(), not by a background job
                            **overrides)
        # the real prompts with a short greeting: calls get to the question sooner (it is not timed)
        import yaml

        from telephony.tts import PROMPTS_FILE

        data = yaml.safe_load(PROMPTS_FILE.read_text("utf-8"))
        data["prompts"]["greeting"] = data["prompts"]["greeting_no_recording"] = "您好，请讲。"
        prompts = Path(var) / "prompts.yaml"
        prompts.write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
        settings = settings.model_copy(update={"phone_prompts_file": prompts})
        kb = await asyncio.to_thread(open_knowledge_base, settings.knowledge_base_config())
        app = create_app(settings, knowledge_base=kb)
        async with app.router.lifespan_context(app):
            yield app


@dataclass
class CallResult:
    latency_s: float | None
    end_of_turn_s: float = 0.0
    asr_s: float = 0.0
    dialogue_s: float = 0.0
    tts_s: float = 0.0
    early: bool = False  # the transcript was started at a pause, before the end of turn
    text: str = ""
    expected: str = ""
    gaps: list = None  # silences between the reply's clauses while the next was rendering (s)


async def after_greeting(rtp: RtpCaller, timeout: float = 30.0) -> None:
    """Send silence until the greeting has ended (the bot spoke, then 0.6 s of quiet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await rtp.pause(0.1)
        if rtp.bot_audio() and not rtp.bot_audio(time.monotonic() - 0.6):
            return


async def reply_latency(rtp, spoke_until: float, timeout: float = 60.0) -> float | None:
    """Seconds from the end of the caller's speech to the bot's first audio after it (None: no reply)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        heard = rtp.bot_audio(spoke_until)
        if heard:
            return heard[0][0] - spoke_until
        await rtp.pause(0.05)
    return None


async def one_call(app, fixture: str, expected: str, *, start_delay: float = 0.0, whole_reply: bool = False) -> CallResult:
    """Call, wait out the greeting, ask one question, time the answer, hang up (``whole_reply``: after
    the bot has been quiet for 1.5 s, so every clause of the reply is rendered and its gaps measured)."""
    await asyncio.sleep(start_delay)
    phone = app.state.phone
    peer = SipPeer(phone.user_agent.port)
    try:
        call, ok = await peer.answered_call(dialled="12393")
        rtp = RtpCaller(peer, ok)
        try:
            await after_greeting(rtp)
            session = phone.bot.sessions.get(call.call_id)
            spoke_until = await rtp.say(trimmed(fixture))
            latency = await reply_latency(rtp, spoke_until)
            if whole_reply and latency is not None:
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and rtp.bot_audio(time.monotonic() - 1.5):
                    await rtp.pause(0.1)
            result = CallResult(latency, expected=expected)
            if session is not None and session.timings:
                t = session.timings[0]
                result.end_of_turn_s, result.asr_s, result.dialogue_s, result.tts_s, result.early = (
                    t.end_of_turn_s, t.asr_s, t.dialogue_s, t.tts_s, t.early)
                result.text = t.text
                result.gaps = list(t.gaps)
            peer.in_dialog("BYE", call)
            await peer.expect(200, timeout=5)
            return result
        finally:
            rtp.close()
    finally:
        peer.close()


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate (punctuation ignored): edit distance / reference length."""
    from telephony.asr import character_errors

    errors, length = character_errors(reference, hypothesis)
    return errors / max(1, length)


def summarise(results: list[CallResult]) -> dict:
    ok = [r for r in results if r.latency_s is not None]
    lat = [r.latency_s for r in ok]
    out = {
        "calls": len(results), "answered": len(ok),
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "max_s": max(lat) if lat else float("nan"),
    }
    for stage in ("end_of_turn_s", "asr_s", "dialogue_s", "tts_s"):
        out[stage] = statistics.median([getattr(r, stage) for r in ok]) if ok else float("nan")
    out["early"] = sum(r.early for r in ok)
    gaps = [g for r in ok for g in (r.gaps or [])]
    out["gaps"] = gaps
    out["gap_p95_s"] = percentile(gaps, 95) if gaps else 0.0
    with_text = [r for r in results if r.expected]
    if with_text:
        out["cer"] = statistics.mean(cer(r.expected, r.text) for r in with_text)
    return out
