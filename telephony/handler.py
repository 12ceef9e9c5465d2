"""The interface the voice pipeline plugs into (``CallHandler``), and a demo handler for tests and trials."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import load_wav, rms, silence, tone
from .call import Call
from .privacy import mask_number

log = logging.getLogger("telephony.handler")


class CallHandler:
    """Override the hooks you need; each is awaited in order, per call (one call never blocks another).

    Audio arrives as 20 ms frames of 16-bit little-endian mono PCM at 8 kHz (320 bytes). A hook
    that takes longer than real time makes the call drop its oldest frames, so long work (ASR,
    dialogue, TTS) belongs in tasks the handler owns.
    """

    async def on_call_started(self, call: Call) -> None:
        """The call is answered and confirmed; audio and DTMF follow."""

    async def on_audio(self, call: Call, frame: bytes) -> None:
        """One 20 ms frame from the caller."""

    async def on_dtmf(self, call: Call, digit: str) -> None:
        """A key the caller pressed: 0-9, *, #, A-D."""

    async def on_call_ended(self, call: Call, reason: str) -> None:
        """The call is over (``call.end_reason``); no more hooks will run for it."""


@dataclass
class CallRecord:
    """What the demo handler saw of one call."""

    caller: str
    dialled: str
    frames: int = 0
    voiced_frames: int = 0  # frames above the silence threshold
    peak_rms: float = 0.0
    digits: list[str] = field(default_factory=list)
    ended_reason: str | None = None


def greeting_prompt() -> np.ndarray:
    """Two rising tones, the stand-in for a recorded 您好 prompt."""
    return np.concatenate([tone(660, 0.25), silence(0.05), tone(880, 0.35), silence(0.1)])


class DemoHandler(CallHandler):
    """Plays a prompt, beeps once per key, hangs up on '#'; optionally echoes the caller's audio.

    Args:
        prompt: WAV file (any rate, 16-bit) or samples at 8 kHz; a two-tone greeting by default.
        echo: play back what the caller says (20 ms frames, as received).
        hangup_digit: the key that ends the call (None: never).
        silence_threshold: RMS above which a frame counts as voiced.
    """

    def __init__(self, prompt: str | Path | np.ndarray | None = None, *, echo: bool = False,
                 hangup_digit: str | None = "#", silence_threshold: float = 200.0) -> None:
        if prompt is None:
            self.prompt = greeting_prompt()
        elif isinstance(prompt, np.ndarray):
            self.prompt = prompt.astype(np.int16)
        else:
            self.prompt = load_wav(prompt)
        self.echo = echo
        self.hangup_digit = hangup_digit
        self.silence_threshold = silence_threshold
        self.records: dict[str, CallRecord] = {}

    async def on_call_started(self, call: Call) -> None:
        self.records[call.call_id] = CallRecord(call.caller, call.dialled)
        log.info("demo: call %s from %s to %s", call.call_id[:8], mask_number(call.caller), call.dialled)
        call.play(self.prompt)

    async def on_audio(self, call: Call, frame: bytes) -> None:
        record = self.records[call.call_id]
        record.frames += 1
        level = rms(frame)
        record.peak_rms = max(record.peak_rms, level)
        if level > self.silence_threshold:
            record.voiced_frames += 1
        if self.echo:
            call.play(frame)

    async def on_dtmf(self, call: Call, digit: str) -> None:
        self.records[call.call_id].digits.append(digit)
        log.info("demo: call %s pressed %s", call.call_id[:8], digit)
        if digit == self.hangup_digit:
            call.stop_playback()
            await call.play(tone(440, 0.3)).wait()
            call.hangup()
            return
        call.play(tone(500 + 40 * "0123456789*#ABCD".index(digit), 0.12))

    async def on_call_ended(self, call: Call, reason: str) -> None:
        record = self.records.get(call.call_id)
        if record is not None:
            record.ended_reason = str(getattr(reason, "value", reason))
        log.info("demo: call %s ended (%s)", call.call_id[:8], getattr(reason, "value", reason))
