"""Python WebRTC peers (aiortc) that play a resident, an agent or a phone agent against the hub's video API.

They send real media (a solid-colour 320x240 picture at 15 fps, a sine tone) and count what they
receive, so a test can check that the server really relays: the agent sees the resident's colour,
the resident sees the agent's camera and its screen share on the third m-line.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack


class ColourTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, rgb: tuple[int, int, int], size=(320, 240), fps: int = 15, moving: bool = False) -> None:
        super().__init__()
        image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        image[:] = rgb
        if moving:  # camera-like: shaded background and shapes that scroll, so the encoders do real work
            h, w = size[1], size[0]
            yy, xx = np.mgrid[0:h, 0:w]
            shade = (60 * np.sin(xx / 23.0) * np.cos(yy / 17.0)).astype(np.int16)
            image = (image.astype(np.int16) + shade[..., None]).clip(0, 255).astype(np.uint8)
            image[h // 3 : h // 3 + 60, 40:120] = (240, 240, 240)
            rng = np.random.default_rng(7)
            image = (image.astype(np.int16) + rng.integers(-4, 5, image.shape)).clip(0, 255).astype(np.uint8)
        self._image = image
        self._moving = moving
        self._period = 1 / fps
        self._start: float | None = None
        self._n = 0

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._n += 1
            await asyncio.sleep(max(0, self._start + self._n * self._period - time.monotonic()))
        image = np.roll(self._image, 4 * self._n, axis=1) if self._moving else self._image
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(self._n * self._period * 90000)
        frame.time_base = fractions.Fraction(1, 90000)
        return frame


class ToneTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, freq: float = 440.0, rate: int = 48000) -> None:
        super().__init__()
        self.freq, self.rate = freq, rate
        self._n = 0
        self._start: float | None = None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        samples = self.rate // 50
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0, self._start + self._n / self.rate - time.monotonic()))
        t = (np.arange(samples) + self._n) / self.rate
        pcm = (8000 * np.sin(2 * np.pi * self.freq * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._n
        frame.time_base = fractions.Fraction(1, self.rate)
        self._n += samples
        return frame


class Received:
    """Counts frames of one received track and keeps the last one."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.frames = 0
        self.last = None
        self.audio = bytearray()  # mono s16 at the received rate (audio tracks, first 10 s)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            self.last = frame
            if self.track.kind == "audio" and len(self.audio) < 48000 * 2 * 10:
                mono = frame.to_ndarray().reshape(-1)
                if frame.layout.name == "stereo":
                    mono = mono[::2]
                self.audio += mono.astype(np.int16).tobytes()

    def mean_rgb(self) -> np.ndarray:
        return self.last.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)


class Peer:
    """One side of a call. ``role``: resident (camera+mic, receives a third m-line for the screen),
    agent (camera+mic+screen), phone_agent (microphone only)."""

    def __init__(self, role: str, *, colour=(200, 30, 30), screen_colour=(30, 30, 200), tone_hz=440.0,
                 ice_servers=None, moving: bool = False, screen: bool = True) -> None:
        from video.ice import rtc_configuration

        self.role = role
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers or []))
        self.received: dict[str, Received] = {}
        self.pc.addTrack(ToneTrack(tone_hz))
        if role != "phone_agent":
            self.pc.addTrack(ColourTrack(colour, moving=moving))
        if role == "resident":
            self.screen_transceiver = self.pc.addTransceiver("video", direction="recvonly")
        elif role == "agent":
            if screen:
                self.pc.addTrack(ColourTrack(screen_colour, moving=moving))
            else:  # the screen m-line is there (as in the browser) but carries nothing until shared
                self.pc.addTransceiver("video", direction="sendonly")

        @self.pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                name = "audio"
            else:
                videos = [t for t in self.pc.getTransceivers() if t.kind == "video"]
                name = "video" if videos and videos[0].receiver.track is track else "screen"
            self.received[name] = Received(track)

    async def offer(self, client: httpx.AsyncClient, path: str, token: str, **extra) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await client.post(
            path,
            json={"sdp": self.pc.localDescription.sdp, "type": "offer", **extra},
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code == 200:
            body = response.json()
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        return response

    def frames(self, name: str) -> int:
        return self.received[name].frames if name in self.received else 0

    async def wait_frames(self, name: str, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.frames(name) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.role}: {self.frames(name)} {name} frames after {timeout} s (state {self.pc.connectionState})"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()
