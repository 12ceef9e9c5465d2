"""The phone bridge's media path (8 kHz caller frames <-> 48 kHz WebRTC audio) and the ICE configuration."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from video.bridge import PHONE_FRAME_BYTES, AgentToCaller, CallerAudioTrack
from video.ice import IceConfigError, ice_servers_for, parse_ice_servers, rtc_configuration, turn_credentials
from xiaozhi.settings import Settings


class FakeLeg:
    """Implements the AgentAudioLeg contract of the phone side (xiaozhi/hub/channels/phone/hotline.py) in memory."""

    def __init__(self) -> None:
        self.caller_frames: asyncio.Queue = asyncio.Queue()
        self.sent: list[bytes] = []
        self.closed = False
        self.queued = 0  # sent frames the caller's 20 ms clock has not played yet (see ``tick``)
        self.heard: list[bool] = []  # per tick: a frame of the agent's audio (True) or silence

    @property
    def playing(self) -> bool:
        return self.queued > 0

    def send(self, pcm_8k: bytes) -> None:
        self.sent.append(pcm_8k)
        self.queued += len(pcm_8k) // PHONE_FRAME_BYTES

    def tick(self) -> None:
        """One 20 ms tick of the caller's RTP sender."""
        self.heard.append(self.queued > 0)
        self.queued = max(0, self.queued - 1)

    def close(self) -> None:
        self.closed = True


def tone(freq: float, rate: int, seconds: float, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def test_caller_audio_is_resampled_to_48k_and_paced():
    async def scenario():
        leg = FakeLeg()
        pcm = tone(1000, 8000, 1.0)

        async def caller():  # the phone side delivers a frame every 20 ms, like RTP
            for i in range(50):
                leg.caller_frames.put_nowait(pcm[i * 160 : (i + 1) * 160].tobytes())
                await asyncio.sleep(0.02)

        producer = asyncio.create_task(caller())
        await asyncio.sleep(0.03)
        track = CallerAudioTrack(leg)
        frames, started = [], time.monotonic()
        while sum(f.samples for f in frames) < 48000 * 0.6:
            frames.append(await track.recv())
        elapsed = time.monotonic() - started
        await producer
        return track, frames, elapsed

    track, frames, elapsed = asyncio.run(scenario())
    assert all(f.sample_rate == 48000 and f.layout.name == "mono" for f in frames)
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and pts[0] == 0
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert abs(dominant_hz(samples[4800:], 48000) - 1000) < 20
    # 0.6 s of audio comes out in real time (20 ms pacing), not all at once.
    assert 0.45 < elapsed < 1.2
    assert track.frames_in >= 25 and track.frames_dropped == 0


def test_caller_backlog_beyond_100ms_is_dropped_not_delayed():
    async def scenario():
        leg = FakeLeg()
        for i in range(50):  # 1 s queued while the agent's side was not reading yet
            leg.caller_frames.put_nowait(bytes([i]) * PHONE_FRAME_BYTES)
        track = CallerAudioTrack(leg)
        await track.recv()
        return track, leg

    track, leg = asyncio.run(scenario())
    assert track.frames_dropped == 45  # only the newest 100 ms is kept
    assert track.frames_in == 1 and leg.caller_frames.qsize() == 4


def test_caller_track_plays_silence_without_frames_and_ends_with_the_call():
    async def scenario():
        leg = FakeLeg()
        track = CallerAudioTrack(leg)
        quiet = [await track.recv() for _ in range(5)]
        leg.caller_frames.put_nowait(None)  # the call has ended
        with pytest.raises(MediaStreamError):
            for _ in range(20):
                await track.recv()
        return quiet, track

    quiet, track = asyncio.run(scenario())
    assert all(not f.to_ndarray().any() for f in quiet)
    assert track.ended.is_set() and track.readyState == "ended"


def test_agent_audio_reaches_the_caller_as_8k_20ms_frames():
    async def scenario():
        leg = FakeLeg()
        source = asyncio.Queue()
        samples = tone(440, 48000, 1.0)
        stereo = np.repeat(samples, 2)  # what aiortc's Opus decoder yields: 48 kHz s16 stereo
        for i in range(50):
            frame = av.AudioFrame.from_ndarray(stereo[i * 1920 : (i + 1) * 1920].reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = 48000
            frame.pts = i * 960
            source.put_nowait(frame)

        class QueueTrack:
            kind = "audio"

            async def recv(self):
                from aiortc.mediastreams import MediaStreamError

                if source.empty():
                    raise MediaStreamError
                return source.get_nowait()

        pump = AgentToCaller(QueueTrack(), leg)
        await asyncio.wait_for(pump.task, 5)
        return leg

    leg = asyncio.run(scenario())
    assert all(len(chunk) == PHONE_FRAME_BYTES for chunk in leg.sent)
    assert 48 <= len(leg.sent) <= 50  # 1 s of audio = 50 frames (the resampler keeps a few ms back)
    pcm = np.frombuffer(b"".join(leg.sent), dtype=np.int16)
    assert abs(dominant_hz(pcm[800:], 8000) - 440) < 10
    assert np.abs(pcm[800:]).max() > 4000  # not attenuated to nothing


def agent_frame(i: int) -> av.AudioFrame:
    samples = tone(440, 48000, 0.02)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 48000
    frame.pts = i * 960
    return frame


def test_agent_audio_on_a_jittery_clock_reaches_the_caller_without_gaps():
    """The agent's 20 ms frames arrive on WebRTC's clock, up to 30 ms late; the caller's RTP sender ticks
    every 20 ms on its own. Sent as they came, every arrival that slipped past a tick was a silent frame
    for the caller (the sipp bridge test saw 5-6 %); the playout buffer rides the jitter out."""
    async def scenario():
        leg = FakeLeg()
        pump = AgentToCaller(asyncio.Queue(), leg)  # a track that never delivers: frames are fed by hand
        pump.task.cancel()
        rng = np.random.default_rng(3)
        arrivals = [(0.020 * i + rng.uniform(0, 0.030), "frame", i) for i in range(150)]
        ticks = [(0.007 + 0.020 * k, "tick", k) for k in range(160)]
        for _, what, i in sorted(arrivals + ticks):
            if what == "frame":
                pump.feed(agent_frame(i))
            else:
                leg.tick()
        return leg, pump

    leg, pump = asyncio.run(scenario())
    first, last = leg.heard.index(True), len(leg.heard) - 1 - leg.heard[::-1].index(True)
    gaps = leg.heard[first : last + 1].count(False)
    assert gaps == 0 and pump.underruns == 0, f"{gaps} silent ticks, {pump.underruns} underruns"
    assert sum(len(c) for c in leg.sent) // PHONE_FRAME_BYTES >= 145  # all of it (the resampler keeps a few ms)


def test_after_the_agent_paused_the_cushion_is_built_again():
    async def scenario():
        leg = FakeLeg()
        pump = AgentToCaller(asyncio.Queue(), leg)
        pump.task.cancel()
        for i in range(10):  # the agent speaks, one frame per tick
            pump.feed(agent_frame(i))
            leg.tick()
        for _ in range(10):  # the agent's audio stalls: the caller's side runs dry
            leg.tick()
        sent_before = len(leg.sent)
        pump.feed(agent_frame(10))  # the first frame after the gap is held back...
        held = len(leg.sent) == sent_before
        pump.feed(agent_frame(11))
        pump.feed(agent_frame(12))  # ...until the cushion is rebuilt
        return leg, pump, held, sent_before

    leg, pump, held, sent_before = asyncio.run(scenario())
    assert held and pump.underruns == 1
    assert len(leg.sent) - sent_before == 3 and leg.queued == 3


def test_ice_servers_come_only_from_configuration():
    assert parse_ice_servers("[]") == []
    servers = parse_ice_servers('[{"urls": "turn:turn.example.cn:3478", "username": "u", "credential": "p"}]')
    assert servers == [{"urls": ["turn:turn.example.cn:3478"], "username": "u", "credential": "p"}]
    for bad in ("{", '{"urls": "stun:x"}', '[{"url": "stun:x"}]', '[{"urls": "http://x"}]'):
        with pytest.raises(IceConfigError):
            parse_ice_servers(bad)
    assert rtc_configuration([]).iceServers == []


def test_turn_credentials_follow_coturn_use_auth_secret():
    username, password = turn_credentials("s3cret", "agent1", 600, now=1_700_000_000)
    assert username == "1700000600:agent1"
    assert password == base64.b64encode(hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()).decode()
    settings = Settings(ice_servers='[{"urls": ["turn:127.0.0.1:3478"]}, {"urls": "stun:127.0.0.1:3478"}]',
                        turn_secret="s3cret", turn_credential_ttl_s=60)
    assert "s3cret" not in repr(settings.ice_config())
    turn, stun = ice_servers_for(settings.ice_config(), "resident")
    assert turn["username"].endswith(":resident") and int(turn["username"].split(":")[0]) > time.time()
    assert "username" not in stun


def test_empty_ice_configuration_never_contacts_a_public_stun_server():
    async def gather():
        pc = RTCPeerConnection(rtc_configuration([]))
        pc.addTransceiver("audio")
        started = time.monotonic()
        await pc.setLocalDescription(await pc.createOffer())
        took = time.monotonic() - started
        sdp = pc.localDescription.sdp
        await pc.close()
        return took, sdp

    took, sdp = asyncio.run(gather())
    assert "typ srflx" not in sdp
    assert took < 2.0  # aiortc's public-STUN default stalls ~5 s here
