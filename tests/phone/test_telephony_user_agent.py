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
from telephony.sip_message import SipRequest, SipResponse, build_response, parse_name_addr, parse_via
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


# -- issue 19: a call that fails in any way leaves no call, socket or slot behind ------------------
import uvloop  # noqa: E402

from telephony.media_stream import RELATCH_PACKETS, MediaStream  # noqa: E402
from telephony.g711 import G711Codec  # noqa: E402
from telephony.testing import open_sockets, until_no_calls, until_sockets  # noqa: E402

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}  # uvicorn runs the hub on uvloop


def run_on(loop: str, scenario) -> None:
    """Run ``scenario()`` on a fresh event loop of this kind (the hub's own loop is uvloop)."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario())


async def invite_responses(peer: SipPeer, seconds: float) -> list[int]:
    """Statuses of the responses to INVITE that arrive within ``seconds``, in order (CANCEL's are skipped)."""
    statuses = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        msg = await peer.receive(left)
        if isinstance(msg, SipResponse) and msg.cseq[1] == "INVITE":
            statuses.append(msg.status)
    return statuses


@pytest.mark.parametrize("loop", LOOPS)
def test_an_ipv6_offer_to_an_ipv4_endpoint_is_refused_and_leaves_nothing_behind(loop: str) -> None:
    async def scenario() -> None:
        async with running_user_agent(DemoHandler(), t1=0.05) as ua:
            peer = SipPeer(ua.port)
            try:
                before = open_sockets()
                call = peer.invite(sdp=peer.sdp_offer().replace("c=IN IP4 127.0.0.1", "c=IN IP6 ::1"))
                final = None
                while final is None or final.status < 200:
                    final = await peer.receive(2.0)
                    assert final is not None, "no final response"
                call.to_tag = parse_name_addr(final.headers.get("to")).tag
                peer.ack(call)
                if final.status == 200:  # the old behaviour: then at least a proper BYE must end it
                    await asyncio.sleep(0.3)
                    peer.in_dialog("BYE", call)
                    await peer.expect(200)
                await until_no_calls(ua)
                await until_sockets(before)
                assert final.status == 488 and final.headers.get("warning").startswith("301 ")
            finally:
                peer.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_media_that_cannot_be_sent_still_closes_cleanly(loop: str) -> None:
    """A sender whose socket refuses the address (uvloop raises) must not make close() raise and keep the call."""
    async def scenario() -> None:
        media = MediaStream(codec=G711Codec("PCMU"), dtmf_payload_type=None, remote=("::1", 4000),
                            on_audio=lambda f: None, on_dtmf=lambda d: None)
        before = open_sockets()
        await media.open("127.0.0.1", None)
        media.start()
        await asyncio.sleep(0.1)
        await media.close()
        await until_sockets(before)
        if loop == "uvloop":  # asyncio reports the refusal to error_received instead of raising
            assert media.stats.send_errors > 0 and media.stats.sent == 0

    run_on(loop, scenario)


@pytest.mark.parametrize("when", ["in the same burst", "while ringing"])
async def test_invite_then_cancel_gets_487_and_no_ringing_and_leaves_nothing_behind(peer_factory, when: str) -> None:
    delay = 0.3 if when == "while ringing" else 0.0
    async with running_user_agent(DemoHandler(), t1=0.05, max_calls=2, answer_delay_s=delay) as ua:
        peer = peer_factory(ua.port)
        before = open_sockets()
        for _ in range(5):  # more than max_calls: a leak would also show as 486 below
            call = peer.invite()
            if when == "while ringing":
                await peer.expect(180)
            peer.cancel(call)
            statuses = await invite_responses(peer, 0.4)
            assert 487 in statuses and set(statuses[statuses.index(487):]) == {487}, statuses  # no 180 after it
            assert 200 not in statuses
            peer.ack(call)
        await until_no_calls(ua)
        await until_sockets(before)
        await peer.answered_call()  # the slots are free: a real caller is answered, not told 486
        assert len(ua.calls) == 1


async def test_an_invite_never_acknowledged_sends_no_rtp_anywhere_and_ends_at_timer_h(peer_factory) -> None:
    async with running_user_agent(DemoHandler(prompt=tone(500, 3.0)), t1=0.05, t2=0.2) as ua:
        peer = peer_factory(ua.port)
        victim = peer_factory(ua.port)  # the third party a forged SDP names
        before = open_sockets()
        peer.invite(sdp=peer.sdp_offer(port=victim.rtp_port))
        await peer.expect(200)
        reflected = await victim.receive_rtp(3.4)  # Timer H: 64 * T1 = 3.2 s
        assert reflected == [], f"{len(reflected)} RTP packets sent before any ACK"
        bye = await peer.expect("BYE", timeout=2)
        peer.send(build_response(bye, 200).to_bytes())
        await until_no_calls(ua)
        await until_sockets(before)


async def test_media_waits_for_the_ack_or_a_packet_from_the_callers_own_host(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), t1=0.2) as ua:
        peer = peer_factory(ua.port)
        sdp_target = peer_factory(ua.port)
        stranger = __import__("socket").socket(__import__("socket").AF_INET, __import__("socket").SOCK_DGRAM)
        stranger.bind(("127.0.0.2", 0))  # neither the signalling host nor the SDP's
        stranger.setblocking(False)
        try:
            call = peer.invite(sdp=peer.sdp_offer(port=sdp_target.rtp_port))
            ok = await peer.expect(200)
            rtp_target = ("127.0.0.1", rtp_port_of(ok))
            stranger.sendto(build_rtp(0, 1, 160, 7, b"\xff" * 160), rtp_target)
            assert await sdp_target.receive_rtp(0.4) == []  # not before the ACK
            await asyncio.sleep(0.05)
            with pytest.raises(BlockingIOError):
                stranger.recv(4096)  # a packet from an unrelated host starts nothing
            # the caller's own RTP (from the signalling host) starts our media before the ACK, back to it
            peer.rtp.sendto(build_rtp(0, 1, 160, 5, b"\xff" * 160), rtp_target)
            assert len(await peer.receive_rtp(0.3)) > 5
            call.to_tag = parse_name_addr(ok.headers.get("to")).tag
            forged = PeerCallCopy(call, to_tag="not-ours")
            peer.ack(forged)  # an ACK that never saw our 200 OK confirms nothing
            await asyncio.sleep(0.1)
            assert next(iter(ua.calls.values())).state.value == "answered"
            peer.ack(call)
            await asyncio.sleep(0.1)
            assert next(iter(ua.calls.values())).state.value == "confirmed"
        finally:
            stranger.close()


def PeerCallCopy(call, **changes):
    from dataclasses import replace

    return replace(call, **changes)


async def test_one_spoofed_packet_does_not_move_the_media_but_a_real_new_source_does(peer_factory) -> None:
    async with running_user_agent(DemoHandler(), rtp_timeout_s=0) as ua:
        peer = peer_factory(ua.port)
        intruder = peer_factory(ua.port)
        call, ok = await peer.answered_call()
        rtp_target = ("127.0.0.1", rtp_port_of(ok))
        peer.rtp.sendto(build_rtp(0, 1, 160, 5, b"\xff" * 160), rtp_target)
        assert len(await peer.receive_rtp(0.3)) > 5
        await asyncio.sleep(2.1)  # the caller is silent longer than RELATCH_AFTER_S
        intruder.rtp.sendto(build_rtp(0, 1, 160, 9, b"\xff" * 160), rtp_target)
        assert await intruder.receive_rtp(0.3) == []
        assert len(await peer.receive_rtp(0.2)) > 5  # still to the caller
        for i in range(RELATCH_PACKETS):  # a source that really streams (a NAT rebinding) takes over
            intruder.rtp.sendto(build_rtp(0, 2 + i, 320 + i * 160, 9, b"\xff" * 160), rtp_target)
        assert len(await intruder.receive_rtp(0.3)) > 5
