"""The phone channel's building blocks: G.711, RTP, RFC 4733 DTMF, SDP offer/answer, SIP parsing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from telephony.audio import load_wav, resample, rms, tone
from telephony.dtmf import DtmfDecoder, build_telephone_event
from telephony.g711 import G711Codec, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from telephony.privacy import mask_number
from telephony.rtp import ReorderBuffer, RtpPacket, RtpParseError, build_rtp, parse_rtp
from telephony.sdp import NotAcceptable, SdpError, build_answer, negotiate, parse_sdp
from telephony.sip_message import (
    SipParseError, SipRequest, SipResponse, build_response, parse_message, parse_name_addr, parse_uri,
    parse_via, split_comma_values,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # removed in 3.13; only the reference for these tests
    except ImportError:
        audioop = None

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.skipif(audioop is None, reason="audioop (the reference) is gone in this Python")
def test_g711_tables_match_the_reference_implementation_bit_for_bit() -> None:
    pcm = ALL_SAMPLES.tobytes()
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)
    assert alaw_encode(pcm) == audioop.lin2alaw(pcm, 2)
    every_code = bytes(range(256))
    assert ulaw_decode(every_code).tobytes() == audioop.ulaw2lin(every_code, 2)
    assert alaw_decode(every_code).tobytes() == audioop.alaw2lin(every_code, 2)


@pytest.mark.parametrize("name", ["PCMU", "PCMA"])
def test_g711_round_trip_keeps_speech_level_audio_within_its_quantisation(name: str) -> None:
    codec = G711Codec(name)
    signal = tone(440, 0.5, amplitude=0.5)
    back = codec.decode(codec.encode(signal)).astype(np.int32)
    err = np.abs(back - signal.astype(np.int32))
    assert err.max() <= 1024  # G.711's largest step at full scale
    snr = 10 * np.log10(np.mean(signal.astype(float) ** 2) / np.mean(err.astype(float) ** 2))
    assert snr > 30
    assert codec.encode(np.zeros(160, np.int16)) == bytes([codec.silence_byte]) * 160


def test_rtp_round_trip_with_csrc_extension_and_padding() -> None:
    raw = bytearray(build_rtp(0, 65535, 4294967200, 0xDEADBEEF, b"\xff" * 160, marker=True))
    packet = parse_rtp(bytes(raw))
    assert packet == RtpPacket(0, 65535, 4294967200, 0xDEADBEEF, b"\xff" * 160, True)
    # one CSRC, a one-word extension and 4 bytes of padding around a 3-byte payload
    fancy = bytes([0x80 | 0x20 | 0x10 | 1, 8]) + b"\x00\x01" + b"\x00" * 8 + b"\x00\x00\x00\x09" + \
        b"\xbe\xde\x00\x01" + b"\x00" * 4 + b"abc" + b"\x00\x00\x00\x04"
    packet = parse_rtp(fancy)
    assert isinstance(packet, RtpPacket) and packet.payload == b"abc" and packet.payload_type == 8


@pytest.mark.parametrize("garbage, reason", [
    (b"", "short packet"), (b"\x80\x00", "short packet"), (b"\x40" + b"\x00" * 20, "not RTP version 2"),
    (b"\x80\xc8" + b"\x00" * 30, "RTCP packet on the RTP port"), (b"\x8f" + b"\x00" * 20, "header longer than packet"),
])
def test_rtp_garbage_is_an_error_result(garbage: bytes, reason: str) -> None:
    assert parse_rtp(garbage) == RtpParseError(reason)


def packets(*seqs: int) -> list[RtpPacket]:
    return [RtpPacket(0, s & 0xFFFF, s * 160, 1, b"") for s in seqs]


def test_reorder_buffer_puts_swapped_packets_back_in_order_across_wraparound() -> None:
    buf = ReorderBuffer(window=3)
    out = []
    for p in packets(65534, 0, 65535, 1, 2):
        out += [q.sequence for q in buf.push(p)]
    assert out == [65534, 65535, 0, 1, 2]
    assert buf.reordered == 1


def test_reorder_buffer_skips_a_lost_packet_after_the_window_and_drops_late_and_duplicate_ones() -> None:
    buf = ReorderBuffer(window=2)
    out = []
    for p in packets(10, 12, 13, 14, 11, 14, 15):
        out += [q.sequence for q in buf.push(p)]
    assert out == [10, 12, 13, 14, 15]
    assert buf.lost == 1 and buf.late == 2


def test_dtmf_decoder_reports_each_key_once_despite_three_end_packets() -> None:
    dec = DtmfDecoder()
    digits = []
    for ts, event in ((1000, 1), (5000, 11)):
        for d in range(160, 800, 160):
            digits += dec.feed(ts, build_telephone_event(event, end=False, duration=d))
        for _ in range(3):
            digits += dec.feed(ts, build_telephone_event(event, end=True, duration=800))
    assert digits == ["1", "#"]


def test_dtmf_decoder_still_reports_a_key_whose_end_packets_were_lost() -> None:
    dec = DtmfDecoder()
    assert dec.feed(1000, build_telephone_event(5, end=False, duration=160)) == []
    assert dec.feed(2000, build_telephone_event(6, end=False, duration=160)) == ["5"]
    assert dec.feed(2000, build_telephone_event(6, end=True, duration=320)) == ["6"]
    assert dec.feed(2000, b"\x06") == []  # truncated payloads are ignored


OFFER = (
    "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 18 8 0 96\r\na=rtpmap:18 G729/8000\r\na=rtpmap:96 telephone-event/8000\r\n"
    "a=fmtp:96 0-15\r\na=sendrecv\r\nm=video 4002 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\n"
)


def test_negotiation_follows_the_offerers_preference_and_keeps_telephone_event() -> None:
    offer = parse_sdp(OFFER.encode())
    agreed = negotiate(offer)
    assert (agreed.codec, agreed.payload_type, agreed.dtmf_payload_type) == ("PCMA", 8, 96)
    assert (agreed.remote_address, agreed.remote_port) == ("10.0.0.5", 4000)
    answer = build_answer(offer, agreed, address="192.0.2.1", port=12000, session_id=7, version=1).decode()
    assert "m=audio 12000 RTP/AVP 8 96\r\n" in answer
    assert "a=rtpmap:96 telephone-event/8000" in answer and "a=ptime:20" in answer
    assert "m=video 0 RTP/AVP 97" in answer  # every offered stream gets an m= line
    assert "c=IN IP4 192.0.2.1" in answer


def test_dynamic_pcmu_hold_and_direction_are_understood() -> None:
    sdp = "v=0\r\nc=IN IP4 0.0.0.0\r\nm=audio 5000 RTP/AVP 110\r\na=rtpmap:110 pcmu/8000\r\na=sendonly\r\n"
    agreed = negotiate(parse_sdp(sdp))
    assert agreed.codec == "PCMU" and agreed.payload_type == 110
    assert agreed.remote_address is None and agreed.direction == "recvonly"


@pytest.mark.parametrize("sdp", [
    "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n",
    "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 5000 RTP/SAVP 0\r\n",
    "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 0 RTP/AVP 0\r\n",
    "v=0\r\nc=IN IP4 1.2.3.4\r\nm=video 5000 RTP/AVP 0\r\n",
])
def test_offers_without_usable_g711_are_not_acceptable(sdp: str) -> None:
    with pytest.raises(NotAcceptable):
        negotiate(parse_sdp(sdp))


@pytest.mark.parametrize("sdp", [b"", b"x=1", b"v=0\r\nc=IN IP4 not-an-ip\r\n", b"v=0\r\nm=audio x RTP/AVP 0\r\n",
                                 b"v=0\r\nm=audio 5\r\n", b"\xff\xfe"])
def test_bad_sdp_is_an_error_result(sdp: bytes) -> None:
    assert isinstance(parse_sdp(sdp), SdpError)


INVITE = (
    "INVITE sip:12393@10.0.0.1:5060;user=phone SIP/2.0\r\n"
    "v: SIP/2.0/UDP 10.0.0.9:5062;branch=z9hG4bK776;rport, SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKa\r\n"
    "Max-Forwards: 70\r\n"
    'f: "张三, 先生" <sip:+8613812345678@carrier.example>;tag=abc\r\n'
    "t: <tel:12393>\r\n"
    "i: call-1@10.0.0.9\r\n"
    "CSeq: 7 INVITE\r\n"
    "Record-Route: <sip:p1.example;lr>,\r\n <sip:p2.example;lr>\r\n"
    "m: <sip:caller@10.0.0.9:5062>\r\n"
    "c: application/sdp\r\n"
    "l: 4\r\n\r\nv=0\r\nEXTRA"
)


def test_sip_request_with_compact_folded_and_multi_value_headers() -> None:
    msg = parse_message(INVITE.encode())
    assert isinstance(msg, SipRequest) and msg.method == "INVITE"
    assert msg.body == b"v=0\r"  # Content-Length wins over trailing bytes
    assert msg.cseq == (7, "INVITE") and msg.call_id == "call-1@10.0.0.9"
    vias = msg.vias
    assert [v.host for v in vias] == ["10.0.0.9", "[2001:db8::1]"] and "rport" in vias[0].params
    assert msg.from_.display == "张三, 先生" and msg.from_.uri.user == "+8613812345678" and msg.from_.tag == "abc"
    assert msg.to.uri.scheme == "tel" and msg.to.uri.user == "12393"
    assert msg.request_uri.user == "12393" and msg.request_uri.params == {"user": "phone"}
    assert msg.headers.get_all("record-route") == ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
    response = build_response(msg, 200, to_tag="xyz", copy_record_route=True)
    again = parse_message(response.to_bytes())
    assert isinstance(again, SipResponse) and again.status == 200
    assert parse_name_addr(again.headers.get("to")).tag == "xyz"
    assert again.headers.get_all("record-route") == ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
    assert len(again.headers.get_all("via")) == 2


@pytest.mark.parametrize("mutate, replyable", [
    (lambda m: m.replace("CSeq: 7 INVITE", "CSeq: 7 BYE"), True),
    (lambda m: m.replace("CSeq: 7 INVITE", "CSeq: seven INVITE"), True),
    (lambda m: m.replace("l: 4", "l: 400"), True),
    (lambda m: m.replace("i: call-1@10.0.0.9\r\n", ""), False),
    (lambda m: m.replace("SIP/2.0\r\n", "SIP/3.0\r\n", 1), False),
    (lambda m: m.replace("Max-Forwards: 70", "Max-Forwards: lots"), True),
    (lambda m: "garbage\r\n\r\n", False),
])
def test_malformed_requests_are_errors_that_say_whether_a_400_is_possible(mutate, replyable: bool) -> None:
    result = parse_message(mutate(INVITE).encode())
    assert isinstance(result, SipParseError)
    assert result.can_reply is replyable


def test_uri_and_header_helpers() -> None:
    assert split_comma_values('"a, b" <sip:x@y>, <sip:z@w;p=1,2>') == ['"a, b" <sip:x@y>', "<sip:z@w;p=1,2>"]
    assert parse_uri("sips:alice:pw@[::1]:5061;transport=tls?subject=x").port == 5061
    assert parse_via("SIP/2.0/UDP host.example;branch=z9hG4bKx;received=1.2.3.4").sent_by == "host.example:5060"
    for bad in ("http://x", "sip:", "sip:user@host:99999"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_phone_numbers_are_masked_for_logs_but_service_numbers_are_not() -> None:
    assert mask_number("13812345678") == "138******78"
    assert mask_number("sip:+8657187654321@x") == "sip:+86*********21@x"
    assert mask_number("12393") == "12393"


def test_prompt_audio_is_resampled_to_8k(tmp_path) -> None:
    import wave

    samples = (np.sin(2 * np.pi * 440 * np.arange(22050) / 22050) * 10000).astype(np.int16)
    path = tmp_path / "p.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(np.repeat(samples, 2).tobytes())
    loaded = load_wav(path)
    assert loaded.size == 8000
    spectrum = np.abs(np.fft.rfft(loaded[1000:7000]))
    assert abs(np.argmax(spectrum) * 8000 / 6000 - 440) < 3
    assert 6000 < rms(loaded) < 8000
    assert resample(np.zeros(0, np.int16), 16000).size == 0
