"""What the hub relays between the peers: received sources and the switchable sending tracks.

Media is forwarded as it arrived (VP8 video, Opus audio; no decoding or encoding:
``video.passthrough``) whenever the source was received with a forwardable codec and the
destination's m-line sends the same one. Otherwise (a peer that cannot do VP8) the source is decoded
by aiortc and the sender encodes again, as before. Consumers that need decoded frames (the phone
bridge, the recorder's AAC audio, the fallback) get them from the same source: decoding then runs
only for as long as one of them is open.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from video import passthrough
from video.passthrough import FORWARDABLE, EncodedFrame, EncodedReader, EncodedTap, negotiated_codec

VIDEO_CLOCK = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


def copy_frame(frame):
    """A copy of a decoded audio/video frame (cheap next to encoding it)."""
    if isinstance(frame, av.AudioFrame):
        out = av.AudioFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name)
        out.sample_rate = frame.sample_rate
    else:
        fmt = frame.format.name if frame.format.name in ("yuv420p", "rgb24", "bgr24", "nv12") else None
        out = (av.VideoFrame.from_ndarray(frame.to_ndarray(), format=fmt) if fmt
               else frame.reformat(format="yuv420p"))
    out.pts, out.time_base = frame.pts, frame.time_base
    return out


def stop_proxy(track: MediaStreamTrack) -> None:
    """Stop a ``MediaRelay`` proxy and wake a ``recv()`` waiting on it.

    (``RelayStreamTrack.stop()`` only unregisters the proxy: a consumer blocked in ``recv()`` would
    wait forever, e.g. a sending track whose agent left.)"""
    track.stop()
    queue = getattr(track, "_queue", None)
    if queue is not None:
        queue.put_nowait(None)


class DecodedReader:
    """Decoded frames of a source (the fallback path); keeps the source's decoding on while open."""

    def __init__(self, source: MediaSource) -> None:
        self.proxy = source.relay.subscribe(source.track)
        self._release = source.tap.hold_decoding() if source.tap is not None else (lambda: None)

    async def recv(self):
        return await self.proxy.recv()

    def close(self) -> None:
        stop_proxy(self.proxy)
        self._release()


class MediaSource:
    """A track received from a peer, offered encoded (forwarding) or decoded (fallback, phone, AAC).

    ``tap`` is the receiver's ``EncodedTap`` (None when the aiortc hooks are unavailable: decoded only)."""

    def __init__(self, track: MediaStreamTrack, relay: MediaRelay, tap: EncodedTap | None, transceiver) -> None:
        self.track = track
        self.relay = relay
        self.tap = tap
        self.transceiver = transceiver

    @property
    def codec(self) -> str | None:
        return negotiated_codec(self.transceiver) if self.transceiver is not None else None

    @property
    def forwardable(self) -> bool:
        """Arrives as VP8 / Opus and can be tapped: consumers may take the encoded frames."""
        return self.tap is not None and self.codec in FORWARDABLE

    def open(self, encoded: bool):
        """A reader (``recv()``/``close()``): encoded frames from the next keyframe, or decoded frames."""
        if encoded and self.forwardable:
            return self.tap.open_reader()
        return DecodedReader(self)

    def request_keyframe(self) -> None:
        if self.tap is not None:
            self.tap.request_keyframe()


class SwitchableTrack(MediaStreamTrack):
    """A sending track whose source can be set, replaced or removed at any time.

    Without a source it sends nothing (``recv`` waits). A source is a ``MediaSource``: its VP8/Opus
    frames are forwarded as ``av.Packet``s (aiortc's sender packs them without encoding) when this
        track's m-line sends the codec the source arrived with, otherwise decoded frames are re-encoded by
    the sender; a plain track (a relay proxy) is read as it is. Timestamps are rewritten on our own
    clock, so switching between sources
    (camera -> screen, agent A -> agent B) never makes the receiver's timeline jump backwards; a new
    video source starts at a keyframe (requested from its sender) and no delta frame before it.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source = None
        self._reader = None
        self._reader_source = None
        self._changed = asyncio.Event()
        self._t0: float | None = None
        self._audio_pts = 0
        self._last_pts = -1
        self._anchor: int | None = None  # source timestamp -> our clock, for forwarded frames
        self.transceiver = None
        self.frames = 0  # everything sent
        self.forwarded = 0  # frames sent as they arrived (no decode, no encode)
        self.transcoded = 0  # frames decoded here and encoded again by the sender
        self.keyframe_requests = 0  # PLI/FIR received from the remote peer

    @property
    def source(self):
        return self._source

    def attach(self, sender, transceiver) -> None:
        """Called once the track has its sender: learn the m-line's codec, see the remote's keyframe requests."""
        self.transceiver = transceiver
        if self.kind == "video" and passthrough.available():
            passthrough.watch_keyframe_requests(sender, self._keyframe_requested)

    def forwards(self, source: MediaSource) -> bool:
        """This track's m-line sends the codec the source arrives with (so its frames go out untouched)."""
        return (self.transceiver is not None and passthrough.available() and source.forwardable
                and negotiated_codec(self.transceiver) == source.codec)

    def _keyframe_requested(self) -> None:
        self.keyframe_requests += 1
        # Forwarded frames: only the source can make a keyframe. (For frames it encodes itself,
        # aiortc's sender handles the request.)
        if isinstance(self._reader, EncodedReader):
            self._reader_source.request_keyframe()

    def set_source(self, source) -> None:
        old, self._source = self._source, source
        if old is not None and old is not source:
            self._close_reader()
            if isinstance(old, MediaStreamTrack):
                stop_proxy(old)  # a relay proxy: ends its waiting recv()
        self._changed.set()

    def _close_reader(self) -> None:
        reader, self._reader, self._reader_source = self._reader, None, None
        if reader is not None:
            reader.close()

    def _reader_for(self, source: MediaSource):
        if self._reader is None or self._reader_source is not source:
            self._close_reader()
            self._reader = source.open(encoded=self.forwards(source))
            self._reader_source = source
            self._anchor = None
        return self._reader

    async def recv(self):
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            source = self._source
            if source is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if isinstance(source, MediaSource):
                    item = await self._reader_for(source).recv()
                else:
                    item = await source.recv()
            except MediaStreamError:
                if self._source is source:  # the source ended (not replaced)
                    self._source = None
                    self._close_reader()
                continue
            if self._source is not source:  # replaced while we waited: this frame is the old source's
                continue
            return self._restamp(item)

    def _clock(self, rate: int = VIDEO_CLOCK) -> int:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        return int((now - self._t0) * rate)

    def _restamp(self, item):
        self.frames += 1
        if isinstance(item, EncodedFrame):
            self.forwarded += 1
            own = self._clock(item.clock)
            if self._anchor is None:
                self._anchor = max(own, self._last_pts + 1) - item.timestamp
            pts = item.timestamp + self._anchor
            # Keep the source's own frame timing, unless its clock jumped (backwards, or far ahead).
            if pts <= self._last_pts or pts > own + item.clock:
                self._anchor = max(own, self._last_pts + 1) - item.timestamp
                pts = item.timestamp + self._anchor
            self._last_pts = pts
            if self.kind == "audio":
                self._audio_pts = pts + item.clock // 50  # Opus frames are 20 ms (a decoded source follows on)
            packet = av.Packet(item.data)
            packet.pts = packet.dts = pts
            packet.time_base = fractions.Fraction(1, item.clock)
            return packet
        # The relay hands the same decoded frame to every consumer (the other side's sender, the
        # recorder, the drain): restamp a copy, never the shared frame.
        frame = copy_frame(item)
        if self.kind == "audio":
            self.transcoded += 1
            pts = max(self._audio_pts, self._last_pts + 1)
            frame.pts = self._last_pts = pts
            frame.time_base = fractions.Fraction(1, frame.sample_rate)
            self._audio_pts = pts + frame.samples
        else:
            self.transcoded += 1
            pts = max(self._last_pts + 1, self._clock())
            self._last_pts = pts
            frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._close_reader()
        if isinstance(self._source, MediaStreamTrack):
            stop_proxy(self._source)
        self._source = None
        self._changed.set()

