"""The voice bot: a ``CallHandler`` that runs one call's speech pipeline and phone behaviour.

Stages per call (each is its own small object, tested alone):

    RTP frames -> EnergyVad -> TurnDetector -> Recognizer (thread) -> DialogueBackend.reply
               -> spoken text -> Synthesizer (TTS thread) -> call.play (paced RTP)

What the dialogue *is* stays outside ``telephony/``: a ``DialogueBackend`` (the hub's phone glue,
``xiaozhi.hub.channels.phone.hotline``) creates the conversation, answers turns and queues escalations.

Phone behaviour: greeting (with the recording notice when recording), barge-in (caller speech of
``barge_in_ms`` during playback stops it; a shorter burst, or a turn recognised as a backchannel
such as 嗯/好/对, does not interrupt — an interrupted reply is resumed), silence -> re-prompt, three
silences -> goodbye and hang up, two recognition failures -> keypad menu, 0 -> agent at any time
(unless typing a number), digit collection ending with #, hold prompt looped until an agent is
bridged, bridged mode (caller audio to the agent, agent audio to the caller, no ASR).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from yibao_common.places import find_place

from .asr import PUNCTUATION, Recognizer
from .audio import FRAME_BYTES, to_int16
from .call import Call
from .handler import CallHandler
from .metrics import VoiceMetrics, engine_of
from .recording import CallRecorder
from .segments import Segmenter, TurnTranscriber, supports as supports_segments
from .tts import PromptCache, Synthesizer, speak_clauses, split_clauses
from .vad import EchoGuard, TurnDetector, make_vad

log = logging.getLogger("telephony.voice")

BACKCHANNELS = frozenset({"嗯", "嗯嗯", "好", "好的", "对", "对对", "是", "是的", "哦", "噢", "啊", "行", "可以", "明白", "知道了"})
_SILENT_FRAME = bytes(FRAME_BYTES)


def is_backchannel(text: str) -> bool:
    """A short acknowledgement (嗯、好、对…) rather than a question."""
    bare = PUNCTUATION.sub("", text)
    return bool(bare) and (bare in BACKCHANNELS or (len(bare) <= 3 and set(bare) <= {"嗯", "好", "对", "是", "哦", "啊"}))


# Whisper-base hears 转人工 ("zhuan ren gong") on the phone as 再员工 / 再研工 / 专人工 / 证人工...:
# the one request that must never be lost, so a sound-alike of it is rewritten before the dialogue
# sees it. A turn that *ends* in 人工 asks for a person too (我要人工, 有没有人工); 人工 inside a
# turn is left alone (人工关节, 人工晶体 are reimbursement questions).
_ZHUAN = "转专砖赚再在找证正制借寨"  # what 转 became on 8 kHz lines
_AGENT_SOUNDALIKE = re.compile(rf"[{_ZHUAN}]\s*[人仁任员研元园言]\s*[工公功攻]")
_ENDS_IN_AGENT = re.compile(rf"[{_ZHUAN}]?人工(?=[\s\W_]*$)")


# A turn whose words end the way questions end can be answered at the first pause (early_asr_ms)
# instead of after the full end-of-turn silence: the remaining wait was most of the answer time.
_QUESTION_END = re.compile(
    r"(吗|呢|嘛|[?？]|(?:怎么|怎样|如何)[\u4e00-\u9fff]{1,4}|(?:哪里|在哪|去哪)[\u4e00-\u9fff]{0,3}|什么[\u4e00-\u9fff]{0,2}|多少[\u4e00-\u9fff]?|"
    r"哪儿|哪个|几天|几个月|多久|多长时间|(?:是不是|能不能|可不可以|有没有|要不要|会不会)[\u4e00-\u9fff]{1,4}|"
    r"行不行|对不对|转人工)[\s\W_]*$")
SHORT_ANSWER_CHARS = 6  # 是的 / 不用了 / 一 / 杭州: what a caller says when the bot just asked something
# ...and only those: a yes or no, a number, or a place. The first words of a new question ("医保电子评…",
# after a breath) are short too, and must wait for the rest.
_SHORT_ANSWER = re.compile(
    r"^(?:(?:是|对|好|嗯|行|要|需要|可以|没错|不|不是|不对|不要|不用|不需要|没有|没|算了|谢谢|知道了|明白了)"
    r"(?:的|啊|呀|吧|了|哦|嗯|呢)*|[0-9一二三四五六七八九十零两幺]+(?:号|个|位)?)$")


def _joined(first: str, rest: str) -> str:
    """Two parts of what a caller said, as one text."""
    return first + ("" if first[-1:] in "。？！?!，,；;" else "，") + rest


def is_complete_turn(text: str, *, expecting_answer: bool = False) -> bool:
    """Whether an early transcript already says all the caller meant: a question that ends like one
    (…吗/…呢/怎么办/多少/哪里…, 转人工 also as Whisper mishears it: 医保再研工), or, when the bot has
    just asked something, a short answer."""
    bare = PUNCTUATION.sub("", text)
    if not bare:
        return False
    if _QUESTION_END.search(correct_agent_request(text.strip())):
        return True
    return expecting_answer and len(bare) <= SHORT_ANSWER_CHARS and (
        bool(_SHORT_ANSWER.match(bare)) or find_place(bare) is not None)


def correct_agent_request(text: str) -> str:
    """转人工 restored from its usual mishearings (再员工, 专人工, 医保证人工, 我要人工...)."""
    return _ENDS_IN_AGENT.sub("转人工", _AGENT_SOUNDALIKE.sub("转人工", text))


@dataclass
class BotTurn:
    """The backend's answer to one caller turn."""

    spoken: str  # what to say, already in spoken form
    escalated: bool = False  # the caller is now in the agent queue: play the hold prompt after this
    hang_up: bool = False
    # the bot asked "您是想问…，对吗？": keys 1 (yes) and 2 (no) answer at once, not as a typed number
    confirming: bool = False


class DialogueBackend(Protocol):
    async def call_started(self, call: Call) -> None: ...
    # confidence: the recogniser's (0..1) for speech, None for keys; a backend may check what it heard
    async def reply(self, call: Call, text: str, *, source: str, confidence: float | None = None) -> BotTurn: ...
    async def escalate(self, call: Call, reason: str) -> None: ...
    async def note(self, call: Call, text: str) -> None: ...  # keep words said while no bot turn is possible
    async def call_ended(self, call: Call, reason: str) -> None: ...


class RecognitionTimeout(RuntimeError):
    """The recogniser did not answer within ``VoiceConfig.asr_timeout_s``; handled like a crash."""


@dataclass
class VoiceConfig:
    """Behaviour of the phone line. ``elderly()`` gives the 适老化 variant (more patience)."""

    end_silence_ms: int = 600  # silence that ends a caller turn
    # Recognition starts after this much silence, while the turn may still go on (0: off): when the
    # caller has in fact finished, the transcript is (nearly) ready at end of turn. Skipped while
    # every recogniser worker is busy, so under load no CPU goes to guesses. 100 ms, not 300: a
    # Whisper-base decode of a 2-3 s question takes 0.25-0.45 s here, so a guess started at 300 ms came
    # back after the 600 ms hangover had ended the turn and never answered early (0 of 24 calls).
    early_asr_ms: int = 100
    # End the turn once the early transcript is a complete question (or the short answer the bot asked
    # for): ``is_complete_turn``, and the caller has been silent for early_answer_ms (at least
    # early_asr_ms); a guess back sooner waits for that. Otherwise the turn waits for end_silence_ms.
    early_answer: bool = True
    early_answer_ms: int = 250
    # A caller who starts talking again within this long of a turn ended early (a story whose clause
    # happened to end like a question, "…要输密码吗？ 我试了好几次…") was not done: the two are answered
    # as one turn, and the reply to the first half is cut off (both halves stay in the transcript).
    continuation_s: float = 1.0
    # voiced speech during playback that stops it (echo of the bot's voice excluded). Silero needs one or
    # two 32 ms windows to rise: 140 ms of voicing is decided 200 ms (p50; p95 275) after the caller starts,
    # 20 ms sooner than 160 ms, and echo alone (0 to -20 dB, 20-250 ms late) never gets there
    # (bench/barge_in.py); a 120 ms click the energy VAD takes for speech stays short of it
    barge_in_ms: int = 140
    vad: str = "silero"  # per-frame speech decision: "silero" (neural, noise-robust) or "energy"
    min_turn_ms: int = 160  # shorter voiced bursts (clicks, coughs) are not turns
    backchannel_max_ms: int = 700  # a turn this short that is recognised as 嗯/好/对 is a backchannel
    no_input_s: float = 8.0  # silence after the bot finished speaking before a re-prompt
    max_silences: int = 3
    max_failures: int = 2  # recognition failures before the keypad menu
    # A recogniser that has not answered after this long counts as crashed: the caller goes to the
    # keypad menu (0 still reaches an agent) instead of waiting in silence. 0: no limit.
    asr_timeout_s: float = 10.0
    inter_digit_s: float = 5.0  # a number typed without # is taken after this pause
    # Past this the turn ends at the caller's next pause (300 ms) instead of the full hangover: a story of
    # 8-25 s is one turn, and a caller who goes on and on is never cut mid-sentence.
    max_turn_s: float = 30.0
    hard_max_turn_s: float = 45.0  # a turn is cut here whatever it holds
    # Long turns are recognised in pieces while the caller talks (telephony/segments.py): a segment is
    # cut at a short gap once it holds segment_target_s, at its longest gap at segment_max_s, and at
    # the 300 ms pause once it holds segment_min_s. False: the whole turn is decoded at its end.
    segments: bool = True
    segment_target_s: float = 5.0
    segment_max_s: float = 8.0
    segment_min_s: float = 2.0
    hold_gap_s: float = 1.5  # silence between hold-prompt repeats
    hold_max_s: float = 600.0  # then apologise and hang up (the escalation stays queued)
    recording_dir: Path | None = None  # None: no recording
    menu_options: dict[str, str] = field(default_factory=dict)  # key -> question text

    @classmethod
    def elderly(cls, **overrides: Any) -> VoiceConfig:
        values: dict[str, Any] = {"end_silence_ms": 1100, "early_asr_ms": 600, "early_answer_ms": 600, "no_input_s": 12.0,
                                  "inter_digit_s": 8.0, "max_turn_s": 35.0}
        values.update(overrides)
        return cls(**values)


@dataclass
class TurnTiming:
    """Where the time of one turn went (seconds); ``speech_end`` is loop time of the last voiced frame."""

    speech_end: float
    end_of_turn_s: float = 0.0
    asr_s: float = 0.0
    dialogue_s: float = 0.0
    tts_s: float = 0.0
    early: bool = False  # the transcript came from recognition started at a pause (early_asr_ms)
    text: str = ""
    # per join between two clauses of the reply: the silence the caller heard because the next clause
    # was not rendered yet (seconds, 0 when it was ready; the planned pauses are not counted)
    gaps: list[float] = field(default_factory=list)


class CallSession:
    """Everything the bot knows about one call."""

    def __init__(self, call: Call, config: VoiceConfig) -> None:
        self.call = call
        self.vad = make_vad(config.vad)
        self.echo = EchoGuard()  # the bot's voice echoed back by the line never barges in
        self.echo_frames = 0  # voiced frames during playback judged to be echo
        self._frame_no = 0
        self._echo = False
        # (a pause as long as the end silence never fires: the end comes first)
        self.turns = TurnDetector(end_silence_ms=config.end_silence_ms, max_turn_s=config.max_turn_s,
                                  pause_ms=config.early_asr_ms, hard_max_turn_s=config.hard_max_turn_s)
        # the turn being recognised in pieces: where to cut, and the decodes of the pieces cut so far
        self.segmenter: Segmenter | None = None
        self.transcriber: TurnTranscriber | None = None
        self.mode = "bot"  # bot, menu, hold, bridged, ending
        self.silences = 0
        self.failures = 0
        self.digits: list[str] | None = None  # a number being typed
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.timer: asyncio.Task | None = None  # no-input or inter-digit timer
        self.hold_task: asyncio.Task | None = None
        self.busy = False  # a turn is being recognised/answered
        # the reply being spoken: its clauses' (Playback, samples) queued so far, the clauses not yet
        # queued, and the task rendering them (cancelled by barge-in)
        self.speaking: list[tuple[Any, np.ndarray]] = []
        self.unsaid: list[str] = []
        self.speech: asyncio.Task | None = None
        # what barge-in cut off: the rest of the audio queued, and the clauses not yet rendered
        # (resumed after a backchannel)
        self.interrupted: tuple[np.ndarray, list[str]] | None = None
        self.barged = False
        self.turn_during_playback = False
        self.recorder: CallRecorder | None = None
        self.agent_sink: Callable[[bytes], None] | None = None
        self.timings: list[TurnTiming] = []
        self.last_frame_at = 0.0
        self.tasks: set[asyncio.Task] = set()
        self.barge_ins = 0
        self.backchannels = 0
        self.early: tuple[Any, asyncio.Future] | None = None  # (pause event, its recognition) from a pause
        self.early_used = self.early_wasted = 0
        self.early_answers = 0  # turns ended at the pause because their words were a complete question
        self.early_end: tuple[float, str] | None = None  # (when, what was heard) of the last turn ended early
        self.continues: str | None = None  # the turn going on carries on that one (``continuation_s``)
        self.continuations = 0
        self.expects_answer = False  # the bot's last reply asked the caller something
        self.confirming = False  # ... and it was "您是想问…，对吗？" (keys 1/2 answer it)


class VoiceBot(CallHandler):
    def __init__(self, backend: DialogueBackend, recognizer: Recognizer, synthesizer: Synthesizer,
                 prompts: PromptCache, config: VoiceConfig | None = None, *,
                 metrics: VoiceMetrics | None = None) -> None:
        self.backend = backend
        self.recognizer = recognizer
        # recognition time, turn latency and each call's RTP loss/jitter (telephony.metrics; None: not measured)
        self.metrics = metrics
        self._asr_engine = engine_of(recognizer)
        if metrics is not None:
            metrics.start_engine(self._asr_engine)
        self.synthesizer = synthesizer
        self.prompts = prompts
        self.config = config or VoiceConfig()
        self.sessions: dict[str, CallSession] = {}
        self.decoding = 0  # recognitions in flight, all calls
        make_vad(self.config.vad)  # loads the shared VAD model now, not on the event loop at the first call

    # -- hooks -----------------------------------------------------------------------------------
    async def on_call_started(self, call: Call) -> None:
        session = CallSession(call, self.config)
        self.sessions[call.call_id] = session
        if self.config.recording_dir is not None:
            stamp = time.strftime("%Y%m%d", time.gmtime())
            safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", call.call_id)[:80]
            try:
                session.recorder = CallRecorder(self.config.recording_dir / stamp / safe_id)
            except OSError:
                log.exception("call %s: cannot record (recording directory)", call.call_id[:8])
            else:
                call.metadata["recording"] = session.recorder.paths
        recorder = session.recorder

        def sent(frame: np.ndarray | None) -> None:  # the RTP sender's tap, every 20 ms
            session.echo.sent(frame)
            if recorder is not None:
                recorder.outbound_frame(frame)

        call.media.on_sent = sent
        self._spawn(session, self._work(session))
        session.last_frame_at = asyncio.get_running_loop().time()
        self._spawn(session, self._watch_gaps(session))
        try:
            await self.backend.call_started(call)
        except Exception:
            log.exception("call %s: the dialogue backend could not start the call", call.call_id[:8])
            await self._say_prompt(session, "technical_error", listen=False)
            session.mode = "ending"
            self._hang_up_after_playback(session)
            return
        self._say_prompt_nowait(session, "greeting" if session.recorder else "greeting_no_recording")

    async def on_audio(self, call: Call, frame: bytes) -> None:
        session = self.sessions.get(call.call_id)
        if session is None:
            return
        if session.recorder is not None:
            session.recorder.caller_frame(frame)
        if session.mode == "bridged":
            if session.agent_sink is not None:
                session.agent_sink(frame)
            return
        if session.mode in ("hold", "ending"):
            return
        session.last_frame_at = asyncio.get_running_loop().time()
        session.echo.received(frame)
        speech = session.vad.is_speech(frame)
        if speech and (call.is_playing or session.turn_during_playback):
            # the bot is talking: is this the caller, or the bot's own voice echoed back? (checked every
            # other frame: a correlation costs ~0.3 ms)
            session._frame_no += 1
            if session._frame_no % 2:
                session._echo = session.echo.is_echo()
            if session._echo:
                session.echo_frames += 1
                speech = False
        self._process_frame(session, frame, speech)

    def _process_frame(self, session: CallSession, frame: bytes, speech: bool) -> None:
        call = session.call
        event = session.turns.feed(frame, speech)
        if event is not None and event.kind == "start":
            self._cancel_timer(session)
            session.turn_during_playback = call.is_playing
            session.barged = False
            ended, session.early_end, session.continues = session.early_end, None, None
            if ended is not None and asyncio.get_running_loop().time() - ended[0] <= self.config.continuation_s:
                session.continues = ended[1]
            self._start_segments(session)
        elif session.segmenter is not None and session.turns.in_turn and self._recognising(session):
            cut = session.segmenter.feed(session.turns.frames, speech)
            if cut is not None:
                session.transcriber.cut(session.turns.audio_until(cut))
        if (session.turns.in_turn and call.is_playing and not session.barged
                and session.turns.voiced_ms >= self.config.barge_in_ms):
            self._barge_in(session)
        if event is not None and event.kind == "pause":
            self._recognise_early(session, event)
        if event is not None and event.kind == "end":
            # the last voiced frame arrived event.silent_ms ago (the hangover, a shorter pause past
            # max_turn_s, or none when the turn was cut at its hard limit)
            now = asyncio.get_running_loop().time()
            self._turn_ended(session, event, now - event.silent_ms / 1000)

    def _recognising(self, session: CallSession) -> bool:
        """Whether the turn going on is one to recognise (not a backchannel under the bot's voice)."""
        return session.mode in ("bot", "menu") and not (session.turn_during_playback and not session.barged)

    def _start_segments(self, session: CallSession) -> None:
        session.segmenter = session.transcriber = None
        if self.config.segments and supports_segments(self.recognizer):
            c = self.config
            session.segmenter = Segmenter(target_s=c.segment_target_s, max_s=c.segment_max_s, min_s=c.segment_min_s)
            session.transcriber = TurnTranscriber(self._transcribe, self.recognizer.postprocess,
                                                  lambda coro: self._spawn(session, coro))

    def _turn_ended(self, session: CallSession, event: Any, speech_end: float) -> None:
        # a guess made at this turn's pause travels with it (the next turn's pause may come
        # before the worker takes this one), and so do the decodes of its pieces
        early, session.early = session.early, None
        transcriber, session.transcriber, session.segmenter = session.transcriber, None, None
        continues, session.continues = session.continues, None
        if session.turn_during_playback and not session.barged:
            session.backchannels += 1  # too short to interrupt (嗯、好): the reply just goes on
            if transcriber is not None:
                transcriber.cancel()
            self._after_ignored_turn(session)
            return
        if event.voiced_ms < self.config.min_turn_ms:  # a click or a cough
            if transcriber is not None:
                transcriber.cancel()
            self._after_ignored_turn(session)
            return
        session.queue.put_nowait(("speech", (event, speech_end, early, transcriber, continues)))

    def _recognise_early(self, session: CallSession, event: Any) -> None:
        """Start recognising the turn so far at a pause, when it would be a real turn and nothing else
        is being decoded; ``_speech_turn`` uses the result if the turn ends without more speech."""
        if session.early is not None:  # speech after an earlier pause made that guess stale
            session.early = None
            session.early_wasted += 1
        if not self._recognising(session) or event.voiced_ms < self.config.min_turn_ms:
            return
        transcriber = session.transcriber
        if transcriber is not None and session.segmenter.wants_cut_at(len(event.audio) // FRAME_BYTES):
            # the pause ends a piece of the turn: its decode is needed whether or not the caller goes on,
            # so it is queued even when every worker is busy; the turn's transcript then needs nothing more
            session.segmenter.cut_at(len(event.audio) // FRAME_BYTES)
            transcriber.cut(event.audio)
            task = transcriber.transcript(event.audio)
        elif self.decoding >= getattr(self.recognizer, "workers", 1):
            return
        elif transcriber is not None:
            task = transcriber.transcript(event.audio)  # the short rest after the last piece, as a guess
        else:
            task = self._spawn(session, self._transcribe(event.audio))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a stale guess's error is not news
        session.early = (event, task)
        if self.config.early_answer:
            task.add_done_callback(lambda t: self._early_transcript(session, event, t))

    def _early_transcript(self, session: CallSession, pause: Any, task: asyncio.Task) -> None:
        """The guess made at a pause is back: if the caller has said nothing since and the words are a
        complete question (or the short answer the bot asked for), the turn ends once the caller has been
        silent for ``early_answer_ms`` (now, or when that is reached) instead of after the full
        end-of-turn silence. Otherwise nothing changes: the turn ends as before, or goes on (speech after
        the pause drops the guess: a new pause makes a new one, and the turn's end decodes it all)."""
        if (task.cancelled() or task.exception() is not None or session.early is None or session.early[1] is not task
                or not session.turns.in_turn or session.turns.voiced_ms != pause.voiced_ms
                or session.mode not in ("bot", "menu")):
            return
        if not is_complete_turn(task.result().text, expecting_answer=session.expects_answer or session.mode == "menu"):
            return
        wait_ms = max(self.config.early_answer_ms, self.config.early_asr_ms) - session.turns.silent_ms
        if wait_ms > 0:  # back before the caller has been quiet long enough to tell a breath from the end
            asyncio.get_running_loop().call_later(max(wait_ms, 20) / 1000, self._early_transcript, session, pause, task)
            return
        silent_s = session.turns.silent_ms / 1000
        event = session.turns.finish()
        if event is None:
            return
        if pause.same_speech(event):
            session.early_answers += 1
        now = asyncio.get_running_loop().time()
        said = task.result().text.strip()
        session.early_end = (now, _joined(session.continues, said) if session.continues else said)
        self._turn_ended(session, event, now - silent_s)

    async def _transcribe(self, audio: bytes, previous: str | None = None):
        """The recogniser's transcript (of a piece of a turn, decoded after ``previous``, when that is
        given: ``transcribe_segment``); raises ``RecognitionTimeout`` after ``asr_timeout_s``.

        A thread cannot be stopped: a hung decode keeps its worker (and counts in ``decoding``, so
        no early guesses pile onto it) until it returns, but the call no longer waits for it.
        """
        self.decoding += 1
        fn = self.recognizer.transcribe if previous is None else self.recognizer.transcribe_segment
        if self.metrics is not None:
            fn = self.metrics.timed_asr(self._asr_engine, fn)
        decode = asyncio.ensure_future(asyncio.to_thread(fn, audio) if previous is None
                                       else asyncio.to_thread(fn, audio, previous))

        def finished(fut: asyncio.Future) -> None:
            self.decoding -= 1
            if not fut.cancelled():
                fut.exception()  # retrieved: an abandoned decode's error is not news

        decode.add_done_callback(finished)
        timeout = self.config.asr_timeout_s or None
        try:
            return await asyncio.wait_for(asyncio.shield(decode), timeout)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.asr_failures.labels(self._asr_engine, "timeout").inc()
            raise RecognitionTimeout(f"no transcript after {timeout:g} s") from None

    async def _watch_gaps(self, session: CallSession) -> None:
        """A caller's phone may stop sending RTP when they stop talking (silence suppression, or a
        caller that just pauses its stream): time without frames counts as silence, so the turn ends."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            gap = loop.time() - session.last_frame_at
            if session.turns.in_turn and session.mode in ("bot", "menu") and gap >= 0.1:
                for _ in range(int(gap / 0.02)):
                    self._process_frame(session, _SILENT_FRAME, False)
                    if not session.turns.in_turn:
                        break
                session.last_frame_at = loop.time()

    async def on_dtmf(self, call: Call, digit: str) -> None:
        session = self.sessions.get(call.call_id)
        if session is None or session.mode in ("bridged", "hold", "ending"):
            return
        self._cancel_timer(session)
        if session.digits is not None:  # typing a number
            if digit == "#":
                await self._submit_digits(session)
            elif digit == "*":
                session.digits = None
                self._arm_no_input(session)
            elif digit.isdigit():
                session.digits.append(digit)
                self._arm_timer(session, self.config.inter_digit_s, self._submit_digits)
            return
        if digit == "0":  # at once, not behind a turn still being recognised or answered
            self._stop_speaking(session)
            self._spawn(session, self._to_agent(session, "keypad"))
            return
        if session.confirming and digit in "12" and session.mode == "bot":
            self._stop_speaking(session)  # "对吗？" answered with a key: 1 yes, 2 no, at once
            session.confirming = False
            session.queue.put_nowait(("keypad", digit))
            return
        if session.mode == "menu":
            if digit in self.config.menu_options:
                self._stop_speaking(session)
                session.mode = "bot"
                session.queue.put_nowait(("keypad", self.config.menu_options[digit]))
                return
        if digit.isdigit():
            self._stop_speaking(session)
            session.digits = [digit]
            self._arm_timer(session, self.config.inter_digit_s, self._submit_digits)
        elif digit == "*":
            self._stop_speaking(session)
            self._say_prompt_nowait(session, "menu")
            session.mode = "menu"

    def _spawn(self, session: CallSession, coro: Any) -> asyncio.Task:
        """A task of this call: cancelled when the call ends, so nothing of it outlives the call."""
        task = asyncio.get_running_loop().create_task(coro, name=f"voice-{session.call.call_id[:8]}")
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)
        return task

    async def close(self) -> None:
        """Stop every call's tasks that are still running (the hotline is shutting down): a call whose
        end the user agent reported while the hub was already cancelling its tasks must not outlive it."""
        tasks = [t for session in self.sessions.values() for t in session.tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    async def on_call_ended(self, call: Call, reason: Any) -> None:
        session = self.sessions.pop(call.call_id, None)
        if session is None:
            return
        session.mode = "ending"
        current = asyncio.current_task()
        tasks = [t for t in session.tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if session.recorder is not None:
            session.recorder.close()
        if self.metrics is not None:
            self.metrics.call_ended(call.media.stats)
        try:
            await self.backend.call_ended(call, str(getattr(reason, "value", reason)))
        except Exception:
            log.exception("call %s: ending the conversation failed", call.call_id[:8])

    # -- bridging (an agent takes the call) ------------------------------------------------------
    def bridge(self, call: Call, agent_sink: Callable[[bytes], None]) -> None:
        """An agent is connected: stop the hold prompt and any bot work; caller frames go to ``agent_sink``."""
        session = self.sessions.get(call.call_id)
        if session is None or session.mode == "ending":
            raise KeyError(call.call_id)
        session.mode = "bridged"
        session.agent_sink = agent_sink
        session.digits = None
        self._cancel_timer(session)
        if session.hold_task is not None:
            session.hold_task.cancel()
            session.hold_task = None
        session.turns.reset()
        self._stop_speaking(session)

    def unbridge(self, call: Call) -> None:
        """The agent left: the bot serves the caller again."""
        session = self.sessions.get(call.call_id)
        if session is None or session.mode != "bridged":
            return
        session.agent_sink = None
        session.mode = "bot"
        session.silences = session.failures = 0
        self._stop_speaking(session)
        self._say_prompt_nowait(session, "agent_left")

    # -- the per-call worker: one turn at a time ---------------------------------------------------
    async def _work(self, session: CallSession) -> None:
        while True:
            kind, value = await session.queue.get()
            if session.mode == "ending" and kind != "agent":
                continue
            session.busy = True
            try:
                if kind == "speech":
                    await self._speech_turn(session, *value)
                elif kind == "keypad" and session.mode in ("hold", "bridged"):
                    await self.backend.note(session.call, value)
                elif kind == "keypad":
                    await self._text_turn(session, value, source="keypad", timing=None)
                elif kind == "agent":
                    await self._to_agent(session, value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("call %s: turn failed", session.call.call_id[:8])
                await self._say_prompt(session, "technical_error")
            finally:
                session.busy = False

    async def _speech_turn(self, session: CallSession, event: Any, speech_end: float,
                           early: tuple[Any, asyncio.Future] | None = None,
                           transcriber: TurnTranscriber | None = None, continues: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        timing = TurnTiming(speech_end=speech_end, end_of_turn_s=loop.time() - speech_end)
        started = loop.time()
        try:
            if early is not None and early[0].same_speech(event):  # no speech since the pause
                timing.early = True
                session.early_used += 1
                transcript = await early[1]
            else:
                if early is not None:
                    session.early_wasted += 1
                transcript = await (transcriber.transcript(event.audio) if transcriber is not None
                                    else self._transcribe(event.audio))
        except Exception:
            # The recogniser failing must not drop the call: the caller carries on with the keypad
            # (and 0 still reaches an agent).
            log.exception("call %s: speech recognition failed; switching to the keypad menu", session.call.call_id[:8])
            if session.mode in ("bot", "menu"):
                session.mode = "menu"
                await self._say_prompt(session, "asr_unavailable", listen=False)
                await self._say_prompt(session, "menu")
            return
        timing.asr_s = loop.time() - started
        text = transcript.text.strip()
        if session.mode in ("bridged", "hold", "ending"):
            if text:  # said before the caller pressed 0: the agent sees it in the transcript
                await self.backend.note(session.call, correct_agent_request(text))
            return
        if text and is_backchannel(text) and event.voiced_ms <= self.config.backchannel_max_ms:
            session.backchannels += 1
            if session.interrupted is not None and not session.call.is_playing:
                rest, unsaid = session.interrupted  # "嗯" was not a question: go on talking
                self._speak(session, unsaid, first=rest)
            session.interrupted = None
            if not session.call.is_playing:
                self._arm_no_input(session)
            return
        session.interrupted = None
        if not text:
            session.failures += 1
            log.info("call %s: nothing recognised (%d/%d)", session.call.call_id[:8], session.failures,
                     self.config.max_failures)
            if session.failures >= self.config.max_failures:
                session.failures = 0
                session.mode = "menu"
                await self._say_prompt(session, "menu")
            else:
                await self._say_prompt(session, "not_heard")
            return
        session.failures = 0
        if continues:  # the caller went on after a turn that ended early: one question, answered once
            session.continuations += 1
            self._stop_speaking(session)  # the answer to its first half, if it is still playing
            text = _joined(continues, text)
            log.info("call %s: the caller went on after an early end of turn; answering both parts as one",
                     session.call.call_id[:8])
        await self._text_turn(session, correct_agent_request(text), source="speech", timing=timing,
                              confidence=transcript.confidence)

    async def _text_turn(self, session: CallSession, text: str, *, source: str, timing: TurnTiming | None,
                         confidence: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        session.silences = 0
        started = loop.time()
        turn = await self.backend.reply(session.call, text, source=source, confidence=confidence)
        if session.mode in ("bridged", "hold", "ending"):
            return  # the caller asked for an agent meanwhile (the reply is in the transcript)
        dialogue_s = loop.time() - started
        session.expects_answer = turn.spoken.rstrip().endswith(("？", "?"))
        session.confirming = turn.confirming
        if timing is not None:
            timing.dialogue_s, timing.text = dialogue_s, text
            session.timings.append(timing)
        first_audio = loop.create_future()
        speech = self._speak(session, split_clauses(turn.spoken) if turn.spoken else [], timing=timing,
                             first_audio=first_audio, listen=not (turn.escalated or turn.hang_up))
        started = loop.time()
        await asyncio.wait([first_audio, speech], return_when=asyncio.FIRST_COMPLETED)
        if timing is not None:
            timing.tts_s = loop.time() - started
            if self.metrics is not None and turn.spoken:  # (a reply with nothing to say is no answer)
                self.metrics.turn_seconds.observe(loop.time() - timing.speech_end)
        if turn.escalated:
            session.mode = "hold"
            session.hold_task = self._spawn(session, self._hold(session, after=speech))
        elif turn.hang_up:
            session.mode = "ending"
            self._hang_up_after_playback(session)

    def _speak(self, session: CallSession, clauses: list[str], *, first: np.ndarray | None = None,
               timing: TurnTiming | None = None, first_audio: asyncio.Future | None = None,
               listen: bool = True) -> asyncio.Task:
        """Say ``clauses`` (after ``first``, audio already rendered): a task of the call that renders them
        clause by clause (``speak_clauses``) and queues each as soon as it is ready, so the caller hears
        the first clause while the next renders. Barge-in cancels it (``_barge_in``); it returns the last
        clause's Playback (None if nothing was said)."""
        if session.speech is not None:
            session.speech.cancel()
        session.speaking = []
        session.unsaid = list(clauses)
        task = self._spawn(session, self._speech(session, first, timing, first_audio, listen))
        session.speech = task
        return task

    async def _speech(self, session: CallSession, first: np.ndarray | None, timing: TurnTiming | None,
                      first_audio: asyncio.Future | None, listen: bool) -> Any:
        loop = asyncio.get_running_loop()
        call = session.call
        last = None
        heard_until = 0.0  # loop time at which the audio queued so far will have been sent

        def queue(samples: np.ndarray) -> None:
            nonlocal last, heard_until
            now = loop.time()
            if last is None:
                call.stop_playback()  # nothing stale before the answer
                if first_audio is not None and not first_audio.done():
                    first_audio.set_result(None)
            elif timing is not None:  # silence the caller heard waiting for this clause (0: none)
                timing.gaps.append(now - heard_until if now > heard_until and not call.is_playing else 0.0)
            heard_until = max(now, heard_until) + samples.size / 8000
            last = call.play(samples)
            session.speaking.append((last, samples))

        try:
            if first is not None and first.size:
                queue(first)
            clauses = list(session.unsaid)
            async for index, samples in speak_clauses(self.synthesizer, clauses, self.prompts):
                session.unsaid = clauses[index + 1:]
                queue(samples)
        finally:
            if first_audio is not None and not first_audio.done():
                first_audio.set_result(None)  # nothing to say, or the render failed: the turn goes on
        if session.speech is asyncio.current_task():
            session.speech = None
        if listen and last is not None:
            await self._listen_after(session, last)
        elif listen:
            self._arm_no_input(session)
        return last
    async def _to_agent(self, session: CallSession, how: str) -> None:
        if session.mode in ("hold", "bridged", "ending"):
            return
        session.mode = "hold"
        session.digits = None
        self._cancel_timer(session)
        self._stop_speaking(session)
        try:
            await self.backend.escalate(session.call, "requested")
        except Exception:
            log.exception("call %s: escalation failed", session.call.call_id[:8])
            session.mode = "bot"
            await self._say_prompt(session, "transfer_failed")
            return
        log.info("call %s: caller asked for an agent (%s)", session.call.call_id[:8], how)
        session.hold_task = self._spawn(session, self._hold(session, after=None))

    async def _hold(self, session: CallSession, after: Any) -> None:
        """The hold message, looped, until an agent is bridged (or hold_max_s)."""
        loop = asyncio.get_running_loop()
        if after is not None:  # the reply's speech task: its last clause played out first
            last = await asyncio.gather(after, return_exceptions=True)
            if last and last[0] is not None and not isinstance(last[0], BaseException):
                await last[0].wait()
        hold = await self.prompts.get_async("hold")
        until = loop.time() + self.config.hold_max_s
        while session.mode == "hold" and loop.time() < until:
            await session.call.play(hold).wait()
            await asyncio.sleep(self.config.hold_gap_s)
        if session.mode == "hold":
            session.mode = "ending"
            await self._say_prompt(session, "hold_timeout", listen=False)
            session.call.hangup()

    # -- playing ----------------------------------------------------------------------------------
    def _play(self, session: CallSession, samples: np.ndarray, *, listen: bool = True) -> Any:
        """Play one piece of audio (a prompt) after what is queued, in place of the rest of a reply being rendered."""
        if session.speech is not None:
            session.speech.cancel()
            session.speech = None
        session.unsaid = []
        playback = session.call.play(samples)
        session.speaking = [(playback, samples)]
        if listen:
            self._spawn(session, self._listen_after(session, playback))
        return playback

    async def _listen_after(self, session: CallSession, playback: Any) -> None:
        await playback.wait()
        if session.mode in ("bot", "menu") and not session.call.is_playing and not session.turns.in_turn:
            self._arm_no_input(session)

    async def _say_prompt(self, session: CallSession, name: str, *, listen: bool = True) -> bool:
        pcm = await self.prompts.get_async(name)
        return await self._play(session, to_int16(pcm), listen=listen).wait()

    def _say_prompt_nowait(self, session: CallSession, name: str) -> None:
        self._spawn(session, self._say_prompt(session, name))

    def _hang_up_after_playback(self, session: CallSession) -> None:
        async def _bye() -> None:
            if session.speech is not None:  # the reply is still being rendered
                await asyncio.gather(session.speech, return_exceptions=True)
            while session.call.is_playing:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            session.call.hangup()

        self._spawn(session, _bye())

    def _stop_speaking(self, session: CallSession) -> None:
        """Silence from the next frame: queued audio dropped, the reply's remaining clauses not rendered."""
        if session.speech is not None:
            session.speech.cancel()
            session.speech = None
        session.speaking, session.unsaid = [], []
        session.call.stop_playback()

    def _barge_in(self, session: CallSession) -> None:
        session.barged = True
        session.barge_ins += 1
        rest = [samples[playback.position:] for playback, samples in session.speaking
                if not playback.done and playback.position < samples.size]
        if rest or session.unsaid:
            session.interrupted = (np.concatenate(rest) if rest else np.zeros(0, np.int16), list(session.unsaid))
        self._stop_speaking(session)  # no more clauses: the renders not started are dropped
        log.info("call %s: barge-in", session.call.call_id[:8])

    def _after_ignored_turn(self, session: CallSession) -> None:
        if not session.call.is_playing and not session.busy and session.queue.empty():
            self._arm_no_input(session)

    # -- timers -----------------------------------------------------------------------------------
    def _cancel_timer(self, session: CallSession) -> None:
        if session.timer is not None and session.timer is not asyncio.current_task():
            session.timer.cancel()
        session.timer = None

    def _arm_timer(self, session: CallSession, delay: float, action: Callable[[CallSession], Any]) -> None:
        self._cancel_timer(session)

        async def _fire() -> None:
            await asyncio.sleep(delay)
            session.timer = None
            await action(session)

        session.timer = self._spawn(session, _fire())

    def _arm_no_input(self, session: CallSession) -> None:
        if session.mode in ("bot", "menu") and session.digits is None:
            self._arm_timer(session, self.config.no_input_s, self._no_input)

    async def _no_input(self, session: CallSession) -> None:
        if session.busy or session.turns.in_turn or session.call.is_playing or session.mode not in ("bot", "menu"):
            return
        session.silences += 1
        log.info("call %s: no input (%d/%d)", session.call.call_id[:8], session.silences, self.config.max_silences)
        if session.silences >= self.config.max_silences:
            session.mode = "ending"
            await self._say_prompt(session, "goodbye_silence", listen=False)
            session.call.hangup()
            return
        await self._say_prompt(session, "menu" if session.mode == "menu" else "reprompt_silence")

    async def _submit_digits(self, session: CallSession) -> None:
        """The number typed so far goes to the dialogue (# pressed, or the inter-digit pause ran out)."""
        if session.digits:
            number, session.digits = "".join(session.digits), None
            session.queue.put_nowait(("keypad", number))
        else:
            session.digits = None
            self._arm_no_input(session)
