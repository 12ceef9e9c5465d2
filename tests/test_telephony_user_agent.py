"""The user agent's SIP transaction rules and media behaviour, driven by a scripted peer on loopback.

sipp checks interoperability (test_telephony_sipp.py); these tests pin timings and corner cases
that need a peer which misbehaves on purpose or measures precisely.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from telephony import Call, CallHandler, DemoHandler
from telephony.audio import tone
from telephony.g711 import ulaw_encode
from telephony.rtp import RtpPacket, build_rtp, parse_rtp
from telephony.sdp import parse_sdp
from telephony.sip_message import SipRequest, SipResponse, build_response, parse_via
from telephony.testing import SipPeer, running_user_agent


@pytest.fixture
async def peer_factory():
    peers: list[SipPeer] = []

    def make(port: int) -> SipPeer:
        peers.append(SipPeer(port))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def rtp_port_of(ok: SipResponse) -> int:
    return parse_sdp(ok.body).media[0].port


async def test_200_ok_is_retransmitted_at_t1_doubling_to_t2_until_the_ack(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), t1=0.1, t2=0.4) as ua:
        peer = peer_factory(ua.port)
        call = peer.invite()
        first = await peer.expect(200)
        t0 = time.monotonic()
        arrivals = []
        while time.monotonic() - t0 < 1.65:
            msg = await peer.receive(0.1)
            if isinstance(msg, SipResponse) and msg.status == 200:
                arrivals.append(time.monotonic() - t0)
        assert np.allclose(arrivals, [0.1, 0.3, 0.7, 1.1, 1.5], atol=0.08), arrivals
        assert all(r.headers.get("to") == first.headers.get("to") for _, r in peer.received[-len(arrivals):])
        call.to_tag = first.headers.get("to").split("tag=")[1]
        peer.ack(call)
        await asyncio.sleep(0.05)
        assert await peer.receive(0.6) is None  # no more retransmissions after the ACK
        assert len(ua.calls) == 1 and next(iter(ua.calls.values())).state.value == "confirmed"


async def test_a_200_ok_never_acknowledged_ends_the_call_with_bye_after_64_t1(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), t1=0.05, t2=0.2) as ua:
        peer = peer_factory(ua.port)
        peer.invite()
        await peer.expect(200)
        t0 = time.monotonic()
        bye = await peer.expect("BYE", timeout=5)
        assert 3.0 < time.monotonic() - t0 < 4.0  # 64 * T1 = 3.2 s
        peer.send(build_response(bye, 200).to_bytes())
        await asyncio.sleep(0.1)
        assert not ua.calls


async def test_outbound_rtp_goes_where_the_callers_rtp_comes_from_paced_every_20_ms(peer_factory) -> None:
    async with running_user_agent(DemoHandler(prompt=tone(500, 3.0))) as ua:
        peer = peer_factory(ua.port)
        decoy = peer_factory(ua.port)  # the SDP names this port; the caller's RTP really comes from peer.rtp
        call, ok = await peer.answered_call(sdp=peer.sdp_offer(port=decoy.rtp_port))
        target = ("127.0.0.1", rtp_port_of(ok))
        payload = ulaw_encode(np.zeros(160, np.int16))
        for i in range(3):
            peer.rtp.sendto(build_rtp(0, i, i * 160, 99, payload), target)
        received = await peer.receive_rtp(2.0)
        packets = [parse_rtp(d) for _, _, d in received]
        assert len(packets) >= 95 and all(isinstance(p, RtpPacket) for p in packets)
        assert all(addr == target for _, addr, _ in received)  # sent from the port in our SDP (symmetric)
        assert all((b.sequence - a.sequence) & 0xFFFF == 1 for a, b in zip(packets, packets[1:]))
        assert all((b.timestamp - a.timestamp) & 0xFFFFFFFF == 160 for a, b in zip(packets, packets[1:]))
        gaps = np.diff([t for t, _, _ in received[5:]]) * 1000
        print(f"\npacing: mean {gaps.mean():.2f} ms, stdev {gaps.std():.2f} ms, p99 {np.percentile(gaps, 99):.2f} ms")
        assert abs(gaps.mean() - 20) < 0.5 and gaps.std() < 5.0  # generous: CI machines are shared
        live = next(iter(ua.calls.values()))
        assert live.media.stats.max_late_ms < 20


class BargeIn(CallHandler):
    def __init__(self) -> None:
        self.call: Call | None = None
        self.playback = None

    async def on_call_started(self, call: Call) -> None:
        self.call = call
        self.playback = call.play(tone(700, 5.0, amplitude=0.5))


async def test_stop_playback_silences_the_prompt_within_a_frame(peer_factory) -> None:
    handler = BargeIn()
    async with running_user_agent(handler) as ua:
        peer = peer_factory(ua.port)
        call, ok = await peer.answered_call()
        target = ("127.0.0.1", rtp_port_of(ok))
        peer.rtp.sendto(build_rtp(0, 1, 160, 5, b"\xff" * 160), target)
        before = await peer.receive_rtp(0.3)
        assert any(parse_rtp(d).payload != b"\xff" * 160 for _, _, d in before[-5:])  # the tone is playing
        handler.call.stop_playback()
        assert await handler.playback.wait() is False
        stopped_at = time.monotonic()
        after = await peer.receive_rtp(0.3)
        late = [t - stopped_at for t, _, d in after if parse_rtp(d).payload != b"\xff" * 160]
        assert all(t < 0.025 for t in late), late
        assert not handler.call.is_playing


class Recorder(CallHandler):
    def __init__(self) -> None:
        self.digits: list[str] = []
        self.ended: list[str] = []

    async def on_dtmf(self, call: Call, digit: str) -> None:
        self.digits.append(digit)

    async def on_call_ended(self, call: Call, reason) -> None:
        self.ended.append(reason.value)


async def test_sip_info_dtmf_relay_is_reported_as_a_digit(peer_factory) -> None:
    handler = Recorder()
    async with running_user_agent(handler) as ua:
        peer = peer_factory(ua.port)
        call, _ = await peer.answered_call()
        await asyncio.sleep(0.05)
        peer.in_dialog("INFO", call, body="Signal=5\r\nDuration=160\r\n", content_type="application/dtmf-relay")
        await peer.expect(200)
        peer.in_dialog("BYE", call)
        await peer.expect(200)
        await asyncio.sleep(0.1)
    assert handler.digits == ["5"] and handler.ended == ["remote_hangup"]


async def test_retransmitted_bye_is_answered_200_again_not_481(peer_factory) -> None:
    async with running_user_agent(Recorder()) as ua:
        peer = peer_factory(ua.port)
        call, _ = await peer.answered_call()
        peer.in_dialog("BYE", call, branch="z9hG4bKbye1")
        await peer.expect(200)
        peer.in_dialog("BYE", call, branch="z9hG4bKbye1", cseq=call.cseq)
        await peer.expect(200)
        peer.in_dialog("BYE", call, branch="z9hG4bKbye2")  # a new BYE for the finished call
        await peer.expect(481)


async def test_retransmitted_invite_does_not_make_a_second_call(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), answer_delay_s=0.3) as ua:
        peer = peer_factory(ua.port)
        call = peer.invite()
        await peer.expect(180)
        peer.invite(call=call)  # same Call-ID, new branch: a different transaction -> merged/loop
        again = await peer.expect(482)
        assert again.headers.get("call-id") == call.call_id
        await peer.expect(200)
        assert len(ua.calls) == 1


@pytest.mark.parametrize("method, status", [("REGISTER", 405), ("SUBSCRIBE", 405), ("FROBNICATE", 501)])
async def test_methods_we_do_not_serve_get_405_or_501(peer_factory, method: str, status: int) -> None:
    async with running_user_agent(DemoHandler()) as ua:
        peer = peer_factory(ua.port)
        from telephony.testing import PeerCall

        peer.in_dialog(method, PeerCall(call_id="x1", from_tag="f"))
        reply = await peer.expect(status)
        if status == 405:
            assert "INVITE" in reply.headers.get("allow")


async def test_hop_limit_require_and_busy_are_refused(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), max_calls=1) as ua:
        peer = peer_factory(ua.port)
        peer.invite(extra_headers="Require: 100rel\r\n")
        assert (await peer.expect(420)).headers.get("unsupported") == "100rel"
        peer.send(peer_invite_with_max_forwards_zero(peer))
        await peer.expect(483)
        await peer.answered_call()
        peer.invite()
        await peer.expect(486)
        peer.invite(sdp="")
        await peer.expect(486)


def peer_invite_with_max_forwards_zero(peer: SipPeer) -> bytes:
    data = (f"INVITE sip:12393@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bKmf0;rport\r\n"
            "Max-Forwards: 0\r\nFrom: <sip:1@127.0.0.1>;tag=a\r\nTo: <sip:12393@127.0.0.1>\r\nCall-ID: mf0\r\n"
            "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    return data.encode()


async def test_delayed_offer_and_unknown_cancel_are_answered(peer_factory) -> None:
    async with running_user_agent(DemoHandler()) as ua:
        peer = peer_factory(ua.port)
        peer.invite(sdp="")
        assert "SDP offer required" in (await peer.expect(488)).headers.get("warning")
        from telephony.testing import PeerCall

        stray = PeerCall(call_id="nope", from_tag="f", invite_branch="z9hG4bKnothing")
        peer.cancel(stray)
        await peer.expect(481)


async def test_responses_follow_rport_and_say_where_the_request_came_from(peer_factory) -> None:
    async with running_user_agent(DemoHandler()) as ua:
        peer = peer_factory(ua.port)
        peer.send("OPTIONS sip:12393@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.1.2.3:5999;branch=z9hG4bKnat;rport\r\n"
                  "Max-Forwards: 70\r\nFrom: <sip:pbx@10.1.2.3>;tag=a\r\nTo: <sip:12393@127.0.0.1>\r\n"
                  "Call-ID: nat1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        reply = await peer.expect(200)
        via = parse_via(reply.headers.get_all("via")[0])
        assert via.params["rport"] == str(peer.port) and via.params["received"] == "127.0.0.1"


async def test_hold_by_reinvite_stops_our_rtp_and_resume_restarts_it(peer_factory) -> None:
    async with running_user_agent(DemoHandler()) as ua:
        peer = peer_factory(ua.port)
        call, ok = await peer.answered_call()
        target = ("127.0.0.1", rtp_port_of(ok))
        peer.rtp.sendto(build_rtp(0, 1, 160, 5, b"\xff" * 160), target)
        assert len(await peer.receive_rtp(0.2)) > 5
        hold = peer.sdp_offer().replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0") + "a=sendonly\r\n"
        peer.in_dialog("INVITE", call, body=hold, content_type="application/sdp")
        ok2 = await peer.expect(200)
        assert b"a=recvonly" in ok2.body and b"o=xiaozhi" in ok2.body
        peer.ack(call)
        await asyncio.sleep(0.1)
        await peer.receive_rtp(0.05)
        assert await peer.receive_rtp(0.3) == []
        peer.in_dialog("INVITE", call, body=peer.sdp_offer(), content_type="application/sdp")
        assert b"a=sendrecv" in (await peer.expect(200)).body
        peer.ack(call)
        assert len(await peer.receive_rtp(0.3)) > 5


async def test_silent_media_ends_the_call_and_shutdown_hangs_up_the_rest(peer_factory) -> None:
    handler = Recorder()
    async with running_user_agent(handler, rtp_timeout_s=0.5) as ua:
        peer = peer_factory(ua.port)
        await peer.answered_call()
        bye = await peer.expect("BYE", timeout=3)
        peer.send(build_response(bye, 200).to_bytes())
        other = peer_factory(ua.port)
        await other.answered_call()
        await asyncio.sleep(0.1)
    bye = await other.expect("BYE", timeout=2)
    assert isinstance(bye, SipRequest)
    assert handler.ended == ["rtp_timeout", "shutdown"]
