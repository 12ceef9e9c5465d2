"""Python WebRTC peers (aiortc) that play a resident, an agent or a phone agent against the hub's video API.

They send real media (a solid-colour 320x240 picture at 15 fps, a sine tone) and count what they
receive, so a test can check that the server really relays: the agent sees the resident's colour,
the resident sees the agent's camera and its screen share on the third m-line. They also count the
keyframe requests (PLI/FIR) the hub sends to each of their video senders.

``encoded=True`` (the capacity bench) makes a peer as cheap as possible, standing in for a remote
browser on the hub's own cores: it sends a VP8 clip encoded once per process (and pre-encoded Opus),
restarting the clip at its keyframe when the hub asks for one, and counts received *encoded* frames
with the hub's own receiver hook (``video.passthrough``) instead of decoding them; ``decode=True``
still decodes what it receives (one such peer proves the relayed video is decodable).
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import time

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from video import passthrough
from video.ice import rtc_configuration


class PacedTrack(MediaStreamTrack):
    """A track that produces one item per ``period`` seconds in real time; ``_tick()`` waits for the
    next slot and returns its number (0, 1, 2...)."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self._period = period
        self._start: float | None = None
        self._n = 0

    async def _tick(self) -> int:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._n += 1
            await asyncio.sleep(max(0, self._start + self._n * self._period - time.monotonic()))
        return self._n


class ColourTrack(PacedTrack):
    kind = "video"

    def __init__(self, rgb: tuple[int, int, int], size=(320, 240), fps: int = 15, moving: bool = False) -> None:
        super().__init__(1 / fps)
        self._image = picture(rgb, size, moving)
        self._moving = moving

    async def recv(self):
        n = await self._tick()
        image = np.roll(self._image, 4 * n, axis=1) if self._moving else self._image
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(n * self._period * 90000)
        frame.time_base = fractions.Fraction(1, 90000)
        return frame


def picture(rgb: tuple[int, int, int], size=(320, 240), moving: bool = False) -> np.ndarray:
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
    return image


@functools.cache
def vp8_clip(rgb: tuple[int, int, int], seconds: float = 4.0, fps: int = 15, size=(320, 240)) -> tuple[bytes, ...]:
    """A scrolling-texture clip encoded once with libvpx roughly as aiortc's encoder does (realtime,
    ~500 kbit/s CBR): one keyframe, then delta frames."""
    image = picture(rgb, size, moving=True)
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = size[0], size[1], "yuv420p"
    codec.time_base = fractions.Fraction(1, fps)
    codec.bit_rate = 500_000
    codec.gop_size = 10_000
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                     "minrate": "500000", "maxrate": "500000", "bufsize": "500000"}
    frames = []
    count = int(seconds * fps)
    for n in range(count + 1):
        if n < count:
            frame = av.VideoFrame.from_ndarray(np.roll(image, 4 * n, axis=1), format="rgb24").reformat(format="yuv420p")
            frame.pts = n
            packets = codec.encode(frame)
        else:
            packets = codec.encode(None)
        frames += [bytes(p) for p in packets]
    assert passthrough.is_vp8_keyframe(frames[0])
    return tuple(frames)


@functools.cache
def opus_clip(freq: float, seconds: float = 1.0) -> tuple[bytes, ...]:
    """20 ms Opus packets of a tone, encoded once (loops cleanly: a whole number of periods)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format = 48000, "stereo", "s16"
    codec.bit_rate = 32000
    out = []
    n = 0
    for _ in range(int(seconds * 50)):
        t = (np.arange(960) + n) / 48000
        pcm = (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, n, fractions.Fraction(1, 48000)
        n += 960
        out += [bytes(p) for p in codec.encode(frame)]
    return tuple(out)


class EncodedClipTrack(PacedTrack):
    """Sends pre-encoded packets (aiortc packs them without encoding), paced in real time, looping;
    ``restart()`` (on a keyframe request) goes back to the clip's keyframe."""

    def __init__(self, kind: str, packets: tuple[bytes, ...], period: float, clock: int) -> None:
        super().__init__(period)
        self.kind = kind
        self._packets, self._clock = packets, clock
        self._index = 0
        self.restarts = 0

    def restart(self) -> None:
        self._index = 0
        self.restarts += 1

    async def recv(self) -> av.Packet:
        n = await self._tick()
        packet = av.Packet(self._packets[self._index])
        self._index = (self._index + 1) % len(self._packets)
        packet.pts = round(n * self._period * self._clock)
        packet.time_base = fractions.Fraction(1, self._clock)
        return packet


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


class ReceivedEncoded:
    """Counts the encoded frames of one received track without decoding them (the hub's receiver hook:
    nothing reaches aiortc's decoder)."""

    def __init__(self, track: MediaStreamTrack, receiver) -> None:
        self.track = track
        self.tap = passthrough.install_tap(receiver)
        self.reader = self.tap.open_reader()
        self.frames = 0
        self.last = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.last = await self.reader.recv()
            except MediaStreamError:
                return
            self.frames += 1


class Peer:
    """One side of a call. ``role``: resident (camera+mic, receives a third m-line for the screen),
    agent (camera+mic+screen), phone_agent (microphone only)."""

    def __init__(self, role: str, *, colour=(200, 30, 30), screen_colour=(30, 30, 200), tone_hz=440.0,
                 ice_servers=None, moving: bool = False, screen: bool = True, video_codec: str | None = None,
                 encoded: bool = False, decode: bool = True) -> None:
        from video.ice import rtc_configuration

        self.role = role
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers or []))
        self.received: dict = {}
        self.senders: dict[str, object] = {}
        self.plis: dict[str, int] = {}  # keyframe requests the hub sent to our "video" / "screen" sender
        self.sending: dict[str, MediaStreamTrack] = {}

        def video_track(rgb):
            if encoded:
                return EncodedClipTrack("video", vp8_clip(tuple(rgb)), 1 / 15, 90000)
            return ColourTrack(rgb, moving=moving)

        self.pc.addTrack(EncodedClipTrack("audio", opus_clip(tone_hz), 0.02, 48000) if encoded else ToneTrack(tone_hz))
        if role != "phone_agent":
            self._add_video("video", video_track(colour))
        if role == "resident":
            self.screen_transceiver = self.pc.addTransceiver("video", direction="recvonly")
        elif role == "agent":
            if screen:
                self._add_video("screen", video_track(screen_colour))
            else:  # the screen m-line is there (as in the browser) but carries nothing until shared
                self.pc.addTransceiver("video", direction="sendonly")
        if video_codec:  # offer only this codec (e.g. "video/H264": a peer that cannot do VP8)
            preferences = [c for c in RTCRtpSender.getCapabilities("video").codecs
                           if c.mimeType.lower() == video_codec.lower()]
            for transceiver in self.pc.getTransceivers():
                if transceiver.kind == "video":
                    transceiver.setCodecPreferences(preferences)

        @self.pc.on("track")
        def on_track(track):
            transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
            if track.kind == "audio":
                name = "audio"
            else:
                videos = [t for t in self.pc.getTransceivers() if t.kind == "video"]
                name = "video" if videos and videos[0].receiver.track is track else "screen"
            self.received[name] = (Received(track) if not encoded or (decode and name != "audio")
                                   else ReceivedEncoded(track, transceiver.receiver))

    def _add_video(self, name: str, track: MediaStreamTrack) -> None:
        sender = self.pc.addTrack(track)
        self.senders[name] = sender
        self.sending[name] = track
        self.plis[name] = 0

        def requested() -> None:
            self.plis[name] += 1
            if isinstance(track, EncodedClipTrack):
                track.restart()

        passthrough.watch_keyframe_requests(sender, requested)

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
                    f"{self.role}: {self.frames(name)} {name} frames after {timeout} s"
                    f" (state {self.pc.connectionState})"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()


def relay_counts(session) -> dict:
    """What the hub did with each stream: frames forwarded untouched vs. decoded (and re-encoded)."""
    sent = {f"{way}.{name}": {"forwarded": t.forwarded, "transcoded": t.transcoded, "frames": t.frames}
            for way, tracks in (("to_resident", session.to_resident), ("to_agent", session.to_agent))
            for name, t in tracks.items()}
    received = {}
    for who, side in (("resident", session.resident), ("agent", session.agent)):
        for track, source in (side.sources.items() if side else ()):
            name = "audio" if track.kind == "audio" else "video" if track is side.video else "screen"
            tap = source.tap
            received[f"{who}.{name}"] = {"codec": source.codec, "frames": tap.frames, "keyframes": tap.keyframes,
                                         "decoded": tap.frames_decoded, "plis": tap.plis_sent}
    return {"sent": sent, "received": received}


def an_offer(kind: str = "resident") -> str:
    async def make():
        pc = RTCPeerConnection(rtc_configuration([]))
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        if kind == "resident":
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())
