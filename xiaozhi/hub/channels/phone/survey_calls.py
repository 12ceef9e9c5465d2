"""The phone side of 智能回访: call the resident back through the SIP user agent, ask the question
(synthesised once, cached by telephony.tts.PromptCache) and take a key 1–5.

The hub keeps only masked phone numbers, so the call goes to ``XIAOZHI_SURVEY_SIP_URI`` with the
conversation as reference (``sip:survey-{conversation_id}@trunk``): the trunk or PBX, which knows
the original caller, connects it. The survey id is also sent in an ``X-Xiaozhi-Survey`` header.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from telephony.call import Call
from telephony.handler import CallHandler
from telephony.user_agent import UserAgent
from xiaozhi.hub.domain.surveys import PHONE_NO_ANSWER, PHONE_QUESTION, PHONE_THANKS, Survey

log = logging.getLogger(__name__)


class SurveyCallHandler(CallHandler):
    """Plays the question when the call is up; the first key 1–5 is the answer (barge-in allowed)."""

    def __init__(self, question: bytes) -> None:
        self.question = question
        self.answer: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def on_call_started(self, call: Call) -> None:
        call.play(self.question)

    async def on_dtmf(self, call: Call, digit: str) -> None:
        if self.answer.done():
            return
        call.stop_playback()
        if digit in "12345":
            self.answer.set_result(int(digit))
        else:
            call.play(self.question)  # a wrong key: ask again

    async def on_call_ended(self, call: Call, reason: str) -> None:
        if not self.answer.done():
            self.answer.set_result(None)


class PhoneSurveyCaller:
    """``await caller(survey)`` -> the key pressed (1–5), or None; raises CallFailed when the call fails."""

    def __init__(
        self,
        uri_template: str,
        prompt: Callable[[str, str], Awaitable[bytes]],
        user_agent: Callable[[], Awaitable[UserAgent]],
        *,
        answer_timeout_s: float = 20.0,
        ring_timeout_s: float = 45.0,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not uri_template.startswith(("sip:", "sips:")):
            raise ValueError(f"survey SIP URI must start with sip: ({uri_template!r})")
        self.uri_template = uri_template
        self.prompt = prompt
        self.user_agent = user_agent
        self.answer_timeout_s = answer_timeout_s
        self.ring_timeout_s = ring_timeout_s
        self._close = close

    def uri_for(self, survey: Survey) -> str:
        return self.uri_template.replace("{conversation_id}", survey.conversation_id).replace(
            "{survey_id}", str(survey.id)
        )

    async def __call__(self, survey: Survey) -> int | None:
        question = await self.prompt(PHONE_QUESTION, "survey_question")
        ua = await self.user_agent()
        handler = SurveyCallHandler(question)
        call = await ua.place_call(  # the user agent's public interface for outbound calls
            self.uri_for(survey),
            handler,
            from_user="yibao-survey",
            ring_timeout_s=self.ring_timeout_s,
            extra_headers=[("x-xiaozhi-survey", str(survey.id))],
        )
        try:
            try:
                digit = await asyncio.wait_for(asyncio.shield(handler.answer), self.answer_timeout_s)
            except asyncio.TimeoutError:
                digit = None
            if not call.ended:
                closing = await self.prompt(
                    PHONE_THANKS if digit else PHONE_NO_ANSWER, "survey_thanks" if digit else "survey_no_answer"
                )
                playback = call.play(closing)
                try:
                    await asyncio.wait_for(playback.wait(), len(closing) / 16000 + 2)
                except asyncio.TimeoutError:
                    pass
            log.info("survey %s call: key %s", survey.id, digit if digit is not None else "none")
            return digit
        finally:
            call.hangup()
            try:
                await asyncio.wait_for(call.wait_ended(), 5)
            except asyncio.TimeoutError:
                log.warning("survey %s call did not end cleanly", survey.id)

    async def close(self) -> None:
        if self._close is not None:
            await self._close()

    @classmethod
    def from_settings(cls, settings, phone=None, voice_metrics=None) -> "PhoneSurveyCaller":
        """Prompts in the hotline's voice: its synthesiser and prompt cache when the hotline runs
        (``phone``, a PhoneService, once started), else the same configured voice built alike (``phone_voice``:
        espeak-ng, logged, when Kokoro cannot load) and cached in the same place. Calls go out from the
        hotline's SIP endpoint when it runs, else from one of its own."""
        from telephony.tts import PromptCache
        from telephony.user_agent import UserAgent, UserAgentConfig
        from xiaozhi.hub.channels.phone.hotline import phone_voice

        cache: dict[str, object] = {}

        async def prompt(text: str, name: str) -> bytes:
            bot = getattr(phone, "bot", None)
            prompts = bot.prompts if bot is not None else cache.get("prompts")
            if prompts is None:
                synth = await asyncio.to_thread(phone_voice, settings)
                prompts = cache["prompts"] = PromptCache(synth, settings.cache_dir / "tts", prompts={},
                                                         metrics=voice_metrics)
            return await asyncio.to_thread(prompts.get_text, text, name=name)  # type: ignore[attr-defined]

        async def user_agent():
            phone_ua = getattr(phone, "user_agent", None)
            if phone_ua is not None:
                return phone_ua
            if "ua" not in cache:
                ua = UserAgent(
                    CallHandler(),
                    UserAgentConfig(
                        host=settings.host,
                        port=0,
                        advertised_host=settings.sip_advertised_host,
                        rtp_port_range=settings.rtp_port_range,
                    ),
                )
                await ua.start()
                cache["ua"] = ua
            return cache["ua"]

        async def close() -> None:
            if "ua" in cache:
                await cache.pop("ua").stop()  # type: ignore[attr-defined]

        return cls(settings.survey_sip_uri, prompt, user_agent, close=close)
