"""Forwarding VP8 video and Opus audio without transcoding (SFU-style), by hooking into aiortc's
receiver and sender.

Written against **aiortc 1.16.0**. aiortc can *send* pre-encoded data (a sending track's ``recv()``
may return an ``av.Packet``: ``RTCRtpSender`` then calls ``encoder.pack(packet)``, which writes its
own VP8 payload descriptor), but it has no public API to *receive* encoded frames. This module is
the one place that reaches into aiortc's internals; ``check_aiortc()`` lists everything it touches
and ``tests/video/test_video.py`` fails loudly when an upgrade moves any of it:

- ``RTCRtpReceiver._RTCRtpReceiver__decoder_queue`` (a ``queue.Queue``): ``_handle_rtp_packet``
  depayloads RTP, reassembles a frame in its jitter buffer and puts ``(codec, JitterFrame)`` there
  (``.data`` bytes, ``.timestamp`` in 90 kHz starting at 0); the ``decoder_worker`` thread started by
  ``receive()`` reads it, and ``put(None)`` stops that thread (which ends the track). (Audio: the
  same, with 48 kHz timestamps and no keyframes to wait for.) We replace the
  queue with an ``EncodedTap`` in the peer connection's "track" handler, which fires inside
  ``setRemoteDescription`` — before ``receive()`` starts the decoder thread, which is then handed
  our object as its input queue.
- ``RTCRtpReceiver._send_rtcp_pli(media_ssrc)``, ``getSynchronizationSources()`` and
  ``_RTCRtpReceiver__rtx_ssrc``: asking the source for a keyframe.
- ``RTCRtpSender._handle_rtcp_packet``: wrapped per sender instance to see PLI/FIR from the remote
  receiver (aiortc sets a private force-keyframe flag there, which only affects frames it encodes
  itself, not pre-encoded packets).
- ``RTCRtpTransceiver._codecs``: the codecs negotiated for an m-line. The hub answers; the codecs
  are fixed inside ``setRemoteDescription`` before any public call could set preferences, so
  ``answer_vp8_only`` narrows the list afterwards (and also sets the public codec preferences for
  any later renegotiation).

If ``check_aiortc()`` fails at run time the hub logs it once and uses the decode/re-encode path for
everything (slower, still correct).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiortc
from aiortc import RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket

log = logging.getLogger(__name__)

AIORTC_VERSION = "1.16.0"  # the version these hooks were written and tested against
VP8 = "video/vp8"
OPUS = "audio/opus"
FORWARDABLE = (VP8, OPUS)  # codecs the hub forwards as they arrived (when both legs use them)
DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
RTX_SSRC = "_RTCRtpReceiver__rtx_ssrc"
PLI_MIN_INTERVAL_S = 0.3  # at most one keyframe request per source in this time
READER_MAX_QUEUE = 30  # encoded frames a slow reader may fall behind before it restarts at a keyframe


def check_aiortc() -> list[str]:
    """What this module needs from aiortc and cannot find (empty: all there)."""
    missing = []
    receiver_init = RTCRtpReceiver.__init__.__code__
    for name in (DECODER_QUEUE, DECODER_THREAD, RTX_SSRC):
        if name not in receiver_init.co_names:
            missing.append(f"RTCRtpReceiver.{name}")
    for cls, attr in ((RTCRtpReceiver, "_send_rtcp_pli"), (RTCRtpReceiver, "getSynchronizationSources"),
                      (RTCRtpReceiver, "_handle_rtp_packet"), (RTCRtpSender, "_handle_rtcp_packet")):
        if not callable(getattr(cls, attr, None)):
            missing.append(f"{cls.__name__}.{attr}")
    if "_codecs" not in RTCRtpTransceiver.__init__.__code__.co_names:
        missing.append("RTCRtpTransceiver._codecs")
    try:
        from aiortc.codecs.vpx import Vp8Encoder

        if not callable(getattr(Vp8Encoder, "pack", None)):
            missing.append("Vp8Encoder.pack")
    except ImportError:
        missing.append("aiortc.codecs.vpx.Vp8Encoder")
    return missing


_available: bool | None = None


def available() -> bool:
    """The hooks fit the installed aiortc (checked once; a mismatch is logged and disables passthrough)."""
    global _available
    if _available is None:
        missing = check_aiortc()
        _available = not missing
        if missing:
            log.warning("aiortc %s lacks %s (written for %s): video is decoded and re-encoded",
                        aiortc.__version__, ", ".join(missing), AIORTC_VERSION)
    return _available


def is_vp8_keyframe(data: bytes) -> bool:
    """VP8 frame tag (RFC 6386 9.1): bit 0 of the first byte is 0 for a key frame."""
    return bool(data) and not data[0] & 0x01


def vp8_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a VP8 key frame header (start code 9d 01 2a after the 3-byte tag)."""
    if not is_vp8_keyframe(data) or len(data) < 10 or data[3:6] != b"\x9d\x01\x2a":
        return None
    return int.from_bytes(data[6:8], "little") & 0x3FFF, int.from_bytes(data[8:10], "little") & 0x3FFF


@dataclass(slots=True)
class EncodedFrame:
    data: bytes
    timestamp: int  # source RTP clock (90 kHz video, 48 kHz Opus), mapped by aiortc to start at 0
    keyframe: bool
    codec: str  # lower-case mime type, e.g. "video/vp8"
    clock: int = 90000  # the RTP clock rate of ``timestamp``


class EncodedReader:
    """One consumer of a tap's encoded frames (a sending track, a recorder, a counter).

    Starts clean: delta frames are dropped until a keyframe arrives (asking the source for one),
    so the consumer's decoder never sees a frame that refers to pictures it did not get."""

    def __init__(self, tap: EncodedTap) -> None:
        self.tap = tap
        self.waiting_for_keyframe = True
        self.dropped = 0
        self.frames = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False

    def _push(self, frame: EncodedFrame) -> None:
        if self._ended:
            return
        if self._queue.qsize() >= READER_MAX_QUEUE:  # the consumer stalled: restart at a keyframe
            self.dropped += self._queue.qsize()
            while not self._queue.empty():
                self._queue.get_nowait()
            self.waiting_for_keyframe = True
        if self.waiting_for_keyframe:
            if not frame.keyframe:
                self.dropped += 1
                self.tap.request_keyframe()  # rate-limited: retried while we wait
                return
            self.waiting_for_keyframe = False
        self._queue.put_nowait(frame)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(None)

    async def recv(self) -> EncodedFrame:
        if self._ended and self._queue.empty():
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        self.frames += 1
        return frame

    def close(self) -> None:
        self.tap.readers.discard(self)
        self._end()


class EncodedTap(queue.Queue):
    """Stands in for an ``RTCRtpReceiver``'s decoder queue (see the module docstring).

    ``put((codec, frame))`` (from the event loop, in ``_handle_rtp_packet``) hands the encoded frame
    to every ``EncodedReader`` and, only while something holds decoding on (``hold_decoding``), to
    aiortc's decoder thread. ``put(None)`` ends the readers and is passed on, so the decoder thread
    and the received track end as before. ``get()`` (the decoder thread) is the plain queue's."""

    def __init__(self, receiver: RTCRtpReceiver, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.receiver = receiver
        self.loop = loop
        self.readers: set[EncodedReader] = set()
        self.decoders = 0  # consumers that need decoded frames
        self.codec: str | None = None  # of the last frame received
        self.frames = 0  # encoded frames received
        self.keyframes = 0
        self.frames_decoded = 0  # encoded frames handed to aiortc's decoder
        self.plis_sent = 0
        self.ended = False
        self._decoder_needs_keyframe = True
        self._last_pli = float("-inf")
        self._pli_timer: asyncio.TimerHandle | None = None

    # -- the receiver side (aiortc calls these) -----------------------------------------------------
    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            self.ended = True
            for reader in list(self.readers):
                reader._end()
            if self._pli_timer is not None:
                self._pli_timer.cancel()
            super().put(None)
            return
        codec, jitter_frame = item
        mime = codec.mimeType.lower()
        data = jitter_frame.data
        # Key frames are told apart for VP8 only; other codecs count as "maybe key" (the decoder path
        # then relies on aiortc's own PLI on decode errors).
        key = is_vp8_keyframe(data) if mime == VP8 else True
        self.codec = mime
        self.frames += 1
        if key and mime == VP8:
            self.keyframes += 1
        if self.readers:
            frame = EncodedFrame(data, jitter_frame.timestamp, key, mime, codec.clockRate)
            for reader in list(self.readers):
                reader._push(frame)
        if self.decoders:
            if self._decoder_needs_keyframe and not key:
                self.request_keyframe()
                return
            self._decoder_needs_keyframe = False
            self.frames_decoded += 1
            super().put(item)

    # -- our side -----------------------------------------------------------------------------------
    def open_reader(self) -> EncodedReader:
        reader = EncodedReader(self)
        if self.ended:
            reader._end()
        else:
            self.readers.add(reader)
            self.request_keyframe()
        return reader

    def hold_decoding(self) -> Callable[[], None]:
        """Hand frames to aiortc's decoder (from the next keyframe on) until the returned release is called."""
        self.decoders += 1
        if self.decoders == 1:
            self._decoder_needs_keyframe = True
            self.request_keyframe()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.decoders -= 1

        return release

    def media_ssrcs(self) -> list[int]:
        rtx = set(getattr(self.receiver, RTX_SSRC, {}) or {})
        return [s.source for s in self.receiver.getSynchronizationSources() if s.source not in rtx]

    def request_keyframe(self) -> None:
        """Ask the sender of this stream for a keyframe (RTCP PLI), at most once per PLI_MIN_INTERVAL_S;
        a request inside that window is sent when it ends."""
        if self.ended or self._pli_timer is not None:
            return
        wait = self._last_pli + PLI_MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            self._pli_timer = self.loop.call_later(wait, self._send_pli)
        else:
            self._send_pli()

    def _send_pli(self) -> None:
        self._pli_timer = None
        if self.ended:
            return
        ssrcs = self.media_ssrcs()
        if not ssrcs:  # nothing received yet: the stream will start with a keyframe anyway
            return
        self._last_pli = time.monotonic()
        for ssrc in ssrcs:
            self.plis_sent += 1
            self.loop.create_task(self.receiver._send_rtcp_pli(ssrc))


def install_tap(receiver: RTCRtpReceiver) -> EncodedTap:
    """Put an ``EncodedTap`` in place of the receiver's decoder queue. Call from the "track" handler."""
    if getattr(receiver, DECODER_THREAD, None) is not None:
        raise RuntimeError("the receiver's decoder thread already runs: install the tap in the track handler")
    if not isinstance(getattr(receiver, DECODER_QUEUE, None), queue.Queue):
        raise RuntimeError(f"aiortc {aiortc.__version__}: RTCRtpReceiver has no {DECODER_QUEUE}")  # noqa: TRY004
    tap = EncodedTap(receiver, asyncio.get_running_loop())
    setattr(receiver, DECODER_QUEUE, tap)
    return tap


def watch_keyframe_requests(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Call ``callback()`` whenever the remote receiver sends this sender a PLI or FIR."""
    original = sender._handle_rtcp_packet

    async def handle(packet) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            try:
                callback()
            except Exception:
                log.exception("keyframe request handler failed")
        await original(packet)

    sender._handle_rtcp_packet = handle


def negotiated_codec(transceiver: RTCRtpTransceiver) -> str | None:
    """The (lower-case) mime type the m-line sends with: aiortc's sender uses the first negotiated codec."""
    codecs = [c for c in getattr(transceiver, "_codecs", []) if not is_rtx(c)]
    return codecs[0].mimeType.lower() if codecs else None


def answer_vp8_only(pc) -> None:
    """After ``setRemoteDescription``: every video m-line whose offer includes VP8 is answered with VP8
    (and its RTX) only, so the peer sends VP8 and receives VP8: frames can be forwarded untouched.
    An m-line without VP8 keeps what was negotiated (the hub then decodes and re-encodes)."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    preferences = [c for c in capabilities if c.mimeType.lower() == VP8 or is_rtx(c)]
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "video":
            continue
        codecs = getattr(transceiver, "_codecs", None) or []
        vp8 = next((c for c in codecs if c.mimeType.lower() == VP8), None)
        if vp8 is None:
            continue
        transceiver.setCodecPreferences(preferences)
        transceiver._codecs = [vp8] + [
            c for c in codecs if is_rtx(c) and c.parameters.get("apt") == vp8.payloadType
        ]
