"""Recording one side of a session (its audio + video) to a Matroska file.

aiortc's ``MediaRecorder`` sizes the video stream from the first video frame, but with PyAV 18 the
container opens every codec as soon as the first (audio) packet is muxed, and the late size change
then fails ("Cannot change width after codec is open"). This recorder waits for the first frame of
each track before opening the file, encodes H.264 with the ``ultrafast``/``zerolatency`` preset
(the recording must not eat the cores the live relay needs) and AAC, and rewrites timestamps on
one clock so that audio and video stay aligned whatever the sender's RTP clocks did.

Encoding and muxing run on one worker thread per recorder (PyAV releases the GIL while it
encodes): done in the event loop, four recorded sessions already delayed RTP handling enough for
the live video to drop from 15 to 9 fps (bench/video_sessions.py).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 10.0
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)


class Recorder:
    def __init__(self, path: Path, tracks: list[MediaStreamTrack], fps: int = 15) -> None:
        self.path = path
        self.tracks = tracks
        self.fps = fps
        self.frames = {"audio": 0, "video": 0}
        self._container = None
        self._streams: dict[MediaStreamTrack, object] = {}
        self._task: asyncio.Task | None = None
        self._t0: float | None = None
        self._last_video_pts = -1
        self._audio_pts = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"recorder {self.path.name}")

    async def _first(self, track: MediaStreamTrack):
        try:
            return track, await asyncio.wait_for(track.recv(), FIRST_FRAME_TIMEOUT_S)
        except (TimeoutError, MediaStreamError):
            return track, None

    async def _run(self) -> None:
        firsts = [(t, f) for t, f in await asyncio.gather(*(self._first(t) for t in self.tracks)) if f is not None]
        if not firsts:
            log.info("nothing to record for %s: no media arrived", self.path)
            return
        self._container = av.open(str(self.path), mode="w", format="matroska")
        for track, frame in firsts:
            if track.kind == "video":
                stream = self._container.add_stream("libx264", rate=self.fps)
                stream.width, stream.height = frame.width, frame.height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = VIDEO_TIME_BASE
                stream.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
                stream.codec_context.thread_count = 1
            else:
                stream = self._container.add_stream("aac", rate=frame.sample_rate)
                stream.layout = frame.layout.name
            self._streams[track] = stream
        self._t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for track, frame in firsts:
            await loop.run_in_executor(self._worker, self._write, track, frame, time.monotonic())
        await asyncio.gather(*(self._pump(track) for track, _ in firsts))

    async def _pump(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            await loop.run_in_executor(self._worker, self._write, track, frame, time.monotonic())

    def _write(self, track: MediaStreamTrack, frame, arrived: float) -> None:
        """On the worker thread: restamp a copy, encode, mux."""
        from video.session import copy_frame

        frame = copy_frame(frame)  # shared with the live relay: never restamp the original
        stream = self._streams[track]
        if track.kind == "video":
            pts = max(self._last_video_pts + 1, int((arrived - self._t0) * 90000))
            self._last_video_pts = pts
            frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
            if frame.format.name != "yuv420p" or frame.width != stream.width or frame.height != stream.height:
                frame = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
                frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        else:
            frame.pts, frame.time_base = self._audio_pts, fractions.Fraction(1, frame.sample_rate)
            self._audio_pts += frame.samples
        try:
            for packet in stream.encode(frame):
                self._container.mux(packet)
        except Exception:  # a bad frame must not end the recording (or the session)
            log.exception("recording %s: a %s frame could not be written", self.path.name, track.kind)
            return
        self.frames[track.kind] += 1

    async def stop(self) -> None:
        for track in self.tracks:
            track.stop()
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
            for stream in self._streams.values():
                for packet in stream.encode(None):
                    self._container.mux(packet)
        except Exception:
            log.exception("flushing the recording %s failed", self.path)
        self._container.close()
        self._container = None
        log.info("recording %s closed: %s frames", self.path, self.frames)
