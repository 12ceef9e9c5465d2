"""SDP offer/answer (RFC 4566, RFC 3264) for one G.711 audio stream plus RFC 4733 telephone-event.

``parse_sdp`` never raises; ``negotiate`` picks PCMU or PCMA in the offerer's order of preference;
``build_answer`` mirrors every offered m= line, accepting the first usable audio one; ``build_offer``
is our offer when we place a call (PCMU, PCMA, telephone-event).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

SUPPORTED_CODECS = ("PCMU", "PCMA")
_STATIC_PT = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 3: ("GSM", 8000), 4: ("G723", 8000), 9: ("G722", 8000),
              13: ("CN", 8000), 18: ("G729", 8000)}
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
MAX_SDP_BYTES = 16384
OFFER_DTMF_PAYLOAD_TYPE = 101  # telephone-event in our own offers


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    ptime: int | None = None
    direction: str | None = None

    def codec_of(self, pt: int) -> tuple[str, int] | None:
        if pt in self.rtpmap:
            return self.rtpmap[pt]
        return _STATIC_PT.get(pt)


@dataclass
class SessionDescription:
    origin: str = ""
    connection: str | None = None
    media: list[MediaDescription] = field(default_factory=list)
    direction: str | None = None


@dataclass(frozen=True)
class SdpError:
    reason: str


@dataclass(frozen=True)
class Negotiated:
    """What both sides agreed for the audio stream."""

    media_index: int
    codec: str  # PCMU or PCMA
    payload_type: int
    dtmf_payload_type: int | None
    remote_address: str | None  # None when the offer puts the stream on hold (c=0.0.0.0)
    remote_port: int
    ptime: int
    direction: str  # our direction, as written in the answer


class NotAcceptable(Exception):
    pass


def _connection_address(value: str) -> str | None:
    parts = value.split()
    if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise ValueError(f"bad c= line: {value!r}")
    addr = parts[2].split("/")[0]
    ipaddress.ip_address(addr)  # raises ValueError for names: we do not resolve them for media
    return addr


def parse_sdp(data: bytes | str) -> SessionDescription | SdpError:
    try:
        if isinstance(data, bytes):
            if len(data) > MAX_SDP_BYTES:
                return SdpError("SDP too large")
            data = data.decode("utf-8")
        return _parse(data)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        return SdpError(str(exc)[:200])


def _parse(text: str) -> SessionDescription | SdpError:
    sd = SessionDescription()
    current: MediaDescription | None = None
    seen_v = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            return SdpError(f"bad line {line[:40]!r}")
        kind, value = line[0], line[2:]
        if not seen_v:
            if kind != "v" or value.strip() != "0":
                return SdpError("SDP must start with v=0")
            seen_v = True
            continue
        if kind == "o":
            sd.origin = value
        elif kind == "c":
            addr = _connection_address(value)
            if current is None:
                sd.connection = addr
            else:
                current.connection = addr
        elif kind == "m":
            parts = value.split()
            if len(parts) < 4:
                return SdpError("bad m= line")
            port = int(parts[1].split("/")[0])
            if not 0 <= port <= 65535:
                return SdpError("bad m= port")
            current = MediaDescription(parts[0], port, parts[2], parts[3:])
            sd.media.append(current)
            if len(sd.media) > 16:
                return SdpError("too many m= lines")
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in _DIRECTIONS:
                if current is None:
                    sd.direction = name
                else:
                    current.direction = name
            elif current is None:
                continue
            elif name == "rtpmap":
                pt_s, _, enc = arg.partition(" ")
                enc_parts = enc.strip().split("/")
                if len(enc_parts) < 2:
                    return SdpError("bad rtpmap")
                current.rtpmap[int(pt_s)] = (enc_parts[0], int(enc_parts[1]))
            elif name == "fmtp":
                pt_s, _, params = arg.partition(" ")
                current.fmtp[int(pt_s)] = params.strip()
            elif name == "ptime":
                current.ptime = int(float(arg))
    if not seen_v:
        return SdpError("empty SDP")
    return sd


def negotiate(offer: SessionDescription) -> Negotiated:
    """Choose the first audio stream offering PCMU or PCMA; raise NotAcceptable otherwise."""
    for index, m in enumerate(offer.media):
        if m.media != "audio" or m.port == 0 or m.proto.upper() != "RTP/AVP":
            continue
        chosen: tuple[str, int] | None = None
        dtmf: int | None = None
        for fmt in m.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            codec = m.codec_of(pt)
            if codec is None:
                continue
            name, rate = codec[0].upper(), codec[1]
            if chosen is None and name in SUPPORTED_CODECS and rate == 8000:
                chosen = (name, pt)
            elif dtmf is None and name == "TELEPHONE-EVENT" and rate == 8000:
                dtmf = pt
        if chosen is None:
            continue
        address = m.connection or offer.connection
        if address is None:
            raise NotAcceptable("no connection address")
        if address in ("0.0.0.0", "::"):
            address = None
        remote_dir = m.direction or offer.direction or "sendrecv"
        ours = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}[remote_dir]
        return Negotiated(index, chosen[0], chosen[1], dtmf, address, m.port, 20, ours)
    raise NotAcceptable("no PCMU or PCMA audio stream offered")


def session_lines(*, address: str, session_id: int, version: int) -> list[str]:
    """The session part of every SDP body this endpoint sends (offers and answers)."""
    ip_kind = "IP6" if ":" in address else "IP4"
    return [
        "v=0",
        f"o=xiaozhi {session_id} {version} IN {ip_kind} {address}",
        "s=xiaozhi",
        f"c=IN {ip_kind} {address}",
        "t=0 0",
    ]


def build_offer(*, address: str, port: int, session_id: int, version: int = 1) -> bytes:
    """Our offer for a call we place: PCMU, then PCMA, and telephone-event/8000, sendrecv."""
    pt = OFFER_DTMF_PAYLOAD_TYPE
    lines = session_lines(address=address, session_id=session_id, version=version) + [
        f"m=audio {port} RTP/AVP 0 8 {pt}", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
        f"a=rtpmap:{pt} telephone-event/8000", f"a=fmtp:{pt} 0-16", "a=ptime:20", "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def build_answer(offer: SessionDescription, agreed: Negotiated, *, address: str, port: int,
                 session_id: int, version: int) -> bytes:
    lines = session_lines(address=address, session_id=session_id, version=version)
    for index, m in enumerate(offer.media):
        if index != agreed.media_index:
            lines.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats[:1]) or '0'}")
            continue
        fmts = [str(agreed.payload_type)]
        if agreed.dtmf_payload_type is not None:
            fmts.append(str(agreed.dtmf_payload_type))
        lines.append(f"m=audio {port} RTP/AVP {' '.join(fmts)}")
        lines.append(f"a=rtpmap:{agreed.payload_type} {agreed.codec}/8000")
        if agreed.dtmf_payload_type is not None:
            lines.append(f"a=rtpmap:{agreed.dtmf_payload_type} telephone-event/8000")
            lines.append(f"a=fmtp:{agreed.dtmf_payload_type} 0-16")
        lines.append(f"a=ptime:{agreed.ptime}")
        lines.append(f"a={agreed.direction}")
    return ("\r\n".join(lines) + "\r\n").encode()
