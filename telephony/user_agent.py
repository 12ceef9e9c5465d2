"""The SIP user agent (UDP): answers calls from a carrier trunk or a PBX and hands them to a CallHandler.

Server side: INVITE (100 Trying, 180 Ringing, 200 OK with SDP answer retransmitted until ACK),
ACK, BYE, CANCEL (487 for the pending INVITE), OPTIONS, INFO (dtmf-relay); 405/501 for the rest.
Client side: its own BYE, routed through the dialog's route set and retransmitted until answered.
Outbound calls (UAC INVITE, ACK, CANCEL): ``place_call``, served by the :class:`OutboundCalls` this
user agent owns (telephony/outbound.py, follow-up surveys), which reaches back only through the
public endpoint methods below (``send``, ``resolve``, ``local_host``, ``contact``, ``via``, ``spawn``,
``establish``).
Responses follow the top Via (RFC 3261 18.2.2) with rport/received (RFC 3581).

Dialogs: one :class:`telephony.dialog.Dialog` per call, made by ``Dialog.as_uas`` for an INVITE we
answer and by ``Dialog.as_uac`` for a call we placed, kept in ``dialogs`` by Call-ID. Whatever the
far end sends in a dialog (BYE, INFO, re-INVITE) and whatever we send in it (``request``: BYE) goes
through the same code for both kinds of call.

A call that fails in any way (cancelled before it was set up, refused, never acknowledged, media
that cannot be sent, a bug) leaves no call, RTP socket or slot behind: ``_answer`` cleans up
whatever it opened, and ``_end_call`` always forgets the call, even when closing its media fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Coroutine

from .call import Call, CallEvents, CallState, EndReason
from .dialog import Dialog
from .g711 import G711Codec
from .handler import CallHandler
from .media_stream import MediaStream
from .outbound import OutboundCalls
from .privacy import mask_number, mask_sip_text
from .sdp import NotAcceptable, SdpError, build_answer, negotiate, parse_sdp
from .sip_message import (
    Headers, SipParseError, SipRequest, SipResponse, build_response, new_branch, new_tag, parse_message,
    parse_name_addr, parse_uri, parse_via, reason_phrase,
)

log = logging.getLogger("telephony.sip")

ALLOWED_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO")
KNOWN_NOT_ALLOWED = ("REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "REFER", "UPDATE", "PRACK", "PUBLISH")
_DTMF_RELAY = re.compile(r"Signal\s*=\s*([0-9*#A-Da-d])")


@dataclass
class UserAgentConfig:
    """Settings of the SIP endpoint; every field has a production-sensible default.

    Args:
        host / port: where SIP is received (UDP).
        advertised_host: the address put in Contact, Via and SDP (a public or PBX-facing IP);
            defaults to ``host``, or to the interface facing the caller when ``host`` is 0.0.0.0.
        rtp_port_range: even RTP ports are taken from this range (open it in the firewall);
            None lets the OS choose.
        t1 / t2: RFC 3261 timers (retransmission starts at t1, doubles up to t2, gives up at 64*t1).
        answer_delay_s: how long to ring before answering.
        max_calls: further INVITEs get 486 Busy Here.
        max_datagram_bytes: larger SIP datagrams are dropped unread.
        rtp_timeout_s: hang up when no RTP arrived for this long (0: never).
        send_silence: keep sending silence between prompts.
    """

    host: str = "127.0.0.1"
    port: int = 5060
    advertised_host: str | None = None
    rtp_port_range: tuple[int, int] | None = (10000, 20000)
    t1: float = 0.5
    t2: float = 4.0
    answer_delay_s: float = 0.0
    max_calls: int = 200
    max_datagram_bytes: int = 8192
    rtp_timeout_s: float = 60.0
    send_silence: bool = True
    user_agent_name: str = "yibao-xiaozhi-telephony/0.1"


@dataclass
class _InviteTransaction:
    """An INVITE server transaction, and for a 2xx the retransmissions the dialog owes until ACK."""

    request: SipRequest
    addr: tuple[str, int]
    call: Call | None = None
    media: MediaStream | None = None  # opened for this INVITE, until a Call owns it
    last_response: bytes | None = None
    final_status: int | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _transaction_key(request: SipRequest) -> tuple[str, ...]:
    via = request.top_via
    branch = via.branch or ""
    if branch.startswith("z9hG4bK"):
        return (branch, via.sent_by)
    # RFC 2543 peers: no magic cookie, fall back to the dialog identifiers
    return (request.call_id, str(request.cseq[0]), request.from_.tag or "", via.sent_by)


class UserAgent(asyncio.DatagramProtocol):
    """Listens for SIP on UDP; each accepted INVITE becomes a :class:`Call` served by ``handler``."""

    def __init__(self, handler: CallHandler, config: UserAgentConfig | None = None) -> None:
        self.handler = handler
        self.config = config or UserAgentConfig()
        self.calls: dict[str, Call] = {}
        self.stats: dict[str, int] = {
            "received": 0, "dropped_oversized": 0, "dropped_unparseable": 0, "bad_request": 0,
            "retransmitted_responses": 0, "calls_answered": 0, "calls_rejected": 0,
        }
        self.dialogs: dict[str, Dialog] = {}  # by Call-ID, incoming and outgoing calls alike
        self.outbound = OutboundCalls(self)
        self._invites: dict[tuple[str, ...], _InviteTransaction] = {}
        self._invite_by_cseq: dict[tuple[str, int], _InviteTransaction] = {}
        self._completed: dict[tuple[str, ...], tuple[bytes, tuple[str, int]]] = {}
        self._client: dict[str, asyncio.Future[int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._opening = 0  # INVITEs whose RTP socket is being opened: they hold a slot already
        self._transport: asyncio.DatagramTransport | None = None
        self.port: int = self.config.port
        self._last_garbage_log = -1e9

    @property
    def slots_in_use(self) -> int:
        """Calls holding one of ``max_calls`` slots (live calls and INVITEs being set up)."""
        return len(self.calls) + self._opening

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.config.host, self.config.port))
        self._transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]
        log.info("SIP user agent listening on udp:%s:%s", self.config.host, self.port)

    async def stop(self) -> None:
        """Hang up every call (BYE), wait briefly for the answers, and close."""
        byes = []
        for call in list(self.calls.values()):
            dialog = self.dialogs.get(call.call_id)
            if call.state is CallState.CONFIRMED and dialog is not None:
                byes.append(self.spawn(self.request(dialog, "BYE")))
            await self._end_call(call, EndReason.SHUTDOWN)
        if byes:
            await asyncio.wait(byes, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sip task failed", exc_info=task.exception())

    # transport -------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.stats["received"] += 1
        source = (addr[0], addr[1])
        if len(data) > self.config.max_datagram_bytes:
            self.stats["dropped_oversized"] += 1
            log.warning("dropped an oversized SIP datagram (%d bytes) from %s:%s", len(data), *source)
            return
        if not data.strip(b"\r\n\x00 "):
            return  # keep-alive
        try:
            message = parse_message(data)
            if isinstance(message, SipParseError):
                self._on_parse_error(message, source, data)
            elif isinstance(message, SipRequest):
                self._on_request(message, source)
            else:
                self._on_response(message)
        except Exception:  # nothing a peer sends may take the user agent down
            log.exception("error handling a SIP datagram from %s:%s", *source)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP socket: %s", exc)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def local_host(self, toward: str | None = None) -> str:
        if self.config.advertised_host:
            return self.config.advertised_host
        if self.config.host not in ("0.0.0.0", "::", ""):
            return self.config.host
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((toward or "192.0.2.1", 9))
                return s.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    def contact(self, toward: str | None = None) -> str:
        return f"<sip:xiaozhi@{self.local_host(toward)}:{self.port}>"

    # responses -------------------------------------------------------------------------------
    def _stamp_via(self, request: SipRequest, source: tuple[str, int]) -> SipRequest:
        """Add received/rport to the top Via (RFC 3261 18.2.1, RFC 3581)."""
        vias = request.headers.get_all("via")
        top = parse_via(vias[0])
        params = dict(top.params)
        changed = False
        if top.host.strip("[]") != source[0]:
            params["received"] = source[0]
            changed = True
        if "rport" in params:
            params["rport"] = str(source[1])
            params["received"] = source[0]
            changed = True
        if not changed:
            return request
        port = f":{top.port}" if top.port else ""
        param_text = "".join(f";{k}={v}" if v else f";{k}" for k, v in params.items())
        vias[0] = f"SIP/2.0/{top.transport} {top.host}{port}{param_text}"
        headers = Headers()
        for v in vias:
            headers.add("via", v)
        for name, value in request.headers.items():
            if name != "via":
                headers.add(name, value)
        return SipRequest(request.method, request.uri, headers, request.body)

    def _response_target(self, headers: Headers, source: tuple[str, int]) -> tuple[str, int]:
        try:
            via = parse_via(headers.get_all("via")[0])
        except (ValueError, IndexError):
            return source
        if "rport" in via.params:  # RFC 3581: reply to where the request came from
            rport = via.params["rport"]
            return (via.params.get("received") or source[0], int(rport) if rport.isdigit() else source[1])
        host = via.params.get("received") or via.host.strip("[]")
        if not _is_ip(host):
            return source  # we do not resolve names for replies; the source is where it came from
        return (host, via.port or 5060)

    def _reply(self, request: SipRequest, source: tuple[str, int], status: int, **kwargs: Any) -> bytes:
        extra = list(kwargs.pop("extra", []) or [])
        extra.append(("server", self.config.user_agent_name))
        if status in (405, 501) or (request.method == "OPTIONS" and status == 200):
            extra.append(("allow", ", ".join(ALLOWED_METHODS)))
        response = build_response(request, status, extra=extra, **kwargs)
        data = response.to_bytes()
        self.send(data, self._response_target(request.headers, source))
        if request.method not in ("INVITE", "ACK"):
            key = _transaction_key(request) + (request.method,)
            self._completed[key] = (data, source)
            asyncio.get_running_loop().call_later(64 * self.config.t1, self._completed.pop, key, None)
        return data

    def _on_parse_error(self, error: SipParseError, source: tuple[str, int], data: bytes) -> None:
        self.stats["dropped_unparseable"] += 1
        if not error.can_reply:
            now = asyncio.get_running_loop().time()
            if now - self._last_garbage_log >= 1.0:  # a flood must not flood the logs too
                self._last_garbage_log = now
                log.info("ignored unreadable SIP datagrams (%d so far), latest from %s:%s: %s",
                         self.stats["dropped_unparseable"], source[0], source[1], error.reason)
            log.debug("unreadable datagram: %r", mask_sip_text(data[:300].decode("utf-8", "replace")))
            return
        assert error.headers is not None
        self.stats["bad_request"] += 1
        log.info("400 Bad Request to %s:%s (%s)", source[0], source[1], error.reason)
        response = build_response(None, 400, headers=error.headers, to_tag=new_tag(),
                                  reason=f"Bad Request ({error.reason})"[:100],
                                  extra=[("server", self.config.user_agent_name)])
        self.send(response.to_bytes(), self._response_target(error.headers, source))

    # requests --------------------------------------------------------------------------------
    def _on_request(self, request: SipRequest, source: tuple[str, int]) -> None:
        request = self._stamp_via(request, source)
        method = request.method
        log.debug("%s from %s:%s call %s", method, source[0], source[1], request.call_id[:12])
        if method == "ACK":
            self._on_ack(request)
            return
        key = _transaction_key(request)
        if method == "INVITE" and key in self._invites:
            tx = self._invites[key]
            if tx.last_response is not None:  # a retransmitted INVITE: repeat our last answer
                self.stats["retransmitted_responses"] += 1
                self.send(tx.last_response, self._response_target(request.headers, source))
            return
        cached = self._completed.get(key + (method,))
        if cached is not None:
            self.stats["retransmitted_responses"] += 1
            self.send(cached[0], self._response_target(request.headers, source))
            return
        if method == "CANCEL":
            self._on_cancel(request, source)
            return
        mf = request.headers.get("max-forwards")
        if mf is not None and int(mf) == 0 and method != "OPTIONS":
            self._reply(request, source, 483, to_tag=new_tag())
            return
        require = request.headers.get_all("require")
        if require and method != "CANCEL":
            self._reply(request, source, 420, to_tag=new_tag(), extra=[("unsupported", ", ".join(require))])
            return
        if method == "INVITE":
            self._on_invite(request, source, key)
        elif method == "BYE":
            self._on_bye(request, source)
        elif method == "OPTIONS":
            self._reply(request, source, 200, to_tag=None if request.to.tag else new_tag(),
                        extra=[("accept", "application/sdp"), ("contact", self.contact(source[0]))])
        elif method == "INFO":
            self._on_info(request, source)
        elif method in KNOWN_NOT_ALLOWED:
            self._reply(request, source, 405, to_tag=None if request.to.tag else new_tag())
        else:
            self._reply(request, source, 501, to_tag=None if request.to.tag else new_tag())

    def _dialog_for(self, request: SipRequest) -> Dialog | None:
        """The live dialog ``request`` belongs to, a call we answered or one we placed alike."""
        dialog = self.dialogs.get(request.call_id)
        if dialog is None or dialog.call is None or not dialog.matches(request):
            return None
        if dialog.call.state is CallState.ENDED:
            return None  # kept only so retransmissions are absorbed; new requests get 481
        return dialog

    # INVITE ----------------------------------------------------------------------------------
    def _on_invite(self, request: SipRequest, source: tuple[str, int], key: tuple[str, ...]) -> None:
        if request.to.tag:
            self._on_reinvite(request, source, key)
            return
        tx = _InviteTransaction(request, source)
        self._invites[key] = tx
        self._invite_by_cseq[(request.call_id, request.cseq[0])] = tx
        trying = build_response(request, 100, extra=[("server", self.config.user_agent_name)]).to_bytes()
        tx.last_response = trying
        self.send(trying, self._response_target(request.headers, source))
        self.spawn(self._answer(tx, key))

    def _final(self, tx: _InviteTransaction, key: tuple[str, ...], status: int, *, to_tag: str,
               extra: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        """Send a final response to an INVITE and retransmit it until ACK (or 64*T1)."""
        extra = list(extra or []) + [("server", self.config.user_agent_name)]
        response = build_response(tx.request, status, to_tag=to_tag, extra=extra, body=body,
                                  copy_record_route=200 <= status < 300)
        tx.final_status = status
        tx.last_response = response.to_bytes()
        self.send(tx.last_response, self._response_target(tx.request.headers, tx.addr))
        self.spawn(self._retransmit_final(tx, key))

    async def _retransmit_final(self, tx: _InviteTransaction, key: tuple[str, ...]) -> None:
        t1, t2 = self.config.t1, self.config.t2
        interval, waited = t1, 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 64 * t1
        try:
            while not tx.acked.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(tx.acked.wait(), min(interval, remaining))
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        break
                    assert tx.last_response is not None
                    self.stats["retransmitted_responses"] += 1
                    self.send(tx.last_response, self._response_target(tx.request.headers, tx.addr))
                    waited += interval
                    interval = min(interval * 2, t2)
            if not tx.acked.is_set() and tx.final_status is not None and 200 <= tx.final_status < 300 and tx.call:
                log.warning("call %s: no ACK for 200 OK after %.1f s, hanging up", tx.call.call_id[:8], 64 * t1)
                dialog = self.dialogs.get(tx.call.call_id)
                if dialog is not None:
                    self.spawn(self.request(dialog, "BYE"))
                await self._end_call(tx.call, EndReason.ACK_TIMEOUT)
        finally:
            # keep absorbing retransmitted INVITEs a little longer, then forget the transaction
            loop.call_later(max(0.0, deadline - loop.time()) + 1.0, self._forget_invite, key, tx)

    def _forget_invite(self, key: tuple[str, ...], tx: _InviteTransaction) -> None:
        if self._invites.get(key) is tx:
            del self._invites[key]
        cseq_key = (tx.request.call_id, tx.request.cseq[0])
        if self._invite_by_cseq.get(cseq_key) is tx:
            del self._invite_by_cseq[cseq_key]

    async def _answer(self, tx: _InviteTransaction, key: tuple[str, ...]) -> None:
        """Answer a new INVITE; whatever goes wrong, nothing it opened outlives the transaction."""
        try:
            await self._set_up_call(tx, key)
        except Exception:
            log.exception("call %s: setting up the call failed", tx.request.call_id[:12])
            if tx.final_status is None:
                self._final(tx, key, 500, to_tag=tx.call.local_tag if tx.call else new_tag())
            if tx.call is not None:
                await self._end_call(tx.call, EndReason.REJECTED)
        finally:
            if tx.call is None and tx.media is not None:  # opened, never handed to a call
                await tx.media.close()
            tx.media = None

    async def _set_up_call(self, tx: _InviteTransaction, key: tuple[str, ...]) -> None:
        if tx.final_status is not None:
            return  # CANCELled (487) before we got here
        request, source = tx.request, tx.addr
        local_tag = new_tag()
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if self.slots_in_use >= self.config.max_calls:
            self.stats["calls_rejected"] += 1
            self._final(tx, key, 486, to_tag=local_tag)
            return
        if request.call_id in self.dialogs:
            self._final(tx, key, 482, to_tag=local_tag)  # a merged request (RFC 3261 8.2.2.2)
            return
        if not request.body:
            # delayed offer is not supported yet: an SDP offer must come with the INVITE
            self.stats["calls_rejected"] += 1
            self._final(tx, key, 488, to_tag=local_tag, extra=[("warning", '399 xiaozhi "SDP offer required"')])
            return
        if content_type != "application/sdp":
            self._final(tx, key, 415, to_tag=local_tag, extra=[("accept", "application/sdp")])
            return
        offer = parse_sdp(request.body)
        if isinstance(offer, SdpError):
            log.info("400 for an INVITE with bad SDP (%s)", offer.reason)
            self._final(tx, key, 400, to_tag=local_tag, extra=[("warning", '399 xiaozhi "Bad SDP"')])
            return
        try:
            agreed = negotiate(offer)
        except NotAcceptable as exc:
            self.stats["calls_rejected"] += 1
            log.info("488 for call %s: %s", request.call_id[:12], exc)
            self._final(tx, key, 488, to_tag=local_tag, extra=[("warning", '304 xiaozhi "Media type not available"')])
            return
        try:
            from_ = request.from_
            to = request.to
            ruri = parse_uri(request.uri)
            contact_values = request.headers.get_all("contact")
            remote_target = parse_name_addr(contact_values[0]).uri if contact_values else from_.uri
        except (ValueError, IndexError):
            self._final(tx, key, 400, to_tag=local_tag)
            return
        caller = from_.uri.user
        pai = request.headers.get_all("p-asserted-identity")
        if pai:
            try:
                caller = parse_name_addr(pai[0]).uri.user or caller
            except ValueError:
                pass
        dialled = ruri.user or to.uri.user
        codec = G711Codec(agreed.codec)
        events = CallEvents()
        media = MediaStream(
            codec=codec, dtmf_payload_type=agreed.dtmf_payload_type,
            remote=(agreed.remote_address, agreed.remote_port) if agreed.remote_address else None,
            on_audio=events.audio, on_dtmf=events.dtmf,
            send_silence=self.config.send_silence, label=request.call_id[:8],
            confirmed=False, trusted_hosts=(source[0], agreed.remote_address or ""),
        )
        media.send_enabled = agreed.direction in ("sendrecv", "sendonly")
        tx.media = media
        self._opening += 1
        try:
            rtp_port = await media.open(self.config.host or "0.0.0.0", self.config.rtp_port_range)
        except OSError as exc:
            log.error("no RTP port for call %s: %s", request.call_id[:12], exc)
            self._final(tx, key, 503, to_tag=local_tag, extra=[("retry-after", "5")])
            return
        finally:
            self._opening -= 1
        if tx.final_status is not None:
            log.info("call %s cancelled while it was being set up", request.call_id[:12])
            return  # the finally of _answer closes the socket
        if not media.can_reach(agreed.remote_address):
            self.stats["calls_rejected"] += 1
            log.info("488 for call %s: media address %s is not reachable from our RTP socket",
                     request.call_id[:12], agreed.remote_address)
            self._final(tx, key, 488, to_tag=local_tag,
                        extra=[("warning", '301 xiaozhi "Incompatible network address formats"')])
            return
        dialog = Dialog.as_uas(request, local_tag, source, local_cseq=secrets.randbelow(10000) + 1,
                               remote_target=str(remote_target))
        dialog.sdp_session_id = secrets.randbelow(2**31)
        dialog.offer = offer
        call = self._adopt(dialog, media, events, caller=caller, caller_display=from_.display, dialled=dialled,
                           codec=agreed.codec)
        tx.call = call  # from here on the call owns the socket: _end_call closes it
        log.info("call %s from %s to %s (%s%s)", call.call_id[:8], mask_number(caller), mask_number(dialled),
                 agreed.codec, ", telephone-event" if agreed.dtmf_payload_type is not None else "")
        contact = ("contact", self.contact(source[0]))
        ringing = build_response(request, 180, to_tag=local_tag, copy_record_route=True,
                                 extra=[contact, ("server", self.config.user_agent_name)]).to_bytes()
        tx.last_response = ringing
        self.send(ringing, self._response_target(request.headers, source))
        if self.config.answer_delay_s > 0:
            try:
                await asyncio.wait_for(tx.cancelled.wait(), self.config.answer_delay_s)
            except asyncio.TimeoutError:
                pass
        if tx.cancelled.is_set() or call.state is CallState.ENDED:
            await self._end_call(call, EndReason.CANCELLED)  # a no-op when it has ended already
            return
        host = self.local_host(source[0])
        answer = build_answer(offer, agreed, address=host, port=rtp_port,
                              session_id=dialog.sdp_session_id, version=dialog.sdp_version)
        call.state = CallState.ANSWERED
        self.stats["calls_answered"] += 1
        self._final(tx, key, 200, to_tag=local_tag, body=answer, extra=[
            contact, ("allow", ", ".join(ALLOWED_METHODS)), ("content-type", "application/sdp")])
        media.start()
        self.spawn(self._watch_media(call))

    def _on_reinvite(self, request: SipRequest, source: tuple[str, int], key: tuple[str, ...]) -> None:
        """A mid-call INVITE (hold, session refresh, media change): answer with our current stream."""
        dialog = self._dialog_for(request)
        if dialog is None:
            self._reply(request, source, 481)
            return
        tx = _InviteTransaction(request, source, call=None)
        self._invites[key] = tx
        self._invite_by_cseq[(request.call_id, request.cseq[0])] = tx
        call = dialog.call
        offer = parse_sdp(request.body) if request.body else None
        if offer is None:
            offer = dialog.offer  # no offer: repeat our current answer
        if offer is None or isinstance(offer, SdpError):
            self._final(tx, key, 400, to_tag=dialog.local_tag)
            return
        try:
            agreed = negotiate(offer)
        except NotAcceptable:
            self._final(tx, key, 488, to_tag=dialog.local_tag)
            return
        media = call.media
        if not media.can_reach(agreed.remote_address):
            self._final(tx, key, 488, to_tag=dialog.local_tag,
                        extra=[("warning", '301 xiaozhi "Incompatible network address formats"')])
            return
        media.codec = G711Codec(agreed.codec)
        media.dtmf_payload_type = agreed.dtmf_payload_type
        media.remote = (agreed.remote_address, agreed.remote_port) if agreed.remote_address else None
        media.send_enabled = agreed.remote_address is not None and agreed.direction in ("sendrecv", "sendonly")
        call.codec = agreed.codec
        dialog.offer = offer
        dialog.sdp_version += 1
        answer = build_answer(offer, agreed, address=self.local_host(source[0]), port=media.local_port or 0,
                              session_id=dialog.sdp_session_id, version=dialog.sdp_version)
        self._final(tx, key, 200, to_tag=dialog.local_tag, body=answer,
                    extra=[("contact", self.contact(source[0])), ("content-type", "application/sdp")])

    def _on_ack(self, request: SipRequest) -> None:
        try:
            tx = self._invite_by_cseq.get((request.call_id, request.cseq[0]))
        except ValueError:
            return
        if tx is None or tx.acked.is_set():
            return
        call = tx.call
        if call is not None and tx.final_status is not None and 200 <= tx.final_status < 300 \
                and request.to.tag != call.local_tag:
            return  # not an ACK of our 200 OK: whoever sent it never saw it
        tx.acked.set()
        if call is None or tx.final_status is None or not 200 <= tx.final_status < 300:
            return
        call.media.confirm()  # the caller has our answer: media may go where its SDP says
        if call.state is CallState.ANSWERED:
            call._begin(self.handler)
            dialog = self.dialogs.get(call.call_id)
            if dialog is not None and dialog.hangup_pending:
                self._hangup_requested(call, EndReason.LOCAL_HANGUP)

    def _on_cancel(self, request: SipRequest, source: tuple[str, int]) -> None:
        tx = self._invites.get(_transaction_key(request))
        if tx is None or tx.request.method != "INVITE":
            self._reply(request, source, 481, to_tag=new_tag())
            return
        self._reply(request, source, 200, to_tag=tx.call.local_tag if tx.call else new_tag())
        if tx.final_status is not None:
            return  # already answered: CANCEL has no effect
        tx.cancelled.set()
        call = tx.call
        key = _transaction_key(tx.request)
        self._final(tx, key, 487, to_tag=call.local_tag if call else new_tag())
        if call is not None:
            log.info("call %s cancelled before answer", call.call_id[:8])
            self.spawn(self._end_call(call, EndReason.CANCELLED))

    def _on_bye(self, request: SipRequest, source: tuple[str, int]) -> None:
        dialog = self._dialog_for(request)
        if dialog is None:
            self._reply(request, source, 481)
            return
        self._reply(request, source, 200)
        log.info("call %s: caller hung up", dialog.call.call_id[:8])
        self.spawn(self._end_call(dialog.call, EndReason.REMOTE_HANGUP))

    def _on_info(self, request: SipRequest, source: tuple[str, int]) -> None:
        dialog = self._dialog_for(request)
        if dialog is None:
            self._reply(request, source, 481)
            return
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        body = request.body.decode("utf-8", "replace")
        digit = None
        if ctype == "application/dtmf-relay":
            m = _DTMF_RELAY.search(body)
            digit = m.group(1).upper() if m else None
        elif ctype == "application/dtmf":
            digit = body.strip()[:1].upper() or None
        elif request.body:
            self._reply(request, source, 415, extra=[("accept", "application/dtmf-relay, application/dtmf")])
            return
        if digit and digit in "0123456789*#ABCD":
            dialog.call._push_dtmf(digit)
        self._reply(request, source, 200)

    # ending calls ----------------------------------------------------------------------------
    def _hangup_requested(self, call: Call, reason: EndReason) -> None:
        dialog = self.dialogs.get(call.call_id)
        if call.state is CallState.INCOMING:
            tx = self._invite_by_cseq.get((call.call_id, dialog.invite_cseq)) if dialog else None
            if tx is not None and tx.final_status is None:
                tx.cancelled.set()
                self._final(tx, _transaction_key(tx.request), 480, to_tag=call.local_tag)
            self.spawn(self._end_call(call, EndReason.REJECTED))
            return
        if call.state is CallState.ANSWERED and dialog is not None:
            dialog.hangup_pending = True  # a UAS may not send BYE before the ACK (RFC 3261 15)
            return
        if call.state is CallState.CONFIRMED and dialog is not None:
            self.spawn(self.request(dialog, "BYE"))
        self.spawn(self._end_call(call, reason))

    async def _end_call(self, call: Call, reason: EndReason) -> None:
        if call.state is CallState.ENDED and call.call_id not in self.calls:
            return
        call._finish(reason)
        try:
            await call.media.close()
        finally:  # the slot is freed even if closing the media failed
            if self.calls.get(call.call_id) is call:
                del self.calls[call.call_id]
            # keep the dialog a while so retransmitted BYEs still match, then forget it
            asyncio.get_running_loop().call_later(64 * self.config.t1, self._forget_dialog, call)
        await call._join()

    def _forget_dialog(self, call: Call) -> None:
        dialog = self.dialogs.get(call.call_id)
        if dialog is not None and dialog.call is call:
            del self.dialogs[call.call_id]

    async def _watch_media(self, call: Call) -> None:
        timeout = self.config.rtp_timeout_s
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        while call.state is not CallState.ENDED:
            await asyncio.sleep(min(1.0, timeout / 4))
            last = call.media.last_received_at
            if call.state is CallState.CONFIRMED and call.media.receive_enabled and last is not None \
                    and loop.time() - last > timeout and call.media.remote is not None:
                log.warning("call %s: no RTP for %.0f s, hanging up", call.call_id[:8], timeout)
                dialog = self.dialogs.get(call.call_id)
                if dialog is not None:
                    self.spawn(self.request(dialog, "BYE"))
                await self._end_call(call, EndReason.RTP_TIMEOUT)

    # dialogs: calls we answered and calls we placed --------------------------------------------
    def _adopt(self, dialog: Dialog, media: MediaStream, events: CallEvents, *, caller: str,
               caller_display: str, dialled: str, codec: str) -> Call:
        """Make the call of ``dialog`` and keep both: from here on requests in the dialog find it."""
        call = Call(call_id=dialog.call_id, caller=caller, caller_display=caller_display, dialled=dialled,
                    local_tag=dialog.local_tag, remote_tag=dialog.remote_tag, media=media, codec=codec,
                    on_hangup=self._hangup_requested)
        dialog.call = call
        events.call = call
        self.calls[call.call_id] = call
        self.dialogs[call.call_id] = dialog
        return call

    def establish(self, dialog: Dialog, media: MediaStream, events: CallEvents, handler: CallHandler, *,
                  caller: str, caller_display: str, dialled: str, codec: str) -> Call:
        """A dialog we made as UAC (our 2xx ACK sent): its call is confirmed at once and served by ``handler``."""
        call = self._adopt(dialog, media, events, caller=caller, caller_display=caller_display,
                           dialled=dialled, codec=codec)
        call.state = CallState.ANSWERED
        call.answered_at = call.created_at
        call._begin(handler)
        self.spawn(self._watch_media(call))
        return call

    def via(self, toward: str | None, branch: str) -> str:
        """The top Via of a request we send toward ``toward`` (rport asked for, RFC 3581)."""
        return f"SIP/2.0/UDP {self.local_host(toward)}:{self.port};branch={branch};rport"

    async def request(self, dialog: Dialog, method: str = "BYE") -> int | None:
        """Send an in-dialog request (non-INVITE client transaction, RFC 3261 17.1.2) through the route
        set; return the final status, or None when unanswered after 64*T1 (Timer F)."""
        branch = new_branch()
        request = dialog.request(method, via=self.via(dialog.peer[0], branch),
                                 extra=[("user-agent", self.config.user_agent_name)])
        data = request.to_bytes()
        target = await self.resolve(dialog.next_hop, dialog.peer)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._client[branch] = future
        interval, t2 = self.config.t1, self.config.t2
        deadline = loop.time() + 64 * self.config.t1
        try:
            while True:
                self.send(data, target)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("call %s: %s not answered", dialog.call_id[:8], method)
                    return None
                try:
                    return await asyncio.wait_for(asyncio.shield(future), min(interval, remaining))
                except asyncio.TimeoutError:
                    interval = min(interval * 2, t2)
        finally:
            self._client.pop(branch, None)

    async def resolve(self, uri_text: str, fallback: tuple[str, int]) -> tuple[str, int]:
        """Where to send a request for ``uri_text`` (maddr, else the host: an IP or a name looked up)."""
        try:
            uri = parse_uri(uri_text)
        except ValueError:
            return fallback
        host = uri.params.get("maddr") or uri.host
        port = uri.port or 5060
        if _is_ip(host):
            return (host.strip("[]"), port)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            return (infos[0][4][0], port)
        except OSError:
            return fallback

    def _on_response(self, response: SipResponse) -> None:
        try:
            branch = parse_via(response.headers.get_all("via")[0]).branch or ""
        except (ValueError, IndexError):
            return
        if self.outbound.on_response(response, branch):  # our own INVITEs (outbound calls)
            return
        future = self._client.get(branch)
        if future is not None and response.status >= 200 and not future.done():
            future.set_result(response.status)

    async def place_call(self, uri: str, handler: CallHandler | None = None, *, from_user: str = "xiaozhi",
                         ring_timeout_s: float = 45.0, extra_headers: list[tuple[str, str]] | None = None) -> Call:
        """Call ``uri`` (a trunk or SIP URI) and return the confirmed call; its events go to ``handler``
        (default: this user agent's). Raises ``telephony.outbound.CallFailed``. See telephony/outbound.py."""
        return await self.outbound.place(uri, handler or self.handler, from_user=from_user,
                                         ring_timeout_s=ring_timeout_s, extra_headers=extra_headers)


__all__ = ["UserAgent", "UserAgentConfig", "reason_phrase"]
