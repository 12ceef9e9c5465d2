"""Voice activity and end-of-turn detection on the caller's 20 ms frames (8 kHz, 16-bit mono).

Two small stages, each usable and testable alone:

* ``SileroVad`` (the default, ``make_vad``): is this frame speech? Silero VAD's ONNX model at 8 kHz
  on onnxruntime, per call state; it keeps finding speech in line noise where energy fails.
* ``EnergyVad``: the same question from frame energy against an adaptive noise floor (minimum
  statistics), with the zero-crossing rate to reject hiss; the fallback when Silero cannot load.
* ``EchoGuard``: is what the caller's line sends back just the echo of the bot's own voice? (Then
  it must not count as barge-in.)
* ``TurnDetector``: turns the per-frame decisions into caller turns: a turn starts after a few
  voiced frames (with a little pre-roll so the first syllable is kept), and ends after
  ``end_silence_ms`` of silence (the "hangover"; longer for elderly callers); past ``max_turn_s``
  at the next short pause, so a long story stays one turn and is never cut mid-sentence, and at
  ``hard_max_turn_s`` whatever it holds.
  It reports how long the turn has been voiced, which the barge-in rule uses, and (with
  ``pause_ms``) a "pause" event part-way through the hangover carrying the turn so far, so that
  recognition can start before the turn is known to be over.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from .audio import FRAME_MS


def frame_energy_db(samples: np.ndarray) -> float:
    """RMS level of int16 samples in dB (0 dB = RMS 1; full-scale sine ≈ 87 dB)."""
    if samples.size == 0:
        return 0.0
    power = float(np.mean(samples.astype(np.float64) ** 2))
    return 10.0 * math.log10(power + 1.0)


def zero_crossing_rate(samples: np.ndarray) -> float:
    """Fraction of adjacent sample pairs that change sign (voiced speech at 8 kHz: ~0.02-0.25)."""
    if samples.size < 2:
        return 0.0
    signs = np.signbit(samples)
    return float(np.count_nonzero(signs[1:] != signs[:-1])) / (samples.size - 1)


def frame_samples(frame: bytes | np.ndarray) -> np.ndarray:
    """A frame as int16 samples: 16-bit little-endian PCM bytes (an odd last byte dropped) or an array."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return np.frombuffer(frame[: len(frame) & ~1], dtype="<i2")
    return np.asarray(frame)


@dataclass
class EnergyVad:
    """Speech/non-speech per frame against an adaptive noise floor.

    The floor is a low percentile of the frame levels of the last ``window_s`` seconds (minimum
    statistics): speech has gaps between syllables, steady line noise has none, so the floor follows
    the noise up and down within a couple of seconds while speech hardly moves it.

    Args:
        margin_db: how far above the noise floor a frame must be to count as speech.
        min_level_db: absolute floor (≈ RMS 50); quieter frames are never speech.
        initial_floor_db: the floor assumed before enough frames were heard (a quiet line).
        hiss_zcr: frames with a crossing rate above this need ``hiss_extra_db`` more energy
            (fricatives are loud enough; broadband hiss near the floor is not).
        window_s / percentile: the floor's window and percentile.
    """

    margin_db: float = 10.0
    min_level_db: float = 34.0
    initial_floor_db: float = 30.0
    hiss_zcr: float = 0.45
    hiss_extra_db: float = 8.0
    window_s: float = 2.0
    percentile: float = 10.0
    noise_floor_db: float = field(init=False)

    def __post_init__(self) -> None:
        self.noise_floor_db = self.initial_floor_db
        self._levels: collections.deque[float] = collections.deque(maxlen=max(10, int(self.window_s * 50)))

    def is_speech(self, frame: bytes | np.ndarray) -> bool:
        samples = frame_samples(frame)
        if samples.size == 0:
            return False
        level = frame_energy_db(samples)
        self._levels.append(level)
        if len(self._levels) >= 25:  # half a second heard: trust the measured floor
            self.noise_floor_db = float(np.percentile(self._levels, self.percentile))
        threshold = max(self.min_level_db, self.noise_floor_db + self.margin_db)
        speech = level > threshold
        if speech and zero_crossing_rate(samples) > self.hiss_zcr and level < threshold + self.hiss_extra_db:
            speech = False
        return speech


@dataclass
class TurnEvent:
    """``kind`` is "start" (the caller began speaking), "pause" (``audio`` holds the turn so far; it
    may still go on) or "end" (the turn is complete, ``audio`` holds it). A pause followed by the
    end with no speech in between carries the same voiced frames as that end (``same_speech``): the
    same audio when the pause came after the kept trailing silence (200 ms), else that audio
    followed by less of the silence."""

    kind: str  # "start", "pause" (silence of pause_ms inside a turn that may go on) or "end"
    audio: bytes = b""
    voiced_ms: int = 0
    duration_ms: int = 0
    truncated: bool = False  # ended by the hard limit (hard_max_turn_s), not by silence
    silent_ms: int = 0  # silence after the last voiced frame when the end was decided

    def same_speech(self, other: TurnEvent) -> bool:
        """Whether ``other`` (a later event of the same turn) holds no speech after this one's: what
        was recognised from this event's audio is the whole of ``other``'s words."""
        return other.voiced_ms == self.voiced_ms and other.audio.startswith(self.audio)


class TurnDetector:
    """Frames + VAD decisions in, turn start/end events out.

    Args:
        start_frames: voiced frames (within the last ``start_frames + 2``) that start a turn.
        end_silence_ms: silence after speech that ends the turn (700 ms; 1200 ms for 适老化).
        pre_roll_ms: audio kept from before the start decision.
        max_turn_s: past this length the turn ends at the caller's next pause (``late_pause_ms`` of
            silence, or ``end_silence_ms`` if shorter) instead of the full hangover: a long story is
            not cut mid-sentence, and still kept as one turn.
        hard_max_turn_s: a turn is cut here whatever it holds (a caller who never pauses, or a noisy
            line): ``truncated``.
        pause_ms: silence after which a "pause" event is sent (0: never; only shorter than
            ``end_silence_ms`` makes sense). A pause before the kept trailing silence (200 ms) carries
            less silence than the end that may follow it, the same speech (``TurnEvent.same_speech``).
    """

    TRAILING_KEEP_FRAMES = 10  # silence kept after the last voiced frame (200 ms)

    def __init__(self, *, start_frames: int = 3, end_silence_ms: int = 700, pre_roll_ms: int = 200,
                 max_turn_s: float = 15.0, pause_ms: int = 0, hard_max_turn_s: float = 45.0,
                 late_pause_ms: int = 300) -> None:
        self.start_frames = start_frames
        self.end_silence_frames = max(1, end_silence_ms // FRAME_MS)
        self.pause_frames = max(1, pause_ms // FRAME_MS) if pause_ms > 0 else 0
        self.max_frames = int(max_turn_s * 1000 // FRAME_MS)
        self.hard_max_frames = max(self.max_frames, int(hard_max_turn_s * 1000 // FRAME_MS))
        self.late_pause_frames = min(self.end_silence_frames, max(1, late_pause_ms // FRAME_MS))
        self._recent: collections.deque[tuple[bytes, bool]] = collections.deque(
            maxlen=max(start_frames + 2, pre_roll_ms // FRAME_MS))
        self._turn: list[bytes] = []
        self.in_turn = False
        self.voiced_frames = 0  # in the current turn
        self.run_frames = 0  # consecutive voiced frames right now
        self._silent_frames = 0

    @property
    def voiced_ms(self) -> int:
        return self.voiced_frames * FRAME_MS

    @property
    def run_ms(self) -> int:
        return self.run_frames * FRAME_MS

    @property
    def frames(self) -> int:
        """Frames in the current turn so far (its pre-roll included)."""
        return len(self._turn)

    def audio_until(self, frames: int) -> bytes:
        """The current turn's first ``frames`` frames."""
        return b"".join(self._turn[:frames])

    def reset(self) -> None:
        self._recent.clear()
        self._turn = []
        self.in_turn = False
        self.voiced_frames = self.run_frames = self._silent_frames = 0

    def feed(self, frame: bytes, speech: bool) -> TurnEvent | None:
        self.run_frames = self.run_frames + 1 if speech else 0
        if not self.in_turn:
            self._recent.append((frame, speech))
            window = list(self._recent)[-(self.start_frames + 2):]
            if speech and sum(v for _, v in window) >= self.start_frames:
                self.in_turn = True
                self._turn = [f for f, _ in self._recent]
                self.voiced_frames = sum(v for _, v in self._recent)
                self._silent_frames = 0
                self._recent.clear()
                return TurnEvent("start", voiced_ms=self.voiced_ms)
            return None
        self._turn.append(frame)
        if speech:
            self.voiced_frames += 1
            self._silent_frames = 0
        else:
            self._silent_frames += 1
        long_turn = len(self._turn) >= self.max_frames
        if (self._silent_frames >= self.end_silence_frames or len(self._turn) >= self.hard_max_frames
                or (long_turn and self._silent_frames >= self.late_pause_frames)):
            truncated = self._silent_frames < (self.late_pause_frames if long_turn else self.end_silence_frames)
            event = TurnEvent("end", self._audio(), self.voiced_ms, len(self._turn) * FRAME_MS, truncated,
                              self.silent_ms)
            self.reset()
            return event
        if self.pause_frames and self._silent_frames == self.pause_frames:
            return TurnEvent("pause", self._audio(), self.voiced_ms, len(self._turn) * FRAME_MS)
        return None

    @property
    def silent_ms(self) -> int:
        """Silence since the last voiced frame of the current turn."""
        return self._silent_frames * FRAME_MS

    def finish(self) -> TurnEvent | None:
        """End the current turn now (its words say it is complete): the same audio its pause carried."""
        if not self.in_turn:
            return None
        event = TurnEvent("end", self._audio(), self.voiced_ms, len(self._turn) * FRAME_MS, silent_ms=self.silent_ms)
        self.reset()
        return event

    def _audio(self) -> bytes:
        """The turn so far, without the silence beyond 200 ms: the recogniser does not need it."""
        keep = len(self._turn) - max(0, self._silent_frames - self.TRAILING_KEEP_FRAMES)
        return b"".join(self._turn[:keep])


# --------------------------------------------------------------------------------------------
# Silero VAD (the default speech decision) and the echo guard for barge-in
# --------------------------------------------------------------------------------------------
SILERO_WINDOW = 256  # samples per Silero decision at 8 kHz (32 ms)
SILERO_CONTEXT = 32  # samples of the previous window the model sees before each window
_SILERO_SESSION = None
_SILERO_LOCK = threading.Lock()


class VadUnavailable(RuntimeError):
    """Silero's ONNX model or onnxruntime is missing (the message says how to install it)."""


def silero_model_path() -> str:
    """``silero_vad/data/silero_vad.onnx`` of the installed ``silero-vad`` wheel (6.x, MIT)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("silero_vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise VadUnavailable("Silero VAD's model is not installed: scripts/setup.sh installs silero-vad==6.2.3 "
                             "(--no-deps, requirements/models.lock.txt)")
    return str(path)


def _silero_session():
    """One ONNX session per process, shared by every call (onnxruntime sessions are thread-safe)."""
    global _SILERO_SESSION
    with _SILERO_LOCK:
        if _SILERO_SESSION is None:
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise VadUnavailable(f"onnxruntime is not installed ({e})") from None
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            _SILERO_SESSION = ort.InferenceSession(silero_model_path(), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        return _SILERO_SESSION


class SileroVad:
    """Speech per 20 ms frame from Silero VAD (a small neural model, ~0.1 ms per 32 ms window, 8 kHz,
    on onnxruntime without torch). Keeps the model's recurrent state per call: one object per call.

    The model decides on 32 ms windows; each 20 ms frame gets the latest window's probability, with
    hysteresis: speech starts above ``threshold`` and lasts until the probability falls below
    ``threshold - 0.15`` (Silero's own recommendation), so a syllable's soft end is not cut.
    Unlike an energy threshold it is not fooled by loud steady noise (measured recall at 10 dB SNR
    in bench/vad_noise.py and docs/telephony.md).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.session = _silero_session()
        self.threshold = threshold
        self.off_threshold = max(0.05, threshold - 0.15)
        self.probability = 0.0
        self.speaking = False
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(SILERO_CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._sr = np.array(8000, dtype=np.int64)
        self.probability = 0.0
        self.speaking = False
        self.samples_seen = 0  # where the 32 ms windows fall in the frames: samples_seen % SILERO_WINDOW

    def is_speech(self, frame: bytes | np.ndarray) -> bool:
        samples = frame_samples(frame)
        if samples.size == 0:
            return False
        self.samples_seen += samples.size
        self._pending = np.concatenate([self._pending, samples.astype(np.float32) / 32768.0])
        while self._pending.size >= SILERO_WINDOW:
            window, self._pending = self._pending[:SILERO_WINDOW], self._pending[SILERO_WINDOW:]
            x = np.concatenate([self._context, window])[None, :]
            out, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": self._sr})
            self._context = window[-SILERO_CONTEXT:]
            self.probability = float(np.asarray(out).reshape(-1)[0])
            if self.probability >= self.threshold:
                self.speaking = True
            elif self.probability < self.off_threshold:
                self.speaking = False
        return self.speaking


def make_vad(kind: str = "silero") -> SileroVad | EnergyVad:
    """A per-call VAD: ``silero`` (default; the energy VAD, logged, if its model cannot load) or ``energy``."""
    if kind == "energy":
        return EnergyVad()
    if kind != "silero":
        raise ValueError(f"unknown VAD {kind!r}; known: silero, energy")
    try:
        return SileroVad()
    except (VadUnavailable, OSError) as e:
        import logging

        logging.getLogger("telephony.vad").error("Silero VAD unavailable (%s); using the energy VAD", e)
        return EnergyVad()


class EchoGuard:
    """Tells the bot's own voice coming back down the line (handset or hybrid echo) from a caller
    talking over it, so that an echo never counts as barge-in.

    It keeps the last ``history_s`` of what was sent. For an incoming 20 ms frame it cross-correlates
    the last ``window_ms`` of caller audio with that history (FFT, lags up to ``history_s``): an echo
    is a delayed, attenuated copy of what was sent, so its normalised correlation at the echo delay
    is high (measured ≥ 0.8 through µ-law both ways); a caller's own voice over the echo pulls it
    down. Frames while nothing was sent recently are never echo.
    """

    def __init__(self, *, history_s: float = 0.4, window_ms: int = 120, min_correlation: float = 0.6) -> None:
        self.history = np.zeros(int(history_s * 8000), np.float32)
        self.window = int(window_ms * 8)
        self.recent = np.zeros(self.window, np.float32)
        self.min_correlation = min_correlation
        self.sent_frames = 0  # frames with sound among the last len(history)
        self._recent_loud: collections.deque[bool] = collections.deque(maxlen=max(1, self.history.size // 160))
        self.correlation = 0.0

    def sent(self, frame: np.ndarray | None) -> None:
        """The media sender's tap (20 ms, None while silent)."""
        samples = np.zeros(160, np.float32) if frame is None else np.asarray(frame, np.float32).reshape(-1)
        self.history = np.concatenate([self.history[samples.size:], samples])
        self._recent_loud.append(frame is not None and bool(np.any(samples)))

    def received(self, frame: bytes | np.ndarray) -> None:
        samples = frame_samples(frame).astype(np.float32)
        self.recent = np.concatenate([self.recent[samples.size:], samples])

    def is_echo(self) -> bool:
        """Whether the caller audio heard last is (mostly) the echo of what the bot sent."""
        self.correlation = 0.0
        if not any(self._recent_loud):
            return False
        x, h = self.recent, self.history
        ex = float(np.dot(x, x))
        if ex <= 0.0:
            return False
        n = 1 << int(np.ceil(np.log2(h.size + x.size)))
        corr = np.fft.irfft(np.fft.rfft(h, n) * np.conj(np.fft.rfft(x, n)), n)[: h.size - x.size + 1]
        # energy of each history segment the window is compared with
        c = np.concatenate([[0.0], np.cumsum(h.astype(np.float64) ** 2)])
        eh = c[x.size:] - c[: h.size - x.size + 1]
        norm = np.sqrt(np.maximum(eh, 1e-9) * ex)
        self.correlation = float(np.max(np.abs(corr) / norm))
        return self.correlation >= self.min_correlation
