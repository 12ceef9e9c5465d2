"""Call recording: both legs of a call as 8 kHz 16-bit mono WAV files, written as the call goes.

``caller.wav`` holds what the caller sent (every 20 ms frame as received) and ``outbound.wav`` what
the caller heard (bot prompts, replies, hold music and the agent's voice, silence in between), one
frame per 20 ms tick of the RTP sender, so the two files line up in time within a few frames.
Writes are buffered (about a second) and a failing disk never breaks the call: recording stops and
the error is logged.
"""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np

from .audio import FRAME_BYTES, SAMPLE_RATE

log = logging.getLogger("telephony.recording")

FLUSH_BYTES = 50 * FRAME_BYTES  # about one second of audio
_SILENCE = bytes(FRAME_BYTES)
LAG_FRAMES = 5  # caller frames may arrive up to 100 ms late before the caller leg is padded


class _Leg:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._wav: wave.Wave_write | None = wave.open(str(path), "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._buffer = bytearray()
        self.frames = 0

    def write(self, pcm: bytes) -> None:
        # frames is the leg's timeline, counted also once writing stopped (a full disk): the other leg
        # is aligned to it, and the padding loop in CallRecorder.outbound_frame waits on it
        self.frames += 1
        if self._wav is None:
            return
        self._buffer += pcm
        if len(self._buffer) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._wav is None or not self._buffer:
            return
        try:
            self._wav.writeframes(bytes(self._buffer))
        except OSError:
            log.exception("recording %s: write failed, recording of this leg stopped", self.path.name)
            self._wav = None
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._wav is not None:
            try:
                self._wav.close()
            except OSError:
                log.exception("recording %s: close failed", self.path)
            self._wav = None


class CallRecorder:
    """Records one call into ``directory`` (created): ``caller.wav`` and ``outbound.wav``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.caller = _Leg(self.directory / "caller.wav")
        self.outbound = _Leg(self.directory / "outbound.wav")
        self.closed = False

    @property
    def paths(self) -> dict[str, str]:
        return {"caller": str(self.caller.path), "outbound": str(self.outbound.path)}

    def caller_frame(self, frame: bytes) -> None:
        if not self.closed:
            self.caller.write(frame)

    def outbound_frame(self, frame: np.ndarray | None) -> None:
        """The media sender's tap: one call per 20 ms tick, None while silent.

        The ticks are the recording's clock: when the caller's RTP stops (silence suppression,
        hold) the caller leg is padded with silence, so the two legs stay aligned (within
        ``LAG_FRAMES`` of jitter)."""
        if self.closed:
            return
        self.outbound.write(_SILENCE if frame is None else frame.astype("<i2").tobytes())
        while self.caller.frames < self.outbound.frames - LAG_FRAMES:
            self.caller.write(_SILENCE)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.caller.close()
            self.outbound.close()
