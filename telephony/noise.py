"""A bad telephone line, made on purpose: noise at a chosen SNR and lost packets (tests and benchmarks).

* ``white``, ``pink``, ``hum`` (50 Hz mains and its harmonics), ``babble`` (other voices: several
  Mandarin fixtures overlaid at random offsets) — 8 kHz float noise of unit RMS;
* ``mix_at_snr(speech, noise, snr_db)`` scales the noise against the speech's *active* level (the
  frames above -40 dB of its peak), as SNR is quoted for speech;
* ``lose_packets(samples, rate)`` zeroes whole 20 ms packets at random, as a receiver without
  concealment plays a lost RTP packet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .audio import FRAME_SAMPLES, SAMPLE_RATE

NOISE_KINDS = ("white", "pink", "hum", "babble")


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - float(np.mean(x))
    return x / max(1e-12, float(np.sqrt(np.mean(x**2))))


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.standard_normal(n))


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise: white noise shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return _unit(np.fft.irfft(spectrum, n))


def hum(n: int, rng: np.random.Generator, mains_hz: float = 50.0) -> np.ndarray:
    """Mains hum: 50 Hz with odd harmonics falling off, a little jitter in phase, as a ground loop gives."""
    t = np.arange(n) / SAMPLE_RATE
    x = np.zeros(n)
    for k, amp in ((1, 1.0), (3, 0.5), (5, 0.3), (7, 0.2), (9, 0.1)):
        x += amp * np.sin(2 * np.pi * mains_hz * k * t + rng.uniform(0, 2 * np.pi))
    return _unit(x + 0.01 * rng.standard_normal(n))


def babble(n: int, rng: np.random.Generator, voices: Sequence[np.ndarray], talkers: int = 4) -> np.ndarray:
    """Several other people talking at once (a waiting room, a street): ``voices`` overlaid at random offsets."""
    x = np.zeros(n)
    for _ in range(talkers):
        v = voices[int(rng.integers(len(voices)))].astype(np.float64)
        reps = np.tile(v, n // max(1, v.size) + 2)
        start = int(rng.integers(v.size))
        x += _unit(reps[start:start + n])
    return _unit(x)


def noise(kind: str, n: int, *, seed: int = 0, voices: Sequence[np.ndarray] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "white":
        return white(n, rng)
    if kind == "pink":
        return pink(n, rng)
    if kind == "hum":
        return hum(n, rng)
    if kind == "babble":
        if not voices:
            raise ValueError("babble needs voices to overlay")
        return babble(n, rng, voices)
    raise ValueError(f"unknown noise {kind!r}; known: {', '.join(NOISE_KINDS)}")


def active_rms(speech: np.ndarray) -> float:
    """RMS of the speech's active 20 ms frames (those within 40 dB of the loudest)."""
    x = speech.astype(np.float64)
    n = x.size // FRAME_SAMPLES
    if n == 0:
        return float(np.sqrt(np.mean(x**2))) if x.size else 0.0
    frames = np.sqrt(np.mean(x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES) ** 2, axis=1))
    active = frames[frames > frames.max() * 0.01]
    return float(np.sqrt(np.mean(active**2)))


def mix_at_snr(speech: np.ndarray, noise_signal: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech`` (int16) plus ``noise_signal`` (any level, at least as long) at ``snr_db``, as int16."""
    level = active_rms(speech) / (10 ** (snr_db / 20))
    mixed = speech.astype(np.float64) + _unit(noise_signal[: speech.size]) * level
    return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)


def lose_packets(samples: np.ndarray, rate: float, *, seed: int = 0) -> np.ndarray:
    """``samples`` with each 20 ms packet zeroed with probability ``rate`` (no concealment)."""
    out = samples.copy()
    rng = np.random.default_rng(seed)
    n = out.size // FRAME_SAMPLES
    for i in np.flatnonzero(rng.random(n) < rate):
        out[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES] = 0
    return out


class BadLine:
    """A caller's side of a bad line, for a live call (``telephony.testing.RtpCaller(line=...)``):
    noise of ``kind`` under everything the caller sends, pauses included, at ``snr_db`` below
    ``speech_rms`` (the active level of the caller's speech, ``active_rms``), and each 20 ms RTP packet
    lost with probability ``loss`` (never sent: the receiver sees a gap in the sequence numbers).
    Seeded, so a test hears the same line every run.
    """

    def __init__(self, *, kind: str | None = None, snr_db: float = 10.0, loss: float = 0.0,
                 speech_rms: float = 3000.0, seed: int = 0, seconds: float = 30.0) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"packet loss {loss} outside [0, 1)")
        self.loss = loss
        level = speech_rms / (10 ** (snr_db / 20))
        self._noise = noise(kind, int(seconds * SAMPLE_RATE), seed=seed) * level if kind else None
        self._pos = 0
        self._rng = np.random.default_rng(seed + 1)
        self.sent = self.lost = 0

    def packet(self, samples: np.ndarray) -> np.ndarray | None:
        """One packet's samples as the line delivers them, or None when the packet is lost."""
        self.sent += 1
        if self._noise is not None:
            n = samples.size
            idx = (self._pos + np.arange(n)) % self._noise.size
            self._pos = (self._pos + n) % self._noise.size
            samples = np.clip(np.round(samples.astype(np.float64) + self._noise[idx]), -32768, 32767).astype(np.int16)
        if self.loss and self._rng.random() < self.loss:
            self.lost += 1
            return None
        return samples
