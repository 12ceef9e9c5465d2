"""Voice activity and end-of-turn detection on the caller's 20 ms frames (8 kHz, 16-bit mono).

Two small stages, each usable and testable alone:

* ``EnergyVad``: is this frame speech? Frame energy against an adaptive noise floor (minimum
  statistics), with the zero-crossing rate to reject hiss only slightly louder than the floor. No
  VAD library is installed here (webrtcvad/silero are not dependencies).
* ``TurnDetector``: turns the per-frame decisions into caller turns: a turn starts after a few
  voiced frames (with a little pre-roll so the first syllable is kept), and ends after
  ``end_silence_ms`` of silence (the "hangover"; longer for elderly callers) or at ``max_turn_s``.
  It reports how long the turn has been voiced, which the barge-in rule uses, and (with
  ``pause_ms``) a "pause" event part-way through the hangover carrying the turn so far, so that
  recognition can start before the turn is known to be over.
"""

from __future__ import annotations

import collections
import math
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
        if isinstance(frame, (bytes, bytearray, memoryview)):
            samples = np.frombuffer(frame[: len(frame) & ~1], dtype="<i2")
        else:
            samples = frame
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
    end with no speech in between carries exactly the same audio as that end."""

    kind: str  # "start", "pause" (silence of pause_ms inside a turn that may go on) or "end"
    audio: bytes = b""
    voiced_ms: int = 0
    duration_ms: int = 0
    truncated: bool = False  # ended by max_turn_s, not by silence


class TurnDetector:
    """Frames + VAD decisions in, turn start/end events out.

    Args:
        start_frames: voiced frames (within the last ``start_frames + 2``) that start a turn.
        end_silence_ms: silence after speech that ends the turn (700 ms; 1200 ms for 适老化).
        pre_roll_ms: audio kept from before the start decision.
        max_turn_s: a turn is cut here (a caller who never pauses, or a noisy line).
        pause_ms: silence after which a "pause" event is sent (0: never; at least 200 ms; only
            shorter than ``end_silence_ms`` makes sense).
    """

    TRAILING_KEEP_FRAMES = 10  # silence kept after the last voiced frame (200 ms)

    def __init__(self, *, start_frames: int = 3, end_silence_ms: int = 700, pre_roll_ms: int = 200,
                 max_turn_s: float = 15.0, pause_ms: int = 0) -> None:
        self.start_frames = start_frames
        self.end_silence_frames = max(1, end_silence_ms // FRAME_MS)
        # at least the kept trailing silence, so that a pause and its end cut the audio at the same frame
        self.pause_frames = max(self.TRAILING_KEEP_FRAMES, pause_ms // FRAME_MS) if pause_ms > 0 else 0
        self.max_frames = int(max_turn_s * 1000 // FRAME_MS)
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
        if self._silent_frames >= self.end_silence_frames or len(self._turn) >= self.max_frames:
            truncated = self._silent_frames < self.end_silence_frames
            event = TurnEvent("end", self._audio(), self.voiced_ms, len(self._turn) * FRAME_MS, truncated)
            self.reset()
            return event
        if self.pause_frames and self._silent_frames == self.pause_frames:
            return TurnEvent("pause", self._audio(), self.voiced_ms, len(self._turn) * FRAME_MS)
        return None

    def _audio(self) -> bytes:
        """The turn so far, without the silence beyond 200 ms: the recogniser does not need it."""
        keep = len(self._turn) - max(0, self._silent_frames - self.TRAILING_KEEP_FRAMES)
        return b"".join(self._turn[:keep])
