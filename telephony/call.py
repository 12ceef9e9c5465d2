"""A phone call as the rest of the product sees it: who called which number, audio in and out, hang up.

Lifecycle: ``INCOMING`` (INVITE received) -> ``ANSWERED`` (200 OK sent) -> ``CONFIRMED`` (ACK
received: the handler's ``on_call_started`` runs and media events flow) -> ``ENDED``. A call can
end from any state; the handler hears ``on_call_ended`` only for calls it heard start.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .media_stream import MediaStream, Playback
from .privacy import mask_number

if TYPE_CHECKING:
    from .handler import CallHandler

log = logging.getLogger("telephony.call")

EVENT_QUEUE_FRAMES = 100  # 2 s of audio: a handler further behind than this loses the oldest frames


class CallState(enum.Enum):
    INCOMING = "incoming"
    ANSWERED = "answered"
    CONFIRMED = "confirmed"
    ENDED = "ended"


class EndReason(str, enum.Enum):
    REMOTE_HANGUP = "remote_hangup"
    LOCAL_HANGUP = "local_hangup"
    CANCELLED = "cancelled"
    ACK_TIMEOUT = "ack_timeout"
    RTP_TIMEOUT = "rtp_timeout"
    SHUTDOWN = "shutdown"
    REJECTED = "rejected"


class CallEvents:
    """Where a media stream delivers audio frames and keys: nowhere until its call exists, then to the call.

    The RTP socket is opened before the call (its port goes into the SDP); the user agent sets
    ``call`` once the dialog is made, for incoming and outgoing calls alike."""

    def __init__(self) -> None:
        self.call: Call | None = None

    def audio(self, frame: bytes) -> None:
        if self.call is not None:
            self.call._push_audio(frame)

    def dtmf(self, digit: str) -> None:
        if self.call is not None:
            self.call._push_dtmf(digit)


class Call:
    """One call. Created by the user agent; handlers use ``play``, ``stop_playback`` and ``hangup``."""

    def __init__(self, *, call_id: str, caller: str, caller_display: str, dialled: str, local_tag: str,
                 remote_tag: str, media: MediaStream, codec: str,
                 on_hangup: Callable[["Call", EndReason], None]) -> None:
        self.call_id = call_id
        self.caller = caller  # the caller's number (P-Asserted-Identity, else From user part)
        self.caller_display = caller_display
        self.dialled = dialled  # the number dialled (Request-URI user part, else To user part)
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.media = media
        self.codec = codec
        self.state = CallState.INCOMING
        self.end_reason: EndReason | None = None
        self.created_at = time.time()
        self.answered_at: float | None = None
        self.metadata: dict[str, Any] = {}  # free for handlers (region, session id, ...)
        self._on_hangup = on_hangup
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._ended = asyncio.get_running_loop().create_future()
        self.dropped_frames = 0

    def __repr__(self) -> str:
        return f"<Call {self.call_id[:8]} {mask_number(self.caller)}->{self.dialled} {self.state.value}>"

    # what handlers use -----------------------------------------------------------------------
    def play(self, audio: bytes | np.ndarray) -> Playback:
        """Queue 8 kHz 16-bit mono PCM (bytes or an int16/float array) after anything already playing."""
        return self.media.play(audio)

    def stop_playback(self) -> None:
        """Drop everything queued (barge-in): the caller hears silence from the next 20 ms frame."""
        self.media.stop_playback()

    @property
    def is_playing(self) -> bool:
        return self.media.is_playing

    def hangup(self) -> None:
        """End the call (BYE is sent in the background). Safe to call more than once."""
        if self.state is not CallState.ENDED:
            self._on_hangup(self, EndReason.LOCAL_HANGUP)

    async def wait_ended(self) -> EndReason:
        return await asyncio.shield(self._ended)

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    # what the user agent uses --------------------------------------------------------------
    def _push_audio(self, frame: bytes) -> None:
        if self._runner is None:
            return  # not confirmed yet
        if self._events.qsize() >= EVENT_QUEUE_FRAMES:
            self.dropped_frames += 1
            return
        self._events.put_nowait(("audio", frame))

    def _push_dtmf(self, digit: str) -> None:
        if self._runner is not None:
            self._events.put_nowait(("dtmf", digit))

    def _begin(self, handler: "CallHandler") -> None:
        if self._runner is None and self.state is not CallState.ENDED:
            self.state = CallState.CONFIRMED
            self._runner = asyncio.get_running_loop().create_task(self._run(handler), name=f"call-{self.call_id[:8]}")

    def _finish(self, reason: EndReason) -> None:
        if self.state is CallState.ENDED:
            return
        self.state = CallState.ENDED
        self.end_reason = reason
        if self._runner is not None:
            self._events.put_nowait(("end", reason))
        if not self._ended.done():
            self._ended.set_result(reason)

    async def _run(self, handler: "CallHandler") -> None:
        await self._call_hook(handler.on_call_started, self)
        while True:
            kind, value = await self._events.get()
            if kind == "audio":
                await self._call_hook(handler.on_audio, self, value)
            elif kind == "dtmf":
                await self._call_hook(handler.on_dtmf, self, value)
            else:
                await self._call_hook(handler.on_call_ended, self, value)
                return

    async def _call_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            await hook(*args)
        except asyncio.CancelledError:
            raise
        except Exception:  # a handler bug must not take the call (or the user agent) down
            log.exception("call %s: %s failed", self.call_id[:8], getattr(hook, "__name__", hook))

    async def _join(self, timeout: float = 5.0) -> None:
        """Wait for the handler to see the end of the call."""
        if self._runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._runner.cancel()
