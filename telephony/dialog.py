"""One SIP dialog (RFC 3261 12), the same for a call we answered (UAS) and a call we placed (UAC).

A dialog is what both ends agreed on when the INVITE succeeded: the Call-ID, our tag and theirs,
the CSeq counters, the route set and the remote target. Every request we send inside it (BYE, the
ACK for a 2xx) is built here, and every request the far end sends in it (BYE, INFO, re-INVITE) is
matched here, so an incoming and an outgoing call are ended, routed and answered by one code path.

The two ways in differ only in where the state is read from (RFC 3261 12.1.1 and 12.1.2):

- ``Dialog.as_uas(invite, local_tag, source)``: their INVITE. The route set is the INVITE's
  Record-Route in order, the remote target its Contact, our URI its To (plus our tag).
- ``Dialog.as_uac(invite, response, target)``: our INVITE and their 2xx. The route set is the
  2xx's Record-Route reversed, the remote target the 2xx's Contact, their URI the 2xx's To.

``request(method, ...)`` builds an in-dialog request (Route set, Request-URI, From/To with tags,
CSeq: one more than the last for BYE/INFO/OPTIONS/re-INVITE, the INVITE's own for the 2xx ACK);
``next_hop`` is where it goes first (the first route when it is a loose router, else the target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .sip_message import Headers, SipRequest, SipResponse, parse_name_addr

if TYPE_CHECKING:
    from .call import Call
    from .sdp import SessionDescription


@dataclass
class Dialog:
    """The state of one dialog, and the requests built from it. ``call`` is set once media is agreed."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str  # the From of our requests: our name-addr with our tag
    remote_uri: str  # the To of our requests: their name-addr with their tag
    remote_target: str  # their Contact URI: the Request-URI of our requests
    route_set: list[str]  # Route values of our requests, in the order they are sent
    peer: tuple[str, int]  # where their signalling came from (a fallback when a name does not resolve)
    local_cseq: int  # the CSeq of our last request in the dialog
    invite_cseq: int  # the CSeq of the INVITE that made the dialog (its ACK repeats it)
    is_uac: bool  # True when we sent the INVITE
    sdp_session_id: int = 0
    sdp_version: int = 1
    offer: "SessionDescription | None" = None  # the last session description they sent
    call: "Call | None" = None
    hangup_pending: bool = False  # a UAS may not send BYE before the ACK (RFC 3261 15)

    # the two ways a dialog is made ----------------------------------------------------------
    @classmethod
    def as_uas(cls, invite: SipRequest, local_tag: str, source: tuple[str, int], *, local_cseq: int,
               remote_target: str | None = None) -> "Dialog":
        """The dialog our answer to ``invite`` makes (RFC 3261 12.1.1): Record-Route kept in order."""
        if remote_target is None:
            contacts = invite.headers.get_all("contact")
            remote_target = str(parse_name_addr(contacts[0]).uri if contacts else invite.from_.uri)
        return cls(
            call_id=invite.call_id, local_tag=local_tag, remote_tag=invite.from_.tag or "",
            local_uri=f"{invite.headers.get('to')};tag={local_tag}", remote_uri=invite.headers.get("from") or "",
            remote_target=remote_target, route_set=invite.headers.get_all("record-route"), peer=source,
            local_cseq=local_cseq, invite_cseq=invite.cseq[0], is_uac=False,
        )

    @classmethod
    def as_uac(cls, invite: SipRequest, response: SipResponse, target: tuple[str, int]) -> "Dialog":
        """The dialog their 2xx to our ``invite`` makes (RFC 3261 12.1.2): Record-Route reversed."""
        to_value = response.headers.get("to") or ""
        try:
            remote_tag = parse_name_addr(to_value).tag or ""
            contacts = response.headers.get_all("contact")
            remote_target = str(parse_name_addr(contacts[0]).uri) if contacts else invite.uri
        except (ValueError, IndexError):
            remote_tag, remote_target = "", invite.uri
        return cls(
            call_id=invite.call_id, local_tag=invite.from_.tag or "", remote_tag=remote_tag,
            local_uri=invite.headers.get("from") or "", remote_uri=to_value, remote_target=remote_target,
            route_set=list(reversed(response.headers.get_all("record-route"))), peer=target,
            local_cseq=invite.cseq[0], invite_cseq=invite.cseq[0], is_uac=True,
        )

    # requests they send -------------------------------------------------------------------
    def matches(self, request: SipRequest) -> bool:
        """Whether ``request`` belongs to this dialog: their tag in From, ours in To."""
        return request.call_id == self.call_id and request.to.tag == self.local_tag \
            and request.from_.tag == self.remote_tag

    # requests we send -----------------------------------------------------------------------
    def route(self) -> tuple[str, str, list[str]]:
        """(Request-URI, next hop URI, Route values) of our next request (RFC 3261 12.2.1.1).

        A loose router first (``;lr``): the Request-URI is the remote target, the request goes to
        the first route. A strict router (RFC 2543) first: it goes in the Request-URI, and the
        remote target becomes the last Route."""
        routes = list(self.route_set)
        if not routes:
            return self.remote_target, self.remote_target, routes
        first = parse_name_addr(routes[0])
        if "lr" in first.uri.params:
            return self.remote_target, str(first.uri), routes
        strict = str(first.uri)
        return strict, strict, routes[1:] + [f"<{self.remote_target}>"]

    @property
    def next_hop(self) -> str:
        return self.route()[1]

    def request(self, method: str, *, via: str, extra: list[tuple[str, str]] | None = None,
                body: bytes = b"") -> SipRequest:
        """An in-dialog request with top Via ``via``. ACK repeats the INVITE's CSeq (the ACK of a 2xx,
        RFC 3261 13.2.2.4); any other method takes the next local CSeq."""
        if method == "ACK":
            cseq = self.invite_cseq
        else:
            self.local_cseq += 1
            cseq = self.local_cseq
        request_uri, _, routes = self.route()
        headers = Headers()
        headers.add("via", via)
        headers.add("max-forwards", "70")
        for route in routes:
            headers.add("route", route)
        headers.add("from", self.local_uri)
        headers.add("to", self.remote_uri)
        headers.add("call-id", self.call_id)
        headers.add("cseq", f"{cseq} {method}")
        for name, value in extra or []:
            headers.add(name, value)
        return SipRequest(method, request_uri, headers, body)


__all__ = ["Dialog"]
