"""Outbound calls (UAC): the user agent places an INVITE to a trunk or SIP URI (follow-up surveys).

``await place_call(ua, "sip:survey-42@10.0.0.5:5060", handler)`` returns a confirmed :class:`Call`
whose events (audio, DTMF, end) go to ``handler``, exactly like an answered incoming call; hang up
with ``call.hangup()`` (BYE), and a BYE from the far end ends it. Raises :class:`CallFailed` when
the call is refused (4xx-6xx), nobody answers within ``ring_timeout_s`` (CANCEL, 487), or the trunk
does not respond at all (Timer B, 408).

INVITE client transaction (RFC 3261 17.1.1): retransmitted from T1 doubling until a provisional
response; a non-2xx final is ACKed in the transaction (same branch); a 2xx is ACKed end to end
(new branch, to the Contact, through the reversed Record-Route set) and that ACK is repeated for
every retransmitted 2xx. The SDP offer carries PCMU, PCMA and telephone-event/8000.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .call import Call, CallState, EndReason
from .g711 import G711Codec
from .media_stream import MediaStream
from .privacy import mask_number
from .sdp import NotAcceptable, SdpError, negotiate, parse_sdp, session_lines
from .sip_message import Headers, SipRequest, SipResponse, new_branch, new_tag, parse_name_addr, parse_uri

if TYPE_CHECKING:
    from .handler import CallHandler
    from .user_agent import UserAgent

log = logging.getLogger("telephony.sip")

DTMF_PAYLOAD_TYPE = 101


class CallFailed(Exception):
    """The outbound call did not connect: ``status`` is the SIP final status (408: no response)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass
class _OutgoingInvite:
    request: SipRequest
    target: tuple[str, int]
    provisional: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Future | None = None
    ack: bytes | None = None  # the ACK for a 2xx, repeated for retransmitted 2xx
    ack_target: tuple[str, int] | None = None


def build_offer(*, address: str, port: int, session_id: int, version: int = 1) -> bytes:
    lines = session_lines(address=address, session_id=session_id, version=version) + [
        f"m=audio {port} RTP/AVP 0 8 {DTMF_PAYLOAD_TYPE}",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        f"a=rtpmap:{DTMF_PAYLOAD_TYPE} telephone-event/8000",
        f"a=fmtp:{DTMF_PAYLOAD_TYPE} 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _outgoing(ua: "UserAgent") -> dict[str, _OutgoingInvite]:
    table = getattr(ua, "_outgoing", None)
    if table is None:
        table = ua._outgoing = {}  # type: ignore[attr-defined]
    return table


def on_response(ua: "UserAgent", response: SipResponse, branch: str) -> bool:
    """Responses to our INVITEs (called from the user agent's response path); True when consumed."""
    out = getattr(ua, "_outgoing", {}).get(branch)
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
        ua._send(_non2xx_ack(out.request, response).to_bytes(), out.target)
    if out.final is not None and not out.final.done():
        out.final.set_result(response)
    elif 200 <= response.status < 300 and out.ack is not None and out.ack_target is not None:
        ua._send(out.ack, out.ack_target)  # a retransmitted 2xx: our ACK was lost
    return True


def _non2xx_ack(invite: SipRequest, response: SipResponse) -> SipRequest:
    headers = Headers()
    headers.add("via", invite.headers.get_all("via")[0])
    for route in invite.headers.get_all("route"):
        headers.add("route", route)
    headers.add("max-forwards", "70")
    headers.add("from", invite.headers.get("from") or "")
    headers.add("to", response.headers.get("to") or "")
    headers.add("call-id", invite.call_id)
    headers.add("cseq", f"{invite.cseq[0]} ACK")
    return SipRequest("ACK", invite.uri, headers)


async def place_call(
    ua: "UserAgent",
    uri: str,
    handler: "CallHandler",
    *,
    from_user: str = "xiaozhi",
    ring_timeout_s: float = 45.0,
    extra_headers: list[tuple[str, str]] | None = None,
) -> Call:
    try:
        target_uri = parse_uri(uri.strip("<>"))
    except ValueError as exc:
        raise CallFailed(400, f"not a SIP URI: {exc}") from None
    request_uri = str(target_uri)
    target = await ua._resolve(request_uri, ("", 0))
    if not target[0]:
        raise CallFailed(404, f"cannot resolve {target_uri.host}")
    loop = asyncio.get_running_loop()
    host = ua._local_host(target[0])
    call_id = f"{secrets.token_hex(12)}@{host}"
    local_tag = new_tag()
    holder: dict[str, Call] = {}
    media = MediaStream(
        codec=G711Codec("PCMU"),
        dtmf_payload_type=DTMF_PAYLOAD_TYPE,
        remote=None,
        on_audio=lambda frame: holder["call"]._push_audio(frame) if holder else None,
        on_dtmf=lambda digit: holder["call"]._push_dtmf(digit) if holder else None,
        send_silence=ua.config.send_silence,
        label=call_id[:8],
    )
    try:
        rtp_port = await media.open(ua.config.host or "0.0.0.0", ua.config.rtp_port_range)
    except OSError as exc:
        raise CallFailed(503, f"no RTP port: {exc}") from None
    session_id = secrets.randbelow(2**31)
    local_uri = f"<sip:{from_user}@{host}:{ua.port}>;tag={local_tag}"
    branch = new_branch()
    headers = Headers()
    headers.add("via", f"SIP/2.0/UDP {host}:{ua.port};branch={branch};rport")
    headers.add("max-forwards", "70")
    headers.add("from", local_uri)
    headers.add("to", f"<{request_uri}>")
    headers.add("call-id", call_id)
    headers.add("cseq", "1 INVITE")
    headers.add("contact", ua._contact(target[0]))
    headers.add("allow", "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO")
    headers.add("user-agent", ua.config.user_agent_name)
    for name, value in extra_headers or []:
        headers.add(name, value)
    headers.add("content-type", "application/sdp")
    invite = SipRequest("INVITE", request_uri, headers, build_offer(address=host, port=rtp_port, session_id=session_id))
    out = _OutgoingInvite(invite, target, final=loop.create_future())
    table = _outgoing(ua)
    table[branch] = out
    data = invite.to_bytes()
    log.info("outbound call %s to %s", call_id[:8], mask_number(target_uri.user or ""))
    try:
        response = await _invite_transaction(ua, out, data, ring_timeout_s)
    except BaseException:
        await media.close()
        loop.call_later(64 * ua.config.t1, table.pop, branch, None)
        raise
    loop.call_later(64 * ua.config.t1, table.pop, branch, None)  # keep absorbing 2xx retransmissions
    if response.status >= 300:
        await media.close()
        log.info("outbound call %s refused: %d %s", call_id[:8], response.status, response.reason)
        raise CallFailed(response.status, response.reason)
    return await _confirm(
        ua,
        out,
        response,
        media,
        holder,
        handler,
        local_uri=local_uri,
        local_tag=local_tag,
        session_id=session_id,
        dialled=target_uri.user or "",
        from_user=from_user,
    )


async def _invite_transaction(ua: "UserAgent", out: _OutgoingInvite, data: bytes, ring_timeout_s: float) -> SipResponse:
    loop = asyncio.get_running_loop()
    assert out.final is not None
    t1, t2 = ua.config.t1, ua.config.t2
    interval = t1
    deadline_b = loop.time() + 64 * t1
    ring_deadline = loop.time() + ring_timeout_s
    while True:  # Timer A until a provisional response, Timer B for none at all
        ua._send(data, out.target)
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
    cancel = Headers()
    cancel.add("via", out.request.headers.get_all("via")[0])
    cancel.add("max-forwards", "70")
    cancel.add("from", out.request.headers.get("from") or "")
    cancel.add("to", out.request.headers.get("to") or "")
    cancel.add("call-id", out.request.call_id)
    cancel.add("cseq", f"{out.request.cseq[0]} CANCEL")
    cancel_bytes = SipRequest("CANCEL", out.request.uri, cancel).to_bytes()
    interval = t1
    deadline = loop.time() + 64 * t1
    while loop.time() < deadline:
        ua._send(cancel_bytes, out.target)
        try:
            response = await asyncio.wait_for(asyncio.shield(out.final), min(interval, t2))
        except asyncio.TimeoutError:
            interval *= 2
            continue
        if 200 <= response.status < 300:
            return response  # answered just as we gave up: take the call
        raise CallFailed(487, "no answer")  # the 487 was ACKed as it arrived (on_response)
    raise CallFailed(408, "no answer, CANCEL not answered")


async def _confirm(
    ua,
    out: _OutgoingInvite,
    response: SipResponse,
    media: MediaStream,
    holder: dict,
    handler,
    *,
    local_uri: str,
    local_tag: str,
    session_id: int,
    dialled: str,
    from_user: str,
) -> Call:
    from .user_agent import _Dialog  # the dialog record the UAS side uses; BYE/INFO handling is shared

    to_value = response.headers.get("to") or ""
    try:
        remote_tag = parse_name_addr(to_value).tag or ""
        contacts = response.headers.get_all("contact")
        remote_target = str(parse_name_addr(contacts[0]).uri) if contacts else out.request.uri
    except (ValueError, IndexError):
        remote_tag, remote_target = "", out.request.uri
    route_set = list(reversed(response.headers.get_all("record-route")))
    # ACK for the 2xx: a new transaction to the remote target through the route set
    request_uri, next_hop, routes = remote_target, remote_target, list(route_set)
    if routes:
        first = parse_name_addr(routes[0])
        if "lr" in first.uri.params:
            next_hop = str(first.uri)
        else:
            request_uri = next_hop = str(first.uri)
            routes = routes[1:] + [f"<{remote_target}>"]
    host = ua._local_host(out.target[0])
    ack = Headers()
    ack.add("via", f"SIP/2.0/UDP {host}:{ua.port};branch={new_branch()};rport")
    ack.add("max-forwards", "70")
    for route in routes:
        ack.add("route", route)
    ack.add("from", local_uri)
    ack.add("to", to_value)
    ack.add("call-id", out.request.call_id)
    ack.add("cseq", f"{out.request.cseq[0]} ACK")
    out.ack = SipRequest("ACK", request_uri, ack).to_bytes()
    out.ack_target = await ua._resolve(next_hop, out.target)
    ua._send(out.ack, out.ack_target)

    answer = parse_sdp(response.body) if response.body else SdpError("no SDP answer")
    agreed = None
    if not isinstance(answer, SdpError):
        try:
            agreed = negotiate(answer)
        except NotAcceptable as exc:
            log.warning("outbound call %s: unusable SDP answer (%s)", out.request.call_id[:8], exc)
    call = Call(
        call_id=out.request.call_id,
        caller=from_user,
        caller_display="",
        dialled=dialled,
        local_tag=local_tag,
        remote_tag=remote_tag,
        media=media,
        codec=agreed.codec if agreed else "PCMU",
        on_hangup=ua._hangup_requested,
    )
    holder["call"] = call
    ua.calls[call.call_id] = call
    ua._dialogs[call.call_id] = _Dialog(
        call=call,
        local_uri=local_uri,
        remote_uri=to_value,
        remote_target=remote_target,
        route_set=route_set,
        source=out.target,
        local_cseq=1,
        invite_cseq=1,
        sdp_session_id=session_id,
        sdp_version=1,
        offer=answer if not isinstance(answer, SdpError) else None,
    )
    if agreed is None:  # a 200 without usable media: hang up right away (RFC 3261 13.2.1)
        call.state = CallState.ANSWERED
        call._begin(handler)
        call.hangup()
        raise CallFailed(488, "answer without usable audio")
    media.codec = G711Codec(agreed.codec)
    media.dtmf_payload_type = agreed.dtmf_payload_type
    media.remote = (agreed.remote_address, agreed.remote_port) if agreed.remote_address else None
    media.send_enabled = agreed.direction in ("sendrecv", "sendonly")
    call.state = CallState.ANSWERED
    call.answered_at = call.created_at
    log.info(
        "outbound call %s answered (%s%s)",
        call.call_id[:8],
        agreed.codec,
        ", telephone-event" if agreed.dtmf_payload_type is not None else "",
    )
    media.start()
    call._begin(handler)
    ua._spawn(ua._watch_media(call))
    return call


__all__ = ["CallFailed", "EndReason", "build_offer", "place_call"]
