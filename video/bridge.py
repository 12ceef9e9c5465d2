"""The phone bridge: a caller on the SIP line (8 kHz G.711) talks to an agent in the browser (WebRTC, 48 kHz Opus).

The phone side hands us an ``AgentAudioLeg`` (``app.state.phone.attach_agent(conversation_id)``):
``caller_frames`` is an asyncio queue of 20 ms frames of 8 kHz 16-bit mono PCM (320 bytes) from the
caller, ``send(pcm_8k)`` plays audio to the caller, ``close()`` detaches. A ``None`` in the queue, or a
leg whose ``closed`` attribute turns true, means the call has ended.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from typing import Protocol

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

PHONE_RATE = 8000
WEBRTC_RATE = 48000
FRAME_S = 0.020
PHONE_FRAME_SAMPLES = int(PHONE_RATE * FRAME_S)  # 160
PHONE_FRAME_BYTES = PHONE_FRAME_SAMPLES * 2  # 320
MAX_BACKLOG_FRAMES = 5  # more queued caller audio than 100 ms is dropped: latency beats completeness
# The agent's audio reaches the caller's 20 ms RTP clock through a playout buffer this deep: its frames
# arrive from WebRTC at the same 20 ms period but on another clock, with jitter, so sent as they come
# every arrival that slips past a tick leaves the caller a silent frame (measured on the sipp bridge
# test: frames arrived 8 ms before each tick, a phase any jitter or drift crosses). 60 ms of cushion,
# built when the agent starts talking and again after an underrun, absorbs that for 60 ms of latency.
PLAYOUT_FRAMES = 3


class AgentAudioLeg(Protocol):
    caller_frames: asyncio.Queue

    @property
    def playing(self) -> bool:
        """Audio sent with ``send`` is still waiting to reach the caller (false: the caller hears silence)."""
        ...

    def send(self, pcm_8k: bytes) -> None: ...

    def close(self) -> None: ...


def _frame_8k(pcm: bytes, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
    frame.planes[0].update(pcm)
    frame.sample_rate = PHONE_RATE
    frame.time_base = fractions.Fraction(1, PHONE_RATE)
    frame.pts = pts
    return frame


class CallerAudioTrack(MediaStreamTrack):
    """The caller's voice as a WebRTC audio track: 8 kHz frames resampled to 48 kHz, paced at 20 ms.

    When the phone side has nothing (packet loss, the caller's silence suppression) the track plays
    silence, so the agent's browser sees a steady stream; a backlog beyond 100 ms is dropped.
    """

    kind = "audio"

    def __init__(self, leg: AgentAudioLeg) -> None:
        super().__init__()
        self.leg = leg
        self.ended = asyncio.Event()  # the call is over (the session closes on it)
        self.frames_in = 0
        self.frames_dropped = 0
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=WEBRTC_RATE)
        self._start: float | None = None
        self._in_pts = 0
        self._out_pts = 0
        self._pending: list[av.AudioFrame] = []

    def _next_pcm(self) -> bytes:
        if getattr(self.leg, "closed", False):
            return self._call_ended()
        queue = self.leg.caller_frames
        while queue.qsize() > MAX_BACKLOG_FRAMES:
            if queue.get_nowait() is None:
                return self._call_ended()
            self.frames_dropped += 1
        try:
            pcm = queue.get_nowait()
        except asyncio.QueueEmpty:
            return bytes(PHONE_FRAME_BYTES)
        if pcm is None:
            return self._call_ended()
        self.frames_in += 1
        if len(pcm) != PHONE_FRAME_BYTES:  # tolerate odd frame sizes: pad or cut to 20 ms
            pcm = (pcm + bytes(PHONE_FRAME_BYTES))[:PHONE_FRAME_BYTES]
        return pcm

    def _call_ended(self) -> bytes:
        self.ended.set()
        return bytes(PHONE_FRAME_BYTES)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        while not self._pending:
            if self._start is None:
                self._start = time.monotonic()
            else:
                wait = self._start + self._in_pts / PHONE_RATE - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            if self.ended.is_set():
                self.stop()
                raise MediaStreamError
            frame = _frame_8k(self._next_pcm(), self._in_pts)
            self._in_pts += PHONE_FRAME_SAMPLES
            self._pending.extend(self._resampler.resample(frame))
        out = self._pending.pop(0)
        out.pts = self._out_pts
        out.time_base = fractions.Fraction(1, WEBRTC_RATE)
        self._out_pts += out.samples
        return out


class AgentToCaller:
    """Pumps the agent's WebRTC audio to the caller: any rate/layout -> 8 kHz mono, 20 ms frames -> ``leg.send``,
    through a playout buffer (``PLAYOUT_FRAMES``): the first frames of the agent's audio, and the first after
    the caller's side ran dry (``underruns``), are held until there are enough to ride out the jitter."""

    def __init__(self, track: MediaStreamTrack, leg: AgentAudioLeg) -> None:
        self.track = track
        self.leg = leg
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PHONE_RATE)
        self._buffer = bytearray()
        self._held: list[bytes] | None = []  # None: the cushion is built and frames pass straight through
        self.underruns = 0
        self.task = asyncio.create_task(self._run(), name="agent-to-caller")

    def feed(self, frame: av.AudioFrame) -> None:
        for out in self._resampler.resample(frame):
            self._buffer += bytes(out.planes[0])[: out.samples * 2]
        while len(self._buffer) >= PHONE_FRAME_BYTES:
            chunk = bytes(self._buffer[:PHONE_FRAME_BYTES])
            del self._buffer[:PHONE_FRAME_BYTES]
            self._play(chunk)

    def _play(self, chunk: bytes) -> None:
        if self._held is None:
            if getattr(self.leg, "playing", True):
                self.leg.send(chunk)
                return
            self.underruns += 1  # the caller heard a gap: build the cushion again
            self._held = []
        self._held.append(chunk)
        if len(self._held) >= PLAYOUT_FRAMES:
            self.flush()

    def flush(self) -> None:
        """Send whatever the playout buffer holds (the agent's track ended: nothing more will come)."""
        held, self._held = self._held or [], None
        for chunk in held:
            self.leg.send(chunk)

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                self.flush()
                return
            try:
                self.feed(frame)
            except Exception:  # the caller hung up under us: the session's close handles the rest
                log.exception("sending agent audio to the caller failed")
                return

    def stop(self) -> None:
        self.task.cancel()
        self.track.stop()  # a relay proxy: stopping it unsubscribes it
