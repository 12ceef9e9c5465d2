"""Long caller turns decoded in pieces (issue 20): a resident telling a 10-25 s story is recognised
segment by segment while still talking, so the recogniser never sees more than about 8 s at once and
the answer does not wait longer for a longer story.

* ``Segmenter`` decides where to cut, frame by frame: at the caller's own short pauses once a segment
  has ``target_s`` of audio, and at the longest pause seen if it reaches ``max_s`` (mid-speech only
  if there was none at all). The voice loop also cuts at its 300 ms pause (``cut_at``).
* ``TurnTranscriber`` decodes the cut segments one after another in the background, each with the
  text already recognised in this turn as its prompt, and joins them: ``transcript(audio)`` decodes
  only what came after the last cut (nothing when the turn ended at a cut) and runs the recogniser's
  domain-term correction on the joined text.

A recogniser takes part when it has ``transcribe_segment(pcm, previous)`` and ``postprocess(text)``
(``WhisperRecognizer``); any other one gets the whole turn at the end, as before (``supports``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from .asr import Transcript
from .audio import FRAME_BYTES, FRAME_MS

MIN_TAIL_BYTES = 2 * 8000 // 4  # under a quarter second after the last cut is no more speech to decode


def supports(recognizer: Any) -> bool:
    """Whether ``recognizer`` can decode a turn in pieces with the earlier text as prompt."""
    return callable(getattr(recognizer, "transcribe_segment", None)) and callable(getattr(recognizer, "postprocess", None))


class Segmenter:
    """Where to cut a turn: frame indexes counted from the turn's first frame (its pre-roll included).

    Args:
        target_s: a segment this long is cut at the next gap of ``gap_ms`` of non-speech.
        max_s: a segment that reaches this length is cut at once, in the middle of the longest gap
            after its first ``min_s`` (or here, mid-word, if the caller never paused).
        min_s: no segment is shorter than this (a cut at a pause too: see ``wants_cut_at``).
        gap_ms: the shortest non-speech run taken as a pause between words.
    """

    def __init__(self, *, target_s: float = 5.0, max_s: float = 8.0, min_s: float = 2.0, gap_ms: int = 100) -> None:
        if not 0 < min_s <= target_s <= max_s:
            raise ValueError(f"need 0 < min_s <= target_s <= max_s, got {min_s}, {target_s}, {max_s}")
        self.target = int(target_s * 1000 // FRAME_MS)
        self.max = int(max_s * 1000 // FRAME_MS)
        self.min = int(min_s * 1000 // FRAME_MS)
        self.gap = max(1, gap_ms // FRAME_MS)
        self.last_cut = 0
        self.cuts: list[int] = []
        self._gap_start: int | None = None  # index of the first frame of the non-speech run now going on
        self._gaps: list[tuple[int, int]] = []  # (length, middle) of the gaps after the last cut

    def feed(self, frames: int, speech: bool) -> int | None:
        """The turn has ``frames`` frames now, the last one speech or not; returns a cut index or None."""
        index = frames - 1
        if not speech:
            if self._gap_start is None:
                self._gap_start = index
            run = frames - self._gap_start
            if run >= self.gap and self._gap_start - self.last_cut >= self.target:
                # keep a little of the pause with the segment that ends, the rest begins the next
                return self._cut(self._gap_start + self.gap // 2 + 1)
        elif self._gap_start is not None:
            run = index - self._gap_start
            middle = self._gap_start + run // 2
            if run >= 2:
                self._gaps.append((run, middle))
            self._gap_start = None
        if frames - self.last_cut >= self.max:
            usable = [(run, middle) for run, middle in self._gaps if middle - self.last_cut >= self.min]
            return self._cut(max(usable)[1] if usable else frames)  # the longest gap, the latest of equals
        return None

    def wants_cut_at(self, frames: int) -> bool:
        """Whether a cut at ``frames`` (a pause the voice loop found) leaves a segment of at least ``min_s``."""
        return frames - self.last_cut >= self.min

    def cut_at(self, frames: int) -> None:
        """The voice loop cut at ``frames`` (its pause): later cuts count from there."""
        if frames > self.last_cut:
            self._cut(frames)

    def _cut(self, index: int) -> int:
        self.last_cut = index
        self.cuts.append(index)
        self._gaps = [(run, middle) for run, middle in self._gaps if middle > index]
        if self._gap_start is not None and self._gap_start < index:
            self._gap_start = index
        return index


Decode = Callable[[bytes, str], Awaitable[Transcript]]
Spawn = Callable[[Awaitable[Any]], "asyncio.Task[Any]"]


class TurnTranscriber:
    """The recognition of one turn, segment by segment.

    Args:
        decode: ``decode(pcm, previous)``: one segment's transcript (uncorrected), ``previous`` being
            the text recognised so far in this turn (the voice bot's recogniser call, with its timeout).
        postprocess: the correction run on the joined text.
        spawn: starts a task (the call's, so that it is cancelled with the call).
    """

    def __init__(self, decode: Decode, postprocess: Callable[[str], str], spawn: Spawn) -> None:
        self._decode = decode
        self._postprocess = postprocess
        self._spawn = spawn
        self._chain: asyncio.Task[list[Transcript]] | None = None
        self.cut_bytes = 0  # the audio before this has been handed to a segment's decode
        self.segments = 0  # cut so far (the last piece of the turn not counted)

    def cut(self, audio: bytes) -> None:
        """``audio`` is the turn up to a cut: the part after the previous cut is decoded now, after the
        segments before it (whose text is its prompt)."""
        audio = audio[: len(audio) // FRAME_BYTES * FRAME_BYTES]
        if len(audio) <= self.cut_bytes:
            return
        piece, self.cut_bytes = audio[self.cut_bytes:], len(audio)
        self.segments += 1
        self._chain = self._spawn(self._after(self._chain, piece))

    def transcript(self, audio: bytes) -> asyncio.Task[Transcript]:
        """The whole turn's transcript, ``audio`` being the turn (it starts with every cut segment):
        only its part after the last cut is still decoded."""
        tail = audio[self.cut_bytes:] if len(audio) >= self.cut_bytes else b""
        return self._spawn(self._joined(self._chain, tail))

    def cancel(self) -> None:
        """The turn is not a turn after all (a backchannel under the bot's voice, a click): stop decoding."""
        if self._chain is not None:
            self._chain.cancel()

    async def _after(self, previous: asyncio.Task[list[Transcript]] | None, piece: bytes) -> list[Transcript]:
        done = list(await previous) if previous is not None else []
        done.append(await self._decode(piece, "".join(t.text for t in done)))
        return done

    async def _joined(self, previous: asyncio.Task[list[Transcript]] | None, tail: bytes) -> Transcript:
        if len(tail) >= MIN_TAIL_BYTES or previous is None:
            done = await self._after(previous, tail)
        else:
            done = list(await previous)
        return join(done, self._postprocess)


def join(parts: list[Transcript], postprocess: Callable[[str], str]) -> Transcript:
    """One transcript from the segments': texts joined then corrected, confidence weighted by duration."""
    text = "".join(t.text for t in parts)
    weights = [(t.confidence, t.seconds) for t in parts if t.confidence is not None and t.seconds > 0]
    confidence = (float(np.average([c for c, _ in weights], weights=[s for _, s in weights]))
                  if weights else None)
    return Transcript(
        postprocess(text) if text else "",
        None if confidence is None else round(confidence, 3),
        sum(t.seconds for t in parts),
        "".join(t.raw_text for t in parts),
        sum(t.elapsed_s for t in parts),
    )
