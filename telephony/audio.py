"""Audio helpers for the call path: 16-bit PCM at 8 kHz in and out, WAV loading, tones, resampling."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 160
FRAME_BYTES = FRAME_SAMPLES * 2  # 320


def to_int16(audio: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """PCM bytes (16-bit little-endian) or a numpy array (int16, or float in [-1, 1]) as int16."""
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind == "f":
            return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        return audio.astype(np.int16, copy=False).reshape(-1)
    return np.frombuffer(bytes(audio), dtype="<i2", count=len(audio) // 2)


def resample(samples: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling (windowed-sinc low-pass, then linear interpolation); int16 in and out."""
    if rate_in == rate_out or samples.size == 0:
        return samples.astype(np.int16, copy=False)
    x = samples.astype(np.float32)
    if rate_out < rate_in:
        cutoff = 0.5 * rate_out / rate_in * 0.9
        taps = 63
        n = np.arange(taps) - (taps - 1) / 2
        h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
        x = np.convolve(x, (h / h.sum()).astype(np.float32), mode="same")
    n_out = int(round(x.size * rate_out / rate_in))
    t = np.arange(n_out) * (rate_in / rate_out)
    y = np.interp(t, np.arange(x.size), x)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def load_wav(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file as int16 mono samples at 8 kHz (channels mixed down, rate converted)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        frames = w.readframes(w.getnframes())
        channels, rate = w.getnchannels(), w.getframerate()
    samples = np.frombuffer(frames, dtype="<i2")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return resample(samples, rate)


def tone(frequency: float, duration_s: float, *, amplitude: float = 0.3, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(duration_s * rate)) / rate
    ramp = np.minimum(1.0, np.minimum(t, t[::-1] if t.size else t) / 0.01)  # 10 ms fade in/out, no clicks
    return (np.sin(2 * np.pi * frequency * t) * amplitude * ramp * 32767).astype(np.int16)


def silence(duration_s: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(duration_s * rate), dtype=np.int16)


def rms(frame: bytes | np.ndarray) -> float:
    samples = to_int16(frame).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
