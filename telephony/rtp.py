"""RTP packets (RFC 3550): parse and build the fixed header, and put packets back in sequence order.

Parsing never raises: garbage yields an :class:`RtpParseError` describing why it was dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
_HEADER = struct.Struct("!BBHII")


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    def to_bytes(self) -> bytes:
        return build_rtp(self.payload_type, self.sequence, self.timestamp, self.ssrc, self.payload, marker=self.marker)


@dataclass(frozen=True, slots=True)
class RtpParseError:
    reason: str


def build_rtp(payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes, *, marker: bool = False) -> bytes:
    return (
        _HEADER.pack(
            RTP_VERSION << 6,
            (0x80 if marker else 0) | (payload_type & 0x7F),
            sequence & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            ssrc & 0xFFFFFFFF,
        )
        + payload
    )


def parse_rtp(data: bytes) -> RtpPacket | RtpParseError:
    """One RTP packet, honouring CSRCs, the header extension and padding."""
    if len(data) < _HEADER.size:
        return RtpParseError("short packet")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        return RtpParseError("not RTP version 2")
    pt = b1 & 0x7F
    if 72 <= pt <= 76:
        return RtpParseError("RTCP packet on the RTP port")
    offset = _HEADER.size + 4 * (b0 & 0x0F)
    end = len(data)
    if b0 & 0x10:  # header extension
        if offset + 4 > end:
            return RtpParseError("truncated header extension")
        (ext_words,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * ext_words
    if b0 & 0x20:  # padding: the last byte says how much
        if end == 0 or data[-1] == 0:
            return RtpParseError("bad padding")
        end -= data[-1]
    if offset > end:
        return RtpParseError("header longer than packet")
    return RtpPacket(pt, seq, ts, ssrc, bytes(data[offset:end]), bool(b1 & 0x80))


def seq_diff(a: int, b: int) -> int:
    """a - b in 16-bit sequence space, in [-32768, 32767]."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


class ReorderBuffer:
    """Releases packets in sequence order, waiting for a missing one for at most ``window`` later packets.

    Duplicates and packets older than what was already released are dropped. A jump of more
    than ``resync_gap`` (a restarted sender) starts over from the new sequence number.
    """

    def __init__(self, window: int = 3, resync_gap: int = 1000) -> None:
        self.window = window
        self.resync_gap = resync_gap
        self._expected: int | None = None
        self._held: dict[int, RtpPacket] = {}
        self.lost = 0
        self.late = 0
        self.reordered = 0

    def reset(self) -> None:
        self._expected = None
        self._held.clear()

    def push(self, packet: RtpPacket) -> list[RtpPacket]:
        if self._expected is None:
            self._expected = packet.sequence
        diff = seq_diff(packet.sequence, self._expected)
        if diff < 0 or packet.sequence in self._held:
            if diff < -self.resync_gap:
                self.reset()
                return self.push(packet)
            self.late += 1
            return []
        if diff > self.resync_gap:
            self.reset()
            return self.push(packet)
        if diff == 0 and self._held:
            self.reordered += 1  # this one fills a gap later packets left
        self._held[packet.sequence] = packet
        return self._release()

    def _release(self) -> list[RtpPacket]:
        out: list[RtpPacket] = []
        assert self._expected is not None
        while True:
            pkt = self._held.pop(self._expected, None)
            if pkt is not None:
                out.append(pkt)
                self._expected = (self._expected + 1) & 0xFFFF
                continue
            if len(self._held) > self.window:
                # give up on the missing packet(s): skip to the oldest one we hold
                oldest = min(self._held, key=lambda s: seq_diff(s, self._expected))  # type: ignore[arg-type]
                self.lost += seq_diff(oldest, self._expected)
                self._expected = oldest
                continue
            return out
