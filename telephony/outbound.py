"""Outbound calls (UAC): the user agent places an INVITE to a trunk or SIP URI (follow-up surveys).

``await ua.place_call("sip:survey-42@10.0.0.5:5060", handler)`` returns a confirmed :class:`Call`
whose events (audio, DTMF, end) go to ``handler``, exactly like an answered incoming call; hang up
with ``call.hangup()`` (BYE), and a BYE from the far end ends it. Raises :class:`CallFailed` when
the call is refused (4xx-6xx), nobody answers within ``ring_timeout_s`` (CANCEL, 487), or the trunk
does not respond at all (Timer B, 408).

:class:`OutboundCalls` is the user agent's collaborator for this: the user agent constructs and owns
one, hands it the responses to our INVITEs, and is reached back only through the public
:class:`Endpoint` interface (send, resolve, local address, Via, spawn, ``establish``). Once the 2xx
arrives the call is a :class:`telephony.dialog.Dialog` made by ``Dialog.as_uac`` and handed to
``Endpoint.establish``: from there on BYE, INFO, re-INVITE and RTP timeouts take the same path as for
an incoming call.

INVITE client transaction (RFC 3261 17.1.1): retransmitted from T1 doubling until a provisional
response; a non-2xx final is ACKed in the transaction (same branch); a 2xx is ACKed end to end
(new branch, to the Contact, through the reversed Record-Route set: ``Dialog.request("ACK")``) and
that ACK is repeated for every retransmitted 2xx. The SDP offer (``sdp.build_offer``) carries PCMU,
PCMA and telephone-event/8000.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Coroutine, Protocol

from .call import Call, CallEvents, EndReason
from .dialog import Dialog
from .g711 import G711Codec
from .handler import CallHandler
from .media_stream import MediaStream
from .privacy import mask_number
from .sdp import OFFER_DTMF_PAYLOAD_TYPE, NotAcceptable, SdpError, build_offer, negotiate, parse_sdp
from .sip_message import Headers, SipRequest, SipResponse, new_branch, new_tag, parse_uri

log = logging.getLogger("telephony.sip")


class CallFailed(Exception):
    """The outbound call did not connect: ``status`` is the SIP final status (408: no response)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class EndpointConfig(Protocol):
    host: str
    rtp_port_range: tuple[int, int] | None
    t1: float
    t2: float
    send_silence: bool
    user_agent_name: str


class Endpoint(Protocol):
    """What outbound calls need from the SIP endpoint (``telephony.user_agent.UserAgent``): public only."""

    config: EndpointConfig
    port: int

    def send(self, data: bytes, addr: tuple[str, int]) -> None: ...

    async def resolve(self, uri_text: str, fallback: tuple[str, int]) -> tuple[str, int]: ...

    def local_host(self, toward: str | None = None) -> str: ...

    def contact(self, toward: str | None = None) -> str: ...

    def via(self, toward: str | None, branch: str) -> str: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task: ...

    def establish(self, dialog: Dialog, media: MediaStream, events: CallEvents, handler: CallHandler, *,
                  caller: str, caller_display: str, dialled: str, codec: str) -> Call: ...


@dataclass
class _OutgoingInvite:
    request: SipRequest
    target: tuple[str, int]
    provisional: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Future | None = None
    ack: bytes | None = None  # the ACK for a 2xx, repeated for retransmitted 2xx
    ack_target: tuple[str, int] | None = None


def _in_transaction(method: str, invite: SipRequest, to_value: str) -> SipRequest:
    """ACK for a non-2xx final, or CANCEL: same branch, Route, From, Call-ID and CSeq number as the INVITE."""
    headers = Headers()
    headers.add("via", invite.headers.get_all("via")[0])
    for route in invite.headers.get_all("route"):
        headers.add("route", route)
    headers.add("max-forwards", "70")
    headers.add("from", invite.headers.get("from") or "")
    headers.add("to", to_value)
    headers.add("call-id", invite.call_id)
    headers.add("cseq", f"{invite.cseq[0]} {method}")
    return SipRequest(method, invite.uri, headers)


class OutboundCalls:
    """The INVITE client transactions of one endpoint, by branch; owned by the user agent."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._invites: dict[str, _OutgoingInvite] = {}

    def on_response(self, response: SipResponse, branch: str) -> bool:
        """A response to one of our INVITEs (or their CANCELs)? Handle it and return True."""
        out = self._invites.get(branch)
        if out is None:
            return False
        try:
            method = response.cseq[1]
        except ValueError:
            return True
        if method != "INVITE":
            return method == "CANCEL"  # 200 for our CANCEL: nothing to do, the 487 follows
        if response.status < 200:
            out.provisional.set()
            return True
        if response.status >= 300:  # every final refusal, the first and its retransmissions (17.1.1.3)
            ack = _in_transaction("ACK", out.request, response.headers.get("to") or "")
            self.endpoint.send(ack.to_bytes(), out.target)
        if out.final is not None and not out.final.done():
            out.final.set_result(response)
        elif 200 <= response.status < 300 and out.ack is not None and out.ack_target is not None:
            self.endpoint.send(out.ack, out.ack_target)  # a retransmitted 2xx: our ACK was lost
        return True

    async def place(self, uri: str, handler: CallHandler, *, from_user: str = "xiaozhi",
                    ring_timeout_s: float = 45.0, extra_headers: list[tuple[str, str]] | None = None) -> Call:
        ep = self.endpoint
        try:
            target_uri = parse_uri(uri.strip("<>"))
        except ValueError as exc:
            raise CallFailed(400, f"not a SIP URI: {exc}") from None
        request_uri = str(target_uri)
        target = await ep.resolve(request_uri, ("", 0))
        if not target[0]:
            raise CallFailed(404, f"cannot resolve {target_uri.host}")
        loop = asyncio.get_running_loop()
        host = ep.local_host(target[0])
        call_id = f"{secrets.token_hex(12)}@{host}"
        events = CallEvents()
        media = MediaStream(
            codec=G711Codec("PCMU"), dtmf_payload_type=OFFER_DTMF_PAYLOAD_TYPE, remote=None,
            on_audio=events.audio, on_dtmf=events.dtmf, send_silence=ep.config.send_silence, label=call_id[:8],
        )
        try:
            rtp_port = await media.open(ep.config.host or "0.0.0.0", ep.config.rtp_port_range)
        except OSError as exc:
            raise CallFailed(503, f"no RTP port: {exc}") from None
        session_id = secrets.randbelow(2**31)
        branch = new_branch()
        headers = Headers()
        headers.add("via", ep.via(target[0], branch))
        headers.add("max-forwards", "70")
        headers.add("from", f"<sip:{from_user}@{host}:{ep.port}>;tag={new_tag()}")
        headers.add("to", f"<{request_uri}>")
        headers.add("call-id", call_id)
        headers.add("cseq", "1 INVITE")
        headers.add("contact", ep.contact(target[0]))
        headers.add("allow", "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO")
        headers.add("user-agent", ep.config.user_agent_name)
        for name, value in extra_headers or []:
            headers.add(name, value)
        headers.add("content-type", "application/sdp")
        offer = build_offer(address=host, port=rtp_port, session_id=session_id)
        out = _OutgoingInvite(SipRequest("INVITE", request_uri, headers, offer), target, final=loop.create_future())
        self._invites[branch] = out
        log.info("outbound call %s to %s", call_id[:8], mask_number(target_uri.user or ""))
        try:
            response = await self._invite_transaction(out, ring_timeout_s)
        except BaseException:
            await media.close()
            raise
        finally:  # keep absorbing retransmitted finals (and 2xx, with our ACK) a while, then forget
            loop.call_later(64 * ep.config.t1, self._invites.pop, branch, None)
        if response.status >= 300:
            await media.close()
            log.info("outbound call %s refused: %d %s", call_id[:8], response.status, response.reason)
            raise CallFailed(response.status, response.reason)
        dialog = Dialog.as_uac(out.request, response, target)
        dialog.sdp_session_id = session_id
        return await self._confirm(out, dialog, response, media, events, handler,
                                   from_user=from_user, dialled=target_uri.user or "")

    async def _invite_transaction(self, out: _OutgoingInvite, ring_timeout_s: float) -> SipResponse:
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        assert out.final is not None
        data = out.request.to_bytes()
        t1, t2 = ep.config.t1, ep.config.t2
        interval = t1
        deadline_b = loop.time() + 64 * t1
        ring_deadline = loop.time() + ring_timeout_s
        while True:  # Timer A until a provisional response, Timer B for none at all
            ep.send(data, out.target)
            try:
                return await asyncio.wait_for(asyncio.shield(out.final), interval)
            except asyncio.TimeoutError:
                pass
            if out.provisional.is_set():
                break
            if loop.time() >= deadline_b:
                raise CallFailed(408, "no response from the trunk")
            interval *= 2  # INVITE requests double without the T2 cap (17.1.1.2)
        try:
            return await asyncio.wait_for(asyncio.shield(out.final), max(0.0, ring_deadline - loop.time()))
        except asyncio.TimeoutError:
            pass
        # nobody answered: CANCEL (same branch), then the 487 (or a 200 that crossed it) ends the transaction
        cancel = _in_transaction("CANCEL", out.request, out.request.headers.get("to") or "").to_bytes()
        interval = t1
        deadline = loop.time() + 64 * t1
        while loop.time() < deadline:
            ep.send(cancel, out.target)
            try:
                response = await asyncio.wait_for(asyncio.shield(out.final), min(interval, t2))
            except asyncio.TimeoutError:
                interval *= 2
                continue
            if 200 <= response.status < 300:
                return response  # answered just as we gave up: take the call
            raise CallFailed(487, "no answer")  # the 487 was ACKed as it arrived (on_response)
        raise CallFailed(408, "no answer, CANCEL not answered")

    async def _confirm(self, out: _OutgoingInvite, dialog: Dialog, response: SipResponse, media: MediaStream,
                       events: CallEvents, handler: CallHandler, *, from_user: str, dialled: str) -> Call:
        ep = self.endpoint
        # ACK for the 2xx: a new transaction to the remote target through the route set
        ack = dialog.request("ACK", via=ep.via(out.target[0], new_branch()))
        out.ack = ack.to_bytes()
        out.ack_target = await ep.resolve(dialog.next_hop, out.target)
        ep.send(out.ack, out.ack_target)

        answer = parse_sdp(response.body) if response.body else SdpError("no SDP answer")
        agreed = None
        if not isinstance(answer, SdpError):
            dialog.offer = answer
            try:
                agreed = negotiate(answer)
            except NotAcceptable as exc:
                log.warning("outbound call %s: unusable SDP answer (%s)", dialog.call_id[:8], exc)
        if agreed is None:  # a 200 without usable media: hang up right away (RFC 3261 13.2.1)
            call = ep.establish(dialog, media, events, handler, caller=from_user, caller_display="",
                                dialled=dialled, codec="PCMU")
            call.hangup()
            raise CallFailed(488, "answer without usable audio")
        media.codec = G711Codec(agreed.codec)
        media.dtmf_payload_type = agreed.dtmf_payload_type
        media.remote = (agreed.remote_address, agreed.remote_port) if agreed.remote_address else None
        media.send_enabled = agreed.direction in ("sendrecv", "sendonly")
        log.info("outbound call %s answered (%s%s)", dialog.call_id[:8], agreed.codec,
                 ", telephone-event" if agreed.dtmf_payload_type is not None else "")
        media.start()
        return ep.establish(dialog, media, events, handler, caller=from_user, caller_display="",
                            dialled=dialled, codec=agreed.codec)


__all__ = ["CallFailed", "Endpoint", "EndReason", "OutboundCalls"]
