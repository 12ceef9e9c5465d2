"""G.711 µ-law and A-law codecs (ITU-T G.711) as numpy lookup tables; no dependency on audioop.

Encoding indexes a 65 536-entry table by the 16-bit sample; decoding indexes a 256-entry table.
Both tables are built once at import, vectorised, in a few milliseconds.
"""

from __future__ import annotations

import numpy as np

_BIAS = 0x84


def _build_ulaw_encode_table() -> np.ndarray:
    # Sun's reference g711.c (also what audioop did): work on the 14-bit sample.
    x = np.arange(-32768, 32768, dtype=np.int32)
    v = x >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.where(v < 0, -v, v), 8159) + (_BIAS >> 2)
    seg_end = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    seg = np.searchsorted(seg_end, v, side="left")
    code = np.where(seg >= 8, 0x7F ^ mask, ((seg << 4) | ((v >> (np.minimum(seg, 7) + 1)) & 0x0F)) ^ mask) & 0xFF
    table = np.empty(65536, dtype=np.uint8)
    table[x.astype(np.uint16)] = code  # indexed by the sample's bit pattern
    return table


def _build_ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def _build_alaw_encode_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32)
    v = x >> 3  # 13-bit
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg_end = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    seg = np.searchsorted(seg_end, v, side="left")
    aval = seg << 4
    low = np.where(seg < 2, (v >> 1) & 0x0F, (v >> np.maximum(seg, 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F ^ mask, (aval | low) ^ mask) & 0xFF
    table = np.empty(65536, dtype=np.uint8)
    table[x.astype(np.uint16)] = code
    return table


def _build_alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_ENCODE = _build_ulaw_encode_table()
ULAW_DECODE = _build_ulaw_decode_table()
ALAW_ENCODE = _build_alaw_encode_table()
ALAW_DECODE = _build_alaw_decode_table()

ULAW_SILENCE = int(ULAW_ENCODE[0])  # 0xFF
ALAW_SILENCE = int(ALAW_ENCODE[0])  # 0xD5


def _as_int16(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(pcm, np.ndarray):
        return pcm.astype(np.int16, copy=False)
    return np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)


def ulaw_encode(pcm: bytes | np.ndarray) -> bytes:
    """16-bit little-endian PCM (or an int16 array) to µ-law bytes."""
    return ULAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """µ-law bytes to an int16 array."""
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(pcm: bytes | np.ndarray) -> bytes:
    return ALAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    return ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


class G711Codec:
    """One G.711 variant, named as in SDP (``PCMU`` or ``PCMA``), with its static payload type."""

    def __init__(self, name: str) -> None:
        name = name.upper()
        if name not in ("PCMU", "PCMA"):
            raise ValueError(f"not a G.711 codec: {name}")
        self.name = name
        self.payload_type = 0 if name == "PCMU" else 8
        self.sample_rate = 8000
        self._encode_table = ULAW_ENCODE if name == "PCMU" else ALAW_ENCODE
        self._decode_table = ULAW_DECODE if name == "PCMU" else ALAW_DECODE
        self.silence_byte = ULAW_SILENCE if name == "PCMU" else ALAW_SILENCE

    def encode(self, pcm: bytes | np.ndarray) -> bytes:
        return self._encode_table[_as_int16(pcm).view(np.uint16)].tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        return self._decode_table[np.frombuffer(data, dtype=np.uint8)]

    def __repr__(self) -> str:
        return f"G711Codec({self.name!r})"
