"""One call's RTP endpoint: receive, reorder, decode and frame the caller's audio; send ours paced at 20 ms.

Symmetric RTP: we send to the address the caller's RTP actually comes from (latched on the first
valid packet), not only to the address in the SDP, which is often wrong behind NAT.

Not a reflector: an answered call sends nothing to the address its SDP names until the caller
confirmed it (the ACK of our 200 OK, ``confirm()``); before that, only to a source that sent us
valid RTP from the signalling peer's or the SDP's host. Once latched, another source takes over
only after the latched one has been silent for ``RELATCH_AFTER_S`` and the newcomer has sent
``RELATCH_PACKETS`` valid packets in a row with one SSRC: a single spoofed packet moves nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ipaddress
import random
import secrets
import socket
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .audio import FRAME_BYTES, FRAME_SAMPLES, to_int16
from .dtmf import DtmfDecoder
from .g711 import G711Codec
from .rtp import ReorderBuffer, RtpPacket, RtpParseError, build_rtp, parse_rtp

log = logging.getLogger("telephony.rtp")

FRAME_S = 0.020
RELATCH_AFTER_S = 2.0  # accept a new source once the latched one has been silent this long
RELATCH_PACKETS = 3  # ... and the new source has sent this many valid packets in a row (one SSRC)
MAX_RTP_DATAGRAM = 2048


class Playback:
    """Audio queued for sending; ``await wait()`` returns True when it was sent in full, False if stopped."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = samples
        self.position = 0
        self._finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._finished.done()

    def _finish(self, completed: bool) -> None:
        if not self._finished.done():
            self._finished.set_result(completed)

    async def wait(self) -> bool:
        return await asyncio.shield(self._finished)


@dataclass
class MediaStats:
    received: int = 0
    sent: int = 0
    frames_delivered: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    ssrc_changes: int = 0
    max_late_ms: float = 0.0  # how far behind its 20 ms schedule the sender ever fell
    send_errors: int = 0  # datagrams the socket refused to send
    audio_received: int = 0  # the caller's audio packets accepted (DTMF and dropped ones not counted)
    lost: int = 0  # audio packets the reorder buffer gave up waiting for
    jitter_s: float = 0.0  # RFC 3550 interarrival jitter of the caller's audio, now
    max_jitter_s: float = 0.0  # ... its highest value so far


class MediaStream(asyncio.DatagramProtocol):
    """RTP for one call.

    Args:
        codec: the negotiated G.711 codec.
        dtmf_payload_type: the telephone-event payload type, if negotiated.
        remote: where the SDP says to send (None while on hold); replaced by the latched source.
        on_audio: called with each 20 ms frame of 16-bit PCM (320 bytes) from the caller.
        on_dtmf: called with each key the caller pressed.
        send_silence: keep sending silence between playbacks (keeps NAT bindings and carrier
            media timers happy); when False, nothing is sent while idle and each talkspurt
            starts with the marker bit.
        reorder_window: how many later packets to hold while waiting for a missing one.
        confirmed: whether the far end has confirmed the session (our ACK was received, or we sent
            it: outbound calls). Until ``confirm()``, nothing is sent to ``remote``.
        trusted_hosts: hosts whose RTP may be latched before the session is confirmed (the
            signalling peer's and the SDP's).
    """

    def __init__(self, *, codec: G711Codec, dtmf_payload_type: int | None, remote: tuple[str, int] | None,
                 on_audio: Callable[[bytes], None], on_dtmf: Callable[[str], None],
                 send_silence: bool = True, reorder_window: int = 3, label: str = "",
                 confirmed: bool = True, trusted_hosts: tuple[str, ...] = ()) -> None:
        self.codec = codec
        self.dtmf_payload_type = dtmf_payload_type
        self.remote = remote
        self.send_enabled = True
        self.receive_enabled = True
        self._on_audio = on_audio
        self._on_dtmf = on_dtmf
        self.send_silence = send_silence
        self.label = label
        self.stats = MediaStats()
        self._transport: asyncio.DatagramTransport | None = None
        self.local_port: int | None = None
        self.confirmed = confirmed
        self.trusted_hosts = {h.strip("[]") for h in trusted_hosts if h}
        self.family: int | None = None  # the RTP socket's address family, once open
        self._latched: tuple[str, int] | None = None
        self._latched_at = 0.0
        self._candidate: tuple[tuple[str, int], int] | None = None  # (source, ssrc) on probation
        self._candidate_packets = 0
        self._audio_ssrc: int | None = None
        self._last_arrival: tuple[float, int] | None = None  # (loop time, RTP timestamp) of the last audio packet
        self._reorder = ReorderBuffer(window=reorder_window)
        self._dtmf = DtmfDecoder()
        self._pending = bytearray()
        self._playbacks: collections.deque[Playback] = collections.deque()
        self._ssrc = secrets.randbits(32)
        self._seq = secrets.randbits(16)
        self._ts = secrets.randbits(32)
        self._first_packet = True
        self._idle = True
        self._pacer: asyncio.Task | None = None
        self.last_received_at: float | None = None
        # Called once per 20 ms tick with the frame sent (None: silence), e.g. to record our leg.
        self.on_sent: Callable[[np.ndarray | None], None] | None = None

    # lifecycle -----------------------------------------------------------------------------
    async def open(self, host: str, port_range: tuple[int, int] | None) -> int:
        """Bind a UDP socket (an even port in ``port_range``, or any free port) and return its port."""
        loop = asyncio.get_running_loop()
        if port_range is None:
            candidates = [0]
        else:
            lo, hi = port_range
            evens = range(lo + (lo & 1), hi + 1, 2)
            candidates = random.sample(evens, min(64, len(evens)))
        last_error: OSError | None = None
        for port in candidates:
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
            except OSError as exc:
                last_error = exc
                continue
            self._transport = transport  # type: ignore[assignment]
            self.local_port = transport.get_extra_info("sockname")[1]
            sock = transport.get_extra_info("socket")
            self.family = sock.family if sock is not None else None
            return self.local_port  # type: ignore[return-value]
        raise OSError(f"no free RTP port in {port_range}: {last_error}")

    def can_reach(self, address: str | None) -> bool:
        """Whether this stream's socket can send to ``address`` (an IP literal; None: on hold)."""
        if address is None:
            return True
        try:
            version = ipaddress.ip_address(address.strip("[]")).version
        except ValueError:
            return False  # names are never resolved for media
        if self.family is None:
            return False
        return (self.family == socket.AF_INET and version == 4) or (self.family == socket.AF_INET6 and version == 6)

    def confirm(self) -> None:
        """The far end confirmed the session (ACK): media may now go to the address its SDP names."""
        self.confirmed = True

    def start(self) -> None:
        """Start the 20 ms sender."""
        if self._pacer is None and self._transport is not None:
            self.last_received_at = asyncio.get_running_loop().time()
            self._pacer = asyncio.get_running_loop().create_task(self._pace(), name=f"rtp-pacer-{self.label}")

    async def close(self) -> None:
        """Stop sending and close the socket; never raises (a failed sender must not keep a call alive)."""
        self.stop_playback()
        try:
            if self._pacer is not None:
                self._pacer.cancel()
                try:
                    await self._pacer
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("rtp[%s]: the sender had failed", self.label)
                self._pacer = None
        finally:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    # outbound ------------------------------------------------------------------------------
    def play(self, audio: bytes | np.ndarray) -> Playback:
        playback = Playback(to_int16(audio))
        if playback.samples.size == 0:
            playback._finish(True)
        else:
            self._playbacks.append(playback)
        return playback

    def stop_playback(self) -> None:
        while self._playbacks:
            self._playbacks.popleft()._finish(False)

    @property
    def is_playing(self) -> bool:
        return bool(self._playbacks)

    def _next_frame(self) -> np.ndarray | None:
        if not self._playbacks:
            return None
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self._playbacks:
            pb = self._playbacks[0]
            take = min(FRAME_SAMPLES - filled, pb.samples.size - pb.position)
            frame[filled : filled + take] = pb.samples[pb.position : pb.position + take]
            pb.position += take
            filled += take
            if pb.position >= pb.samples.size:
                self._playbacks.popleft()._finish(True)
        return frame

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        silence = bytes([self.codec.silence_byte]) * FRAME_SAMPLES
        while True:
            frame = self._next_frame()
            if frame is not None:
                payload = self.codec.encode(frame)
                if self._idle and not self.send_silence:
                    self._first_packet = True  # a new talkspurt after silence
                self._idle = False
            else:
                payload = silence if self.send_silence else None
                self._idle = True
            if payload is not None and self.send_enabled:
                self._send_rtp(payload)
            if self.on_sent is not None:
                try:
                    self.on_sent(frame)
                except Exception:  # a failing tap (disk full) must not stop the call's audio
                    log.exception("media %s: on_sent tap failed; detached", self.label)
                    self.on_sent = None
            self._ts = (self._ts + FRAME_SAMPLES) & 0xFFFFFFFF
            deadline += FRAME_S
            late = loop.time() - deadline
            if late > 0:
                self.stats.max_late_ms = max(self.stats.max_late_ms, late * 1000)
                if late > 0.2:  # the loop stalled: skip the lost time instead of bursting packets
                    skipped = int(late / FRAME_S)
                    deadline += skipped * FRAME_S
                    self._ts = (self._ts + skipped * FRAME_SAMPLES) & 0xFFFFFFFF
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    @property
    def target(self) -> tuple[str, int] | None:
        """Where our RTP goes now: the latched source, else (once confirmed) the SDP's address."""
        return self._latched or (self.remote if self.confirmed else None)

    def _send_rtp(self, payload: bytes) -> None:
        target = self.target
        if target is None or self._transport is None:
            return
        packet = build_rtp(self.codec.payload_type, self._seq, self._ts, self._ssrc, payload, marker=self._first_packet)
        self._first_packet = False
        self._seq = (self._seq + 1) & 0xFFFF
        try:
            self._transport.sendto(packet, target)
        except (OSError, ValueError, TypeError) as exc:  # e.g. an address of the other family
            self.stats.send_errors += 1
            if self.stats.send_errors == 1:
                log.warning("rtp[%s]: cannot send to %s: %s", self.label, target, exc)
            return
        self.stats.sent += 1

    # inbound -------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        try:
            self._receive(data, (addr[0], addr[1]))
        except Exception:  # a hostile packet must never stop the stream
            self.stats.dropped["error"] += 1
            log.exception("rtp[%s]: packet handling failed", self.label)

    def _receive(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_RTP_DATAGRAM:
            self.stats.dropped["oversized"] += 1
            return
        packet = parse_rtp(data)
        if isinstance(packet, RtpParseError):
            self.stats.dropped[packet.reason] += 1
            return
        pt = packet.payload_type
        if pt != self.codec.payload_type and pt != self.dtmf_payload_type:
            self.stats.dropped["comfort noise" if pt == 13 else "unknown payload type"] += 1
            return
        now = asyncio.get_running_loop().time()
        if self._latched != addr and not self._may_latch(addr, packet.ssrc, now):
            self.stats.dropped["unexpected source"] += 1
            return
        self._latched_at = now
        self._candidate = None  # the latched source spoke: a newcomer starts its probation again
        self.last_received_at = now
        self.stats.received += 1
        if not self.receive_enabled:
            return
        if pt == self.dtmf_payload_type:
            for digit in self._dtmf.feed(packet.timestamp, packet.payload):
                self._on_dtmf(digit)
            return
        if packet.ssrc != self._audio_ssrc:
            if self._audio_ssrc is not None:
                self.stats.ssrc_changes += 1
            self._audio_ssrc = packet.ssrc
            self._reorder.reset()
            self._last_arrival = None
        self._jitter(now, packet.timestamp)
        self.stats.audio_received += 1
        for ordered in self._reorder.push(packet):
            self._deliver(ordered)
        self.stats.lost = self._reorder.lost

    def _jitter(self, now: float, timestamp: int) -> None:
        """RFC 3550 section 6.4.1: J += (|D| - J) / 16, D the change in transit time between two packets.
        A jump of more than a second (a sender that restarted its clock) is a discontinuity, not jitter."""
        last, self._last_arrival = self._last_arrival, (now, timestamp)
        if last is None:
            return
        sent = (((timestamp - last[1]) + 0x80000000) & 0xFFFFFFFF) - 0x80000000  # 32-bit wrap
        d = abs((now - last[0]) - sent / self.codec.sample_rate)
        if d > 1.0:
            return
        stats = self.stats
        stats.jitter_s += (d - stats.jitter_s) / 16
        stats.max_jitter_s = max(stats.max_jitter_s, stats.jitter_s)

    def _may_latch(self, addr: tuple[str, int], ssrc: int, now: float) -> bool:
        """Whether a valid packet from ``addr`` (not the latched source) makes it the media peer."""
        if self._latched is None:
            if not self.confirmed and addr[0] not in self.trusted_hosts:
                return False  # before the ACK only the caller's own hosts can start our media
            self._latched = addr
            return True
        if now - self._latched_at < RELATCH_AFTER_S:
            return False
        if self._candidate != (addr, ssrc):
            self._candidate = (addr, ssrc)
            self._candidate_packets = 0
        self._candidate_packets += 1
        if self._candidate_packets < RELATCH_PACKETS:
            return False
        log.info("rtp[%s]: media source moved to %s:%s", self.label, *addr)
        self._latched = addr
        self._candidate = None
        return True

    def _deliver(self, packet: RtpPacket) -> None:
        self._pending += self.codec.decode(packet.payload).astype("<i2").tobytes()
        while len(self._pending) >= FRAME_BYTES:
            frame = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            self.stats.frames_delivered += 1
            self._on_audio(frame)

    @property
    def reorder_stats(self) -> dict[str, int]:
        return {"lost": self._reorder.lost, "late": self._reorder.late, "reordered": self._reorder.reordered}

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        log.debug("rtp[%s]: %s", self.label, exc)
