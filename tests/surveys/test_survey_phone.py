"""智能回访 on the phone: the hub calls the resident back (outbound INVITE from the SIP user agent) and
takes a keypad answer; tested against sipp playing the resident's phone (UAS scenarios)."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import time
from pathlib import Path

import pytest

from telephony.handler import CallHandler
from telephony.outbound import CallFailed
from telephony.testing import SIPP, environment_has_sipp, free_udp_port
from telephony.user_agent import UserAgent, UserAgentConfig
from xiaozhi.hub.channels.phone.survey_calls import PhoneSurveyCaller
from xiaozhi.hub.domain.surveys import LOCAL_TZ, SurveyPolicy, SurveyService
from xiaozhi.hub.infra.store import Store
from xiaozhi.hub.migrations import prepare


def run_isolated(coro):
    """Run a coroutine on a fresh loop in its own thread: a session-wide Playwright (sync API) keeps
    an event loop running in the main thread once any browser test has run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


pytestmark = pytest.mark.skipif(not environment_has_sipp(), reason="sipp not installed: apt-get install sip-tester")
SCENARIOS = Path(__file__).parent.parent / "data" / "telephony"


def sipp_uas_command(scenario: str, port: int, timeout: float = 30.0) -> list[str]:
    """sipp answering one call on ``port`` with a scenario of tests/data/telephony/."""
    return [
        SIPP, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
        "-mi", "127.0.0.1", "-mp", str(free_udp_port(pair=True)), "-m", "1", "-nostdin",
        "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_err",
    ]


async def start_sipp_uas(scenario: str, cwd: Path, timeout: float = 30.0) -> tuple[asyncio.subprocess.Process, int]:
    port = free_udp_port()
    proc = await asyncio.create_subprocess_exec(
        *sipp_uas_command(scenario, port, timeout), cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    await asyncio.sleep(0.5)  # sipp binds its port
    return proc, port


async def finish(proc: asyncio.subprocess.Process, cwd: Path, timeout: float = 40.0) -> tuple[int, str]:
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    errors = "".join(p.read_text(errors="replace") for p in cwd.glob("*_errors.log"))
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")[-1500:] + errors


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 3, 3, 10, 0, tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def cache_dir(settings) -> Path:
    return settings.cache_dir / "tts-prompts"


def real_prompts(cache_dir: Path):
    """The real synthesiser (pyttsx3 + espeak-ng), cached like in production."""
    from telephony.tts import PromptCache, make_synthesizer

    cache = PromptCache(make_synthesizer("pyttsx3"), cache_dir, prompts={})

    async def prompt(text: str, name: str) -> bytes:
        return await asyncio.to_thread(cache.get_text, text, name=name)

    return prompt, cache


async def run_survey(tmp_path: Path, cache_dir: Path, scenario: str):
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    await prepare(store)
    ua = UserAgent(CallHandler(), UserAgentConfig(host="127.0.0.1", port=0, rtp_port_range=None, t1=0.2))
    await ua.start()
    proc, sipp_port = await start_sipp_uas(scenario, tmp_path)
    prompt, cache = real_prompts(cache_dir)

    async def user_agent():
        return ua

    caller = PhoneSurveyCaller(
        f"sip:survey-{{conversation_id}}@127.0.0.1:{sipp_port}",
        prompt,
        user_agent,
        answer_timeout_s=15,
        ring_timeout_s=10,
    )
    clock = Clock()
    policy = SurveyPolicy(delay_s=600, retry_s=1800, max_attempts=3, quiet=None)
    service = SurveyService(store, policy, phone_caller=caller, clock=clock)
    conv, _ = await store.create_conversation("phone", "330100", contact="138****5678", entry_point="12393")
    await service.schedule(conv, "phone_remote_hangup")
    clock.now += dt.timedelta(minutes=11)
    try:
        attempted = await service.run_due()
        code, output = await finish(proc, tmp_path)
        survey = await service.for_conversation(conv.id)
        return attempted, survey, code, output, ua
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ua.stop()
        await store.close()


def test_phone_survey_calls_plays_the_question_and_takes_the_key(tmp_path: Path, cache_dir: Path) -> None:
    attempted, survey, code, output, ua = run_isolated(run_survey(tmp_path, cache_dir, "uas_survey_dtmf.xml"))
    assert attempted == 1
    assert code == 0, output
    assert (survey.status, survey.rating, survey.answered_via, survey.attempts) == ("answered", 4, "keypad", 1)
    assert ua.calls == {}


def test_busy_line_is_a_failed_attempt_retried_later(tmp_path: Path, cache_dir: Path) -> None:
    attempted, survey, code, output, _ = run_isolated(run_survey(tmp_path, cache_dir, "uas_survey_busy.xml"))
    assert attempted == 1
    assert code == 0, output  # sipp received our ACK for its 486
    assert survey.status == "pending" and survey.attempts == 1 and "486" in survey.last_error
    assert survey.rating is None


def test_the_first_refusal_is_acked_at_once_not_after_its_retransmission() -> None:
    # RFC 3261 17.1.1.3: the client transaction ACKs every final non-2xx response, the first one too
    from telephony.sip_message import build_response, new_tag
    from telephony.testing import SipPeer

    async def scenario():
        ua = UserAgent(CallHandler(), UserAgentConfig(host="127.0.0.1", port=0, rtp_port_range=None))
        await ua.start()
        peer = SipPeer(ua.port)
        try:
            call = asyncio.create_task(ua.place_call(f"sip:survey-1@127.0.0.1:{peer.port}", CallHandler()))
            invite = await peer.expect("INVITE")
            peer.send(build_response(invite, 486, to_tag=new_tag()).to_bytes())
            ack = await peer.expect("ACK", timeout=ua.config.t1 / 2)  # before any retransmission could be due
            with pytest.raises(CallFailed) as err:
                await call
            return ack, err.value.status
        finally:
            peer.close()
            await ua.stop()

    ack, status = run_isolated(scenario())
    assert status == 486 and ack.cseq == (1, "ACK")


def test_no_response_from_the_trunk_times_out(tmp_path: Path) -> None:
    async def scenario():
        ua = UserAgent(CallHandler(), UserAgentConfig(host="127.0.0.1", port=0, rtp_port_range=None, t1=0.02))
        await ua.start()
        silent = free_udp_port()  # nothing listens there
        try:
            with pytest.raises(CallFailed) as err:
                await ua.place_call(f"sip:survey-1@127.0.0.1:{silent}", CallHandler())
            assert err.value.status == 408
            with pytest.raises(CallFailed) as bad:
                await ua.place_call("mailto:someone", CallHandler())
            assert bad.value.status == 400
            assert ua.calls == {}
        finally:
            await ua.stop()

    run_isolated(scenario())


def test_hub_calls_back_after_a_phone_conversation_closes(hub_settings, knowledge_base, tmp_path: Path) -> None:
    """End to end in the hub: a phone conversation closes -> the poller places the call -> key 4 stored."""
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    sipp_port = free_udp_port()
    cmd = sipp_uas_command("uas_survey_dtmf.xml", sipp_port, timeout=40)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    settings = hub_settings.model_copy(
        update={
            "survey_sip_uri": f"sip:survey-{{conversation_id}}@127.0.0.1:{sipp_port}",
            "survey_delay_s": 0.0,
            "survey_poll_interval_s": 0.2,
            "survey_quiet_hours": "",
        }
    )
    try:
        with TestClient(create_app(settings, knowledge_base=knowledge_base)) as client:
            app = client.app

            async def close_phone_conversation():
                conv, _ = await app.state.store.create_conversation("phone", "330100", contact="138****5678")
                await app.state.conversations.close(conv, "phone_remote_hangup")
                return conv.id

            conv_id = client.portal.call(close_phone_conversation)
            deadline = time.monotonic() + 45
            survey = None
            while time.monotonic() < deadline:
                survey = client.portal.call(app.state.surveys.for_conversation, conv_id)
                if survey.status in ("answered", "failed") or survey.attempts > 1:
                    break
                time.sleep(0.3)
            assert survey is not None and (survey.status, survey.rating, survey.answered_via) == (
                "answered",
                4,
                "keypad",
            ), (survey.status, survey.last_error)
            text = client.get("/metrics").text
            assert "xiaozhi_surveys_open" in text
            # the survey caller's own voice (no hotline here) is timed like the hotline's, by engine
            assert 'xiaozhi_tts_duration_seconds_count{engine="' in text
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")[-1500:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_survey_calls_speak_the_configured_voice_and_fall_back_to_espeak_like_the_hotline(
        settings, tmp_path: Path, caplog) -> None:
    """The survey question is built like the hotline's voice (issue 15): the configured Kokoro voice,
    and espeak-ng, logged, when it cannot load, never a call in silence (it used to build Kokoro
    with none of the voice settings and no fallback)."""
    import logging

    import numpy as np

    missing = tmp_path / "zf_missing.bin"  # a voice file an operator configured that is not there
    configured = settings.model_copy(update={"tts_voice": str(missing), "survey_sip_uri": "sip:survey@127.0.0.1:5999"})
    caller = PhoneSurveyCaller.from_settings(configured)
    caplog.set_level(logging.ERROR, logger="telephony.tts")
    pcm = run_isolated(caller.prompt("您对本次服务满意吗？请按1到5评分。", "survey_question"))
    samples = np.frombuffer(pcm, dtype="<i2")
    assert samples.size > 8000 and np.abs(samples).max() > 3000, "a question the resident hears"
    assert any("espeak" in r.getMessage() and "kokoro" in r.getMessage() for r in caplog.records), caplog.text
