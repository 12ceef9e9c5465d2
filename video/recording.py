"""Recording one side of a session (its audio + video) to a Matroska file.

Video that the hub forwards as VP8 (``video.relay``) is recorded the same way: the VP8 frames are
remuxed into the file as they arrived (no decoding, no encoding), starting at a keyframe; the
picture size comes from the keyframe header. Video from a peer that could not send VP8 is decoded
and encoded with H.264 ``ultrafast``/``zerolatency`` (the recording must not eat the cores the live
relay needs). Audio is decoded (only while recording, when it is otherwise forwarded) and encoded as AAC. Timestamps are rewritten on one clock (time since the file
was opened) so that audio and video stay aligned whatever the sender's RTP clocks did.

aiortc's ``MediaRecorder`` is not used: it sizes the video stream from the first video frame, but
with PyAV 18 the container opens every codec as soon as the first (audio) packet is muxed and the
late size change then fails ("Cannot change width after codec is open"). This recorder waits for
the first frame of each input before opening the file.

Encoding and muxing run on one worker thread per recorder (PyAV releases the GIL while it
encodes): done in the event loop, four recorded sessions already delayed RTP handling enough for
the live video to drop from 15 to 9 fps when the recording was H.264 (bench/video_sessions.py).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from video.passthrough import VP8, EncodedFrame, vp8_size
from video.relay import VIDEO_CLOCK, VIDEO_TIME_BASE, MediaSource, copy_frame, stop_proxy

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 10.0


class _TrackReader:
    """A relay proxy with the reader interface (``recv``/``close``)."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track

    async def recv(self):
        return await self.track.recv()

    def close(self) -> None:
        stop_proxy(self.track)


@dataclass
class _Input:
    kind: str  # "audio" or "video"
    reader: object
    stream: object = None
    remux: bool = False  # VP8 frames muxed as they are


class Recorder:
    """``audio``, ``video``: the received ``MediaSource``s (or relay proxies of decoded tracks).
    Audio is always decoded (for AAC); VP8 video is remuxed."""

    def __init__(self, path: Path, audio: MediaSource | MediaStreamTrack | None = None,
                 video: MediaSource | MediaStreamTrack | None = None, fps: int = 15) -> None:
        self.path = path
        self.fps = fps
        self.frames = {"audio": 0, "video": 0}
        self.remuxed = False  # the video is VP8 remuxed without transcoding
        self.inputs: list[_Input] = []
        if isinstance(audio, MediaSource):
            self.inputs.append(_Input("audio", audio.open(encoded=False)))
        elif audio is not None:
            self.inputs.append(_Input("audio", _TrackReader(audio)))
        if isinstance(video, MediaSource):
            remux = video.forwardable and video.codec == VP8
            self.inputs.append(_Input("video", video.open(encoded=remux), remux=remux))
        elif video is not None:
            self.inputs.append(_Input("video", _TrackReader(video)))
        self._container = None
        self._task: asyncio.Task | None = None
        self._t0: float | None = None
        self._last_video_pts = -1
        self._video_anchor: int | None = None
        self._audio_pts = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"recorder {self.path.name}")

    async def _first(self, inp: _Input):
        try:
            return inp, await asyncio.wait_for(inp.reader.recv(), FIRST_FRAME_TIMEOUT_S)
        except (TimeoutError, MediaStreamError):
            return inp, None

    async def _run(self) -> None:
        firsts = [(i, f) for i, f in await asyncio.gather(*(self._first(i) for i in self.inputs)) if f is not None]
        if not firsts:
            log.info("nothing to record for %s: no media arrived", self.path)
            return
        self._container = av.open(str(self.path), mode="w", format="matroska")
        for inp, frame in firsts:
            if inp.kind == "video" and inp.remux:
                width, height = vp8_size(frame.data) or (640, 480)
                inp.stream = self._container.add_mux_stream("vp8", width=width, height=height)
                inp.stream.time_base = fractions.Fraction(1, 1000)
                self.remuxed = True
            elif inp.kind == "video":
                stream = self._container.add_stream("libx264", rate=self.fps)
                stream.width, stream.height = frame.width, frame.height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = VIDEO_TIME_BASE
                stream.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
                stream.codec_context.thread_count = 1
                inp.stream = stream
            else:
                inp.stream = self._container.add_stream("aac", rate=frame.sample_rate)
                inp.stream.layout = frame.layout.name
        self._t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for inp, frame in firsts:
            await loop.run_in_executor(self._worker, self._write, inp, frame, time.monotonic())
        await asyncio.gather(*(self._pump(inp) for inp, _ in firsts))

    async def _pump(self, inp: _Input) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await inp.reader.recv()
            except MediaStreamError:
                return
            await loop.run_in_executor(self._worker, self._write, inp, frame, time.monotonic())

    def _video_pts(self, arrived: float, source_ts: int | None) -> int:
        own = int((arrived - self._t0) * VIDEO_CLOCK)
        if source_ts is None:  # decoded frames: arrival time
            pts = max(self._last_video_pts + 1, own)
        else:  # forwarded frames keep the sender's frame timing, anchored at their arrival
            if self._video_anchor is None:
                self._video_anchor = max(own, self._last_video_pts + 1) - source_ts
            pts = source_ts + self._video_anchor
            if pts <= self._last_video_pts or pts > own + VIDEO_CLOCK:
                self._video_anchor = max(own, self._last_video_pts + 1) - source_ts
                pts = source_ts + self._video_anchor
        self._last_video_pts = pts
        return pts

    def _write(self, inp: _Input, frame, arrived: float) -> None:
        """On the worker thread: restamp (a copy of) the frame, encode or remux it, mux."""
        stream = inp.stream
        try:
            if isinstance(frame, EncodedFrame):
                packet = av.Packet(frame.data)
                packet.pts = packet.dts = self._video_pts(arrived, frame.timestamp)
                packet.time_base = VIDEO_TIME_BASE
                packet.stream = stream
                packet.is_keyframe = frame.keyframe
                self._container.mux(packet)
                self.frames["video"] += 1
                return
            frame = copy_frame(frame)  # shared with the live relay: never restamp the original
            if inp.kind == "video":
                pts = self._video_pts(arrived, None)
                frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
                if frame.format.name != "yuv420p" or frame.width != stream.width or frame.height != stream.height:
                    frame = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
                    frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
            else:
                frame.pts, frame.time_base = self._audio_pts, fractions.Fraction(1, frame.sample_rate)
                self._audio_pts += frame.samples
            for packet in stream.encode(frame):
                self._container.mux(packet)
        except Exception:  # a bad frame must not end the recording (or the session)
            log.exception("recording %s: a %s frame could not be written", self.path.name, inp.kind)
            return
        self.frames[inp.kind] += 1

    async def stop(self) -> None:
        for inp in self.inputs:
            inp.reader.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        # After the frame being written (if any): the worker runs one job at a time.
        await asyncio.get_running_loop().run_in_executor(self._worker, self._close)
        self._worker.shutdown(wait=False)

    def _close(self) -> None:
        if self._container is None:
            return
        try:
            for inp in self.inputs:
                if inp.stream is not None and not inp.remux:
                    for packet in inp.stream.encode(None):
                        self._container.mux(packet)
        except Exception:
            log.exception("flushing the recording %s failed", self.path)
        self._container.close()
        self._container = None
        log.info("recording %s closed: %s frames%s", self.path, self.frames, " (VP8 remuxed)" if self.remuxed else "")
