"""Hostile input never escapes the parsers as an exception, and never stops a running user agent."""

from __future__ import annotations

import asyncio
import os

from hypothesis import HealthCheck, example, given, settings, strategies as st

from telephony.dtmf import DtmfDecoder
from telephony.handler import DemoHandler
from telephony.rtp import ReorderBuffer, RtpPacket, RtpParseError, parse_rtp
from telephony.sdp import NotAcceptable, SdpError, SessionDescription, negotiate, parse_sdp
from telephony.sip_message import SipParseError, SipRequest, SipResponse, parse_message
from telephony.testing import SipPeer, running_user_agent

VALID_INVITE = (
    b"INVITE sip:12393@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK1;rport\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:13812345678@127.0.0.1>;tag=a\r\nTo: <sip:12393@127.0.0.1>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:x@127.0.0.1:5062>\r\n"
    b"Content-Type: application/sdp\r\nContent-Length: 96\r\n\r\n"
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
)
VALID_SDP = VALID_INVITE.split(b"\r\n\r\n", 1)[1]
TOKENS = [b"\r\n", b":", b";", b",", b"<", b">", b"\"", b"@", b" ", b"=", b"[", b"]", b"SIP/2.0", b"\x00", b"\xff",
          b"tag=", b"branch=", b"rport", b"Content-Length: 99999", b"l: -1", b"v=0", b"m=audio", b"c=IN IP6 ::"]


@st.composite
def mutated(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 20))]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _exercise_request(result) -> None:
    """Touch every accessor the user agent uses, as it would."""
    if isinstance(result, SipRequest):
        try:
            result.vias, result.from_, result.to, result.request_uri, result.cseq
        except ValueError:
            raise AssertionError("a parsed request must have valid core headers")


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_out_of_the_sip_parser(data: bytes) -> None:
    result = parse_message(data)
    assert isinstance(result, (SipRequest, SipResponse, SipParseError))
    if isinstance(result, SipParseError):
        result.can_reply


@FUZZ
@given(mutated(VALID_INVITE))
@example(VALID_INVITE.replace(b"Max-Forwards", b"Via: SIP/2.0/UDP a, SIP/x\r\nMax-Forwards"))  # explore find: bad 2nd Via
def test_mutated_invites_parse_or_fail_cleanly(data: bytes) -> None:
    result = parse_message(data)
    assert isinstance(result, (SipRequest, SipResponse, SipParseError))
    _exercise_request(result)
    if isinstance(result, SipParseError):
        result.can_reply


@FUZZ
@given(st.one_of(st.binary(max_size=1000), mutated(VALID_SDP), st.text(max_size=500)))
def test_sdp_parser_and_negotiation_never_raise_anything_else(data) -> None:
    result = parse_sdp(data)
    assert isinstance(result, (SessionDescription, SdpError))
    if isinstance(result, SessionDescription):
        try:
            negotiate(result)
        except NotAcceptable:
            pass


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_rtp_parsing_reordering_and_dtmf_never_raise(datagrams: list[bytes]) -> None:
    buf = ReorderBuffer(window=3)
    dtmf = DtmfDecoder()
    for data in datagrams:
        packet = parse_rtp(data)
        assert isinstance(packet, (RtpPacket, RtpParseError))
        if isinstance(packet, RtpPacket):
            buf.push(packet)
            dtmf.feed(packet.timestamp, packet.payload)


async def test_a_user_agent_under_a_storm_of_garbage_keeps_answering() -> None:
    async with running_user_agent(DemoHandler()) as ua:
        peer = SipPeer(ua.port)
        try:
            rng = __import__("random").Random(8)
            blobs = [os.urandom(rng.randint(0, 1400)) for _ in range(150)]
            blobs += [bytes(rng.choice(TOKENS)) * rng.randint(1, 50) for _ in range(50)]
            blobs += [VALID_INVITE[: rng.randint(0, len(VALID_INVITE))] for _ in range(50)]
            blobs.append(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n")
            for i, blob in enumerate(blobs):
                peer.send(blob)
                if i % 10 == 0:
                    await asyncio.sleep(0.005)  # do not just overflow the socket buffer
            # a broken INVITE that still names Via/From/To/Call-ID/CSeq gets a 400
            peer.send(VALID_INVITE.replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE"))
            bad = await peer.expect(400, timeout=3)
            assert bad.headers.get("call-id") == "c1"
            # and a real request afterwards is still served
            peer.send(b"OPTIONS sip:12393@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bKok\r\n"
                      b"From: <sip:pbx@127.0.0.1>;tag=1\r\nTo: <sip:12393@127.0.0.1>\r\nCall-ID: ok\r\n"
                      b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n" % peer.port)
            await peer.expect(200, timeout=3)
            assert ua.stats["dropped_oversized"] == 1
            assert ua.stats["dropped_unparseable"] > 100
        finally:
            peer.close()


async def test_rtp_garbage_on_a_live_call_is_dropped_and_the_call_goes_on() -> None:
    handler = DemoHandler(hangup_digit=None)
    async with running_user_agent(handler) as ua:
        peer = SipPeer(ua.port)
        try:
            call, ok = await peer.answered_call()
            from telephony.sdp import parse_sdp as p

            port = p(ok.body).media[0].port
            rtp_target = ("127.0.0.1", port)
            junk = [b"", b"\x00", b"\x80", os.urandom(11), b"\x40" + os.urandom(40), b"\x80\x12" + os.urandom(30),
                    b"\x8f" + os.urandom(12), b"\xa0\x00" + os.urandom(10) + b"\xff", os.urandom(3000)]
            from telephony.g711 import ulaw_encode
            from telephony.audio import tone
            from telephony.rtp import build_rtp

            audio = ulaw_encode(tone(400, 0.2, amplitude=0.5))
            for i in range(10):
                for blob in junk:
                    peer.rtp.sendto(blob, rtp_target)
                peer.rtp.sendto(build_rtp(0, i, i * 160, 77, audio[i * 160 : (i + 1) * 160]), rtp_target)
            await asyncio.sleep(0.3)
            live = next(iter(ua.calls.values()))
            assert live.media.stats.received == 10
            assert sum(live.media.stats.dropped.values()) >= 80
            record = handler.records[live.call_id]
            assert record.frames == 10 and record.voiced_frames >= 8
        finally:
            peer.close()


# -- properties: what goes in well-formed comes out the same (issue 7) --------------------------
from telephony.dtmf import EVENT_CODES, build_telephone_event  # noqa: E402
from telephony.rtp import build_rtp  # noqa: E402
from telephony.sdp import build_answer  # noqa: E402

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~", min_size=1, max_size=24)
PAYLOAD_TYPES = st.integers(0, 127).filter(lambda pt: not 72 <= pt <= 76)  # 72-76 is RTCP on the RTP port


@FUZZ
@given(pt=PAYLOAD_TYPES, seq=st.integers(0, 0xFFFF), ts=st.integers(0, 0xFFFFFFFF), ssrc=st.integers(0, 0xFFFFFFFF),
       payload=st.binary(max_size=400), marker=st.booleans())
def test_rtp_build_and_parse_round_trip(pt, seq, ts, ssrc, payload, marker) -> None:
    packet = parse_rtp(build_rtp(pt, seq, ts, ssrc, payload, marker=marker))
    assert packet == RtpPacket(pt, seq, ts, ssrc, payload, marker)
    assert parse_rtp(packet.to_bytes()) == packet


@FUZZ
@given(start=st.integers(0, 0xFFFF), count=st.integers(1, 60), data=st.data())
def test_reorder_buffer_restores_order_when_displacement_is_within_the_window(start, count, data) -> None:
    """Packets delayed by at most `window` places come out complete, in order, exactly once."""
    window = 3
    jitter = [data.draw(st.integers(0, window)) for _ in range(count)]
    order = sorted(range(count), key=lambda k: (k + jitter[k], k))
    buf = ReorderBuffer(window=window)
    out = []
    for k in order:
        out += buf.push(RtpPacket(0, (start + k) & 0xFFFF, k * 160, 1, b""))
    released = [(p.sequence - start) & 0xFFFF for p in out]
    # the first packet to arrive sets the expected sequence: anything numbered before it is late
    assert released == list(range(order[0], count)), (order, released)
    assert buf.lost == 0


@FUZZ
@given(digits=st.lists(st.sampled_from(EVENT_CODES), min_size=1, max_size=12), data=st.data())
def test_dtmf_decoder_reports_each_press_once_despite_loss_and_duplicates(digits, data) -> None:
    """RFC 4733: each press is a run of packets with one timestamp, the last three with the end bit.
    Losing or duplicating start/middle packets, or all but one end packet, never loses or doubles a digit."""
    decoder = DtmfDecoder()
    heard = []
    for i, digit in enumerate(digits):
        ts = 1000 + i * 8000
        event = EVENT_CODES.index(digit)
        packets = [build_telephone_event(event, end=False, duration=160 * (n + 1)) for n in range(data.draw(st.integers(1, 6)))]
        packets = [p for p in packets if data.draw(st.booleans())] or packets[:1]
        packets += [p for p in packets if data.draw(st.booleans())]  # duplicates
        ends = [build_telephone_event(event, end=True, duration=1000)] * 3
        keep = data.draw(st.integers(1, 3))
        for payload in packets + ends[:keep]:
            heard += decoder.feed(ts, payload)
    assert "".join(heard) == "".join(digits)


@FUZZ
@given(method=st.sampled_from(["INVITE", "OPTIONS", "BYE", "CANCEL", "ACK", "INFO", "MESSAGE"]),
       user=TOKEN, call_id=TOKEN, tag=TOKEN, branch=TOKEN, cseq=st.integers(0, 2**31 - 1),
       extra=st.lists(st.tuples(st.sampled_from(["X-A", "Subject", "User-Agent", "Allow"]),
                                st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x4E5F,
                                                               blacklist_characters="\r\n\x7f"), max_size=40)),
                      max_size=4),
       body=st.binary(max_size=300))
def test_well_formed_requests_parse_back_to_what_was_sent(method, user, call_id, tag, branch, cseq, extra, body) -> None:
    lines = [f"{method} sip:{user}@127.0.0.1 SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{branch}",
             "Max-Forwards: 70", f"From: <sip:a@127.0.0.1>;tag={tag}", f"To: <sip:{user}@127.0.0.1>",
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
    lines += [f"{name}: {value.strip()}" for name, value in extra]
    data = ("\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    parsed = parse_message(data)
    assert isinstance(parsed, SipRequest), parsed
    assert (parsed.method, parsed.call_id, parsed.cseq, parsed.body) == (method, call_id, (cseq, method), body)
    assert parsed.from_.tag == tag and parsed.top_via.branch == f"z9hG4bK{branch}"
    again = parse_message(parsed.to_bytes())  # serialising what was parsed is stable
    assert isinstance(again, SipRequest) and again.to_bytes() == parsed.to_bytes()


@FUZZ
@given(mutated(VALID_INVITE))
@example(VALID_INVITE.replace(b"Contact: <", b"Contact:\r\n <"))  # found by CI: value folded onto the next line
def test_whatever_parses_serialises_and_parses_to_the_same(data: bytes) -> None:
    first = parse_message(data)
    if isinstance(first, (SipRequest, SipResponse)):
        second = parse_message(first.to_bytes())
        assert type(second) is type(first)
        assert second.to_bytes() == first.to_bytes()


@FUZZ
@given(pts=st.lists(st.integers(0, 127), min_size=1, max_size=8, unique=True), data=st.data())
def test_sdp_offers_are_accepted_exactly_when_they_carry_g711(pts, data) -> None:
    codecs = {pt: data.draw(st.sampled_from(["PCMU", "PCMA", "opus", "G722", "telephone-event", "G729"])) for pt in pts}
    rates = {pt: 48000 if codecs[pt] == "opus" else 8000 for pt in pts}
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m=audio 4000 RTP/AVP {' '.join(map(str, pts))}"]
    lines += [f"a=rtpmap:{pt} {codecs[pt]}/{rates[pt]}" for pt in pts]
    offer = parse_sdp(("\r\n".join(lines) + "\r\n").encode())
    assert isinstance(offer, SessionDescription)
    g711 = [pt for pt in pts if codecs[pt] in ("PCMU", "PCMA")]
    if not g711:
        try:
            negotiate(offer)
        except NotAcceptable:
            return
        raise AssertionError("an offer without G.711 was accepted")
    agreed = negotiate(offer)
    assert agreed.payload_type == g711[0] and agreed.codec == codecs[g711[0]]
    answer = parse_sdp(build_answer(offer, agreed, address="127.0.0.1", port=5004, session_id=1, version=1))
    assert isinstance(answer, SessionDescription)
    assert int(answer.media[0].formats[0]) == agreed.payload_type and answer.media[0].port == 5004


# -- issue 19: failed calls never use up the hotline's slots --------------------------------------
async def test_fifty_failing_call_attempts_leave_every_slot_free() -> None:
    """The probe that exhausted the hotline: datagram pairs that fail a call in every known way.

    INVITE+CANCEL in one burst, IPv6 media to the IPv4 endpoint, offers never acknowledged (Timer H),
    unusable codecs, a BYE before the ACK: afterwards no call, slot or RTP socket is left, and a real
    caller is answered, not told 486 Busy Here.
    """
    from telephony.sip_message import parse_name_addr
    from telephony.testing import open_sockets, until_no_calls, until_sockets

    async with running_user_agent(DemoHandler(), t1=0.02, t2=0.08, max_calls=5) as ua:
        peer = SipPeer(ua.port)
        try:
            before = open_sockets()
            ipv6 = peer.sdp_offer().replace("c=IN IP4 127.0.0.1", "c=IN IP6 ::1")
            for i in range(50):
                kind = i % 5
                if kind == 0:
                    peer.cancel(peer.invite())
                elif kind == 1:
                    peer.invite(sdp=ipv6)
                elif kind == 2:
                    peer.invite()  # 200 OK never acknowledged
                elif kind == 3:
                    peer.invite(sdp=peer.sdp_offer(codecs="18 9"))
                else:
                    call = peer.invite()
                    ok = await peer.expect(200)
                    call.to_tag = parse_name_addr(ok.headers.get("to")).tag
                    peer.in_dialog("BYE", call)  # hung up before acknowledging
                await asyncio.sleep(0.01)
            await until_no_calls(ua, timeout=10)  # Timer H is 64 * 0.02 = 1.3 s here
            await until_sockets(before)
            while await peer.receive(0.2) is not None:  # drain retransmissions and BYEs
                pass
            await peer.answered_call()
            assert len(ua.calls) == 1
        finally:
            peer.close()
