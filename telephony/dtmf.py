"""RFC 4733 telephone-event payloads: parse them and turn a stream of event packets into digits.

A key press arrives as a run of packets sharing one RTP timestamp; the last three carry the
end bit. The decoder reports each press once, when its first end packet arrives (or, if every
end packet was lost, when the next press starts).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EVENT_CODES = "0123456789*#ABCD"
FLASH_EVENT = 16


def event_to_digit(event: int) -> str | None:
    if 0 <= event < len(EVENT_CODES):
        return EVENT_CODES[event]
    return None


def digit_to_event(digit: str) -> int:
    return EVENT_CODES.index(digit.upper())


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str | None:
        return event_to_digit(self.event)


def parse_telephone_event(payload: bytes) -> TelephoneEvent | None:
    """The first event of an RFC 4733 payload, or None if the payload is too short."""
    if len(payload) < 4:
        return None
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return TelephoneEvent(event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration)


def build_telephone_event(event: int, *, end: bool, duration: int, volume: int = 10) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | (volume & 0x3F), duration & 0xFFFF)


class DtmfDecoder:
    """Feeds on (RTP timestamp, payload) of telephone-event packets; returns a digit once per press."""

    def __init__(self) -> None:
        self._current_ts: int | None = None
        self._current_digit: str | None = None
        self._reported = True

    def feed(self, timestamp: int, payload: bytes) -> list[str]:
        """Digits completed by this packet (usually zero or one; two when an end was lost)."""
        ev = parse_telephone_event(payload)
        if ev is None:
            return []
        digit = ev.digit
        out: list[str] = []
        if timestamp != self._current_ts:
            if not self._reported and self._current_digit is not None:
                out.append(self._current_digit)  # the previous press never got an end packet
            self._current_ts = timestamp
            self._current_digit = digit
            self._reported = False
        if ev.end and not self._reported:
            self._reported = True
            if digit is not None:
                out.append(digit)
        return out
