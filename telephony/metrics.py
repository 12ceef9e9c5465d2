"""The hotline's Prometheus instruments: speech recognition and synthesis time, RTP loss and jitter per
call, and the caller's wait for an answer.

``telephony/`` never imports the hub: whoever runs the hotline builds ``VoiceMetrics(registry)`` in the
registry it exposes (the hub's own, per app) and hands it to ``VoiceBot``; the bot passes it on to its
``PromptCache`` (the survey caller's own cache gets it too). Without one (unit tests, ``python -m
telephony``) nothing is measured.

No label grows with calls: engines are a handful, a call is one observation in a histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
    from .media_stream import MediaStats

T = TypeVar("T")

# a turn's decode: 0.1-0.5 s for Whisper's speech window, seconds when the pool is busy or the turn long
ASR_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
# one clause or prompt: Kokoro renders at about half real time, espeak in tens of milliseconds
TTS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5)
# end of the caller's speech -> first audio of the answer (target 1.5 s; issue 15, 20)
TURN_BUCKETS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15)
LOSS_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)
JITTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)


def engine_of(component: Any) -> str:
    """A recogniser's or synthesizer's engine label: its ``engine_name``, else its class name without
    ``Recognizer``/``Synthesizer`` (WhisperRecognizer -> ``whisper``)."""
    name = getattr(component, "engine_name", None)
    if isinstance(name, str) and name:
        return name
    cls = type(component).__name__
    for suffix in ("Recognizer", "Synthesizer"):
        cls = cls.removesuffix(suffix)
    return cls.lower() or "unknown"


class VoiceMetrics:
    """Registered in ``registry`` (names are ``xiaozhi_*``, like the hub's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.asr_seconds = Histogram(
            "xiaozhi_asr_duration_seconds",
            "Speech recognition of one turn or piece of a turn, waiting for a free recogniser worker included",
            ["engine"], buckets=ASR_BUCKETS, registry=registry)
        self.asr_failures = Counter(
            "xiaozhi_asr_failures", "Recognitions that raised (error) or did not answer in time (timeout)",
            ["engine", "reason"], registry=registry)
        self.tts_seconds = Histogram(
            "xiaozhi_tts_duration_seconds",
            "Speech synthesis of one text the cache did not hold (a clause live, a prompt, a pre-rendered answer)",
            ["engine"], buckets=TTS_BUCKETS, registry=registry)
        self.tts_failures = Counter("xiaozhi_tts_failures", "Syntheses that raised", ["engine"], registry=registry)
        self.tts_fallbacks = Counter(
            "xiaozhi_tts_fallbacks", "Clauses the configured voice failed on, spoken by espeak-ng instead",
            ["engine"], registry=registry)
        self.turn_seconds = Histogram(
            "xiaozhi_phone_turn_latency_seconds",
            "Phone: end of the caller's speech to the first audio of the answer queued for sending",
            buckets=TURN_BUCKETS, registry=registry)
        self.rtp_loss = Histogram(
            "xiaozhi_rtp_loss_ratio", "Per ended call: share of the caller's audio packets lost (0..1)",
            buckets=LOSS_BUCKETS, registry=registry)
        self.rtp_jitter = Histogram(
            "xiaozhi_rtp_jitter_seconds",
            "Per ended call: the caller's RTP interarrival jitter (RFC 3550), its highest value in the call",
            buckets=JITTER_BUCKETS, registry=registry)

    def start_engine(self, engine: str) -> None:
        """The recogniser's series, at 0 until it is used (rate() and dashboards see 0, not "no data")."""
        self.asr_seconds.labels(engine)
        for reason in ("error", "timeout"):
            self.asr_failures.labels(engine, reason)

    def timed_asr(self, engine: str, decode: Callable[..., T]) -> Callable[..., T]:
        """``decode`` (run in a worker thread) timing itself into the ASR histogram, failures counted."""
        return _timed(decode, self.asr_seconds.labels(engine), self.asr_failures.labels(engine, "error"))

    def timed_tts(self, synthesizer: Any) -> Callable[[str], bytes]:
        """``synthesizer.synthesize`` timing itself, failures counted, and the clauses a neural voice hands to
        espeak-ng counted through its ``on_fallback`` hook (its series exist from here on, at 0)."""
        engine = engine_of(synthesizer)
        fallbacks = self.tts_fallbacks.labels(engine)  # (espeak-ng itself has none: its series stays 0)
        if hasattr(synthesizer, "on_fallback"):
            synthesizer.on_fallback = fallbacks.inc
        return _timed(synthesizer.synthesize, self.tts_seconds.labels(engine), self.tts_failures.labels(engine))

    def call_ended(self, stats: MediaStats) -> None:
        """One call's RTP figures, once, when it ends (calls that received no audio are skipped)."""
        expected = stats.audio_received + stats.lost
        if expected:
            self.rtp_loss.observe(stats.lost / expected)
            self.rtp_jitter.observe(stats.max_jitter_s)


def _timed(fn: Callable[..., T], histogram: Any, failures: Any) -> Callable[..., T]:
    def run(*args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception:
            failures.inc()
            raise
        histogram.observe(time.perf_counter() - started)
        return result

    return run
