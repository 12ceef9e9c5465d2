"""One SIP dialog for calls we answer and calls we place (telephony/dialog.py), and the user agent using
it for both: the route set (Record-Route in order for the UAS, reversed for the UAC), CSeq, the
headers of our in-dialog requests, tag matching, and a BYE from the far end ending an incoming and
an outgoing call through the same path. Plus the shape of the package: no import cycle between
telephony modules, and outbound calls reach the user agent only through public names."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from telephony import Call, CallHandler, EndReason
from telephony.dialog import Dialog
from telephony.sip_message import SipRequest, SipResponse, build_response, parse_message, parse_name_addr
from telephony.testing import PeerCall, SipPeer, running_user_agent

TELEPHONY = Path(__file__).resolve().parents[2] / "telephony"


def message(text: str) -> SipRequest | SipResponse:
    parsed = parse_message(text.replace("\n", "\r\n").encode())
    assert isinstance(parsed, (SipRequest, SipResponse)), parsed
    return parsed


INVITE_IN = """INVITE sip:12393@10.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKin1
Record-Route: <sip:p1.example.net;lr>
Record-Route: <sip:p2.example.net;lr>
Max-Forwards: 69
From: "Resident" <sip:13812345678@carrier.example>;tag=theirs
To: <sip:12393@10.0.0.1>
Call-ID: in-1@carrier
CSeq: 314 INVITE
Contact: <sip:13812345678@10.0.0.9:5070>
Content-Length: 0

"""

INVITE_OUT = """INVITE sip:survey-1@10.0.0.5 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKout1;rport
Max-Forwards: 70
From: <sip:yibao-survey@10.0.0.1:5060>;tag=ours
To: <sip:survey-1@10.0.0.5>
Call-ID: out-1@10.0.0.1
CSeq: 1 INVITE
Content-Length: 0

"""

OK_OUT = """SIP/2.0 200 OK
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKout1;rport
Record-Route: <sip:near-callee.example.net;lr>
Record-Route: <sip:near-us.example.net;lr>
From: <sip:yibao-survey@10.0.0.1:5060>;tag=ours
To: <sip:survey-1@10.0.0.5>;tag=theirs
Call-ID: out-1@10.0.0.1
CSeq: 1 INVITE
Contact: <sip:phone@10.0.0.7:5080>
Content-Length: 0

"""


def uas() -> Dialog:
    invite = message(INVITE_IN)
    return Dialog.as_uas(invite, "ours", ("10.0.0.9", 5060), local_cseq=41)


def uac() -> Dialog:
    return Dialog.as_uac(message(INVITE_OUT), message(OK_OUT), ("10.0.0.5", 5060))


def test_a_dialog_we_answer_keeps_the_record_route_in_order_and_their_contact_as_target() -> None:
    d = uas()
    assert d.route_set == ["<sip:p1.example.net;lr>", "<sip:p2.example.net;lr>"]
    assert d.remote_target == "sip:13812345678@10.0.0.9:5070"
    assert (d.call_id, d.local_tag, d.remote_tag, d.invite_cseq, d.is_uac) == ("in-1@carrier", "ours", "theirs", 314, False)
    assert parse_name_addr(d.local_uri).tag == "ours" and parse_name_addr(d.local_uri).uri.user == "12393"
    assert parse_name_addr(d.remote_uri).tag == "theirs" and parse_name_addr(d.remote_uri).uri.user == "13812345678"


def test_a_dialog_we_placed_reverses_the_record_route_and_targets_the_2xx_contact() -> None:
    d = uac()
    assert d.route_set == ["<sip:near-us.example.net;lr>", "<sip:near-callee.example.net;lr>"]
    assert d.remote_target == "sip:phone@10.0.0.7:5080"
    assert (d.call_id, d.local_tag, d.remote_tag, d.invite_cseq, d.local_cseq, d.is_uac) == (
        "out-1@10.0.0.1", "ours", "theirs", 1, 1, True)
    assert parse_name_addr(d.remote_uri).tag == "theirs" and parse_name_addr(d.local_uri).uri.user == "yibao-survey"


def test_in_dialog_requests_carry_route_tags_and_a_rising_cseq_and_ack_keeps_the_invites() -> None:
    for d, first_route, their_user, cseq in ((uas(), "p1.example.net", "13812345678", 41),
                                             (uac(), "near-us.example.net", "survey-1", 1)):
        bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbye")
        info = d.request("INFO", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinfo", body=b"Signal=1")
        ack = d.request("ACK", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKack")
        assert (bye.cseq, info.cseq, ack.cseq) == ((cseq + 1, "BYE"), (cseq + 2, "INFO"), (d.invite_cseq, "ACK"))
        again = parse_message(bye.to_bytes())  # what goes on the wire reads back the same
        assert isinstance(again, SipRequest)
        assert again.uri == d.remote_target  # loose routing: the target stays in the Request-URI
        assert again.headers.get_all("route") == d.route_set
        assert parse_name_addr(again.headers.get_all("route")[0]).uri.host == first_route
        assert d.next_hop == f"sip:{first_route};lr"
        assert (again.from_.tag, again.to.tag, again.call_id) == ("ours", "theirs", d.call_id)
        assert again.to.uri.user == their_user
        assert again.headers.get("max-forwards") == "70" and again.top_via.branch == "z9hG4bKbye"
        assert info.body == b"Signal=1"


def test_a_strict_first_router_takes_the_request_uri_and_the_target_becomes_the_last_route() -> None:
    d = uas()
    d.route_set = ["<sip:strict.example.net>", "<sip:p2.example.net;lr>"]
    bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKs")
    assert bye.uri == "sip:strict.example.net" and d.next_hop == "sip:strict.example.net"
    assert bye.headers.get_all("route") == ["<sip:p2.example.net;lr>", "<sip:13812345678@10.0.0.9:5070>"]
    d.route_set = []
    bye = d.request("BYE", via="SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKn")
    assert bye.uri == d.next_hop == "sip:13812345678@10.0.0.9:5070" and bye.headers.get_all("route") == []


def test_a_request_belongs_to_the_dialog_only_with_both_tags_the_right_way_round() -> None:
    def bye(from_tag: str, to_tag: str, call_id: str = "in-1@carrier") -> SipRequest:
        return message(f"""BYE sip:12393@10.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKb
From: <sip:13812345678@carrier.example>;tag={from_tag}
To: <sip:12393@10.0.0.1>;tag={to_tag}
Call-ID: {call_id}
CSeq: 315 BYE
Content-Length: 0

""")

    d = uas()
    assert d.matches(bye("theirs", "ours"))
    assert not d.matches(bye("ours", "theirs"))
    assert not d.matches(bye("theirs", "other"))
    assert not d.matches(bye("theirs", "ours", call_id="another@carrier"))


class Ended(CallHandler):
    def __init__(self) -> None:
        self.ended: list[tuple[str, EndReason]] = []

    async def on_call_ended(self, call: Call, reason) -> None:
        self.ended.append((call.call_id, reason))


@pytest.fixture
async def peers():
    """Two scripted SIP peers for a user agent's port: a caller and the phone we call."""
    made: list[SipPeer] = []

    def make(port: int) -> tuple[SipPeer, SipPeer]:
        made.extend((SipPeer(port), SipPeer(port)))
        return made[-2], made[-1]

    yield make
    for peer in made:
        peer.close()


async def answer_invite(peer: SipPeer, tag: str) -> SipRequest:
    """The peer answers the user agent's INVITE with 200 OK (a proxy on its side record-routes)."""
    invite = await peer.expect("INVITE")
    assert isinstance(invite, SipRequest)
    sdp = peer.sdp_offer("0 101").encode()
    ok = build_response(invite, 200, to_tag=tag, body=sdp, extra=[
        ("record-route", f"<sip:127.0.0.1:{peer.port};lr;proxy=callee-side>"),
        ("record-route", f"<sip:127.0.0.1:{peer.port};lr;proxy=our-side>"),
        ("contact", f"<sip:phone@127.0.0.1:{peer.port}>"), ("content-type", "application/sdp")])
    peer.send(ok.to_bytes())
    return invite


async def test_incoming_and_outgoing_calls_share_the_dialog_path_both_ways(peers) -> None:
    handler = Ended()
    async with running_user_agent(handler) as ua:
        caller, phone = peers(ua.port)
        incoming, _ = await caller.answered_call()
        placing = asyncio.create_task(ua.place_call(f"sip:survey-1@127.0.0.1:{phone.port}", handler))
        invite = await answer_invite(phone, "phonetag")
        ack = await phone.expect("ACK")
        outgoing = await placing
        # the 2xx ACK is an in-dialog request: to the Contact, through the reversed Record-Route
        assert ack.uri == f"sip:phone@127.0.0.1:{phone.port}"
        assert [parse_name_addr(r).uri.params["proxy"] for r in ack.headers.get_all("route")] == \
            ["our-side", "callee-side"]
        assert ack.cseq == (1, "ACK") and ack.to.tag == "phonetag"

        dialogs = {d.is_uac: d for d in ua.dialogs.values()}
        assert set(dialogs) == {False, True} and all(isinstance(d, Dialog) for d in dialogs.values())
        assert dialogs[False].call_id == incoming.call_id and dialogs[True].call is outgoing

        # a BYE from either far end finds its dialog by the same tag match and ends the call
        caller.in_dialog("BYE", incoming)
        await caller.expect(200)
        their_side = PeerCall(call_id=outgoing.call_id, from_tag="phonetag", to_tag=invite.from_.tag, cseq=7)
        phone.in_dialog("BYE", their_side)
        await phone.expect(200)
        for _ in range(50):
            if len(handler.ended) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(handler.ended) == sorted([(incoming.call_id, EndReason.REMOTE_HANGUP),
                                                (outgoing.call_id, EndReason.REMOTE_HANGUP)])
        assert ua.calls == {}
        # once ended, neither dialog takes requests any more (481), however it was made
        caller.in_dialog("BYE", incoming)
        await caller.expect(481)
        phone.in_dialog("BYE", their_side)
        await phone.expect(481)


async def test_our_bye_leaves_through_each_dialogs_route_set_with_its_next_cseq(peers) -> None:
    async with running_user_agent(CallHandler()) as ua:
        caller, phone = peers(ua.port)
        incoming, _ = await caller.answered_call(
            extra_headers=f"Record-Route: <sip:127.0.0.1:{caller.port};lr;proxy=first>, "
                          f"<sip:127.0.0.1:{caller.port};lr;proxy=second>\r\n")
        placing = asyncio.create_task(ua.place_call(f"sip:survey-1@127.0.0.1:{phone.port}", CallHandler()))
        await answer_invite(phone, "phonetag")
        await phone.expect("ACK")
        outgoing = await placing
        await asyncio.sleep(0.05)
        answered = next(c for c in ua.calls.values() if c is not outgoing)
        in_cseq = ua.dialogs[answered.call_id].local_cseq
        answered.hangup()
        outgoing.hangup()
        bye_in = await caller.expect("BYE")
        bye_out = await phone.expect("BYE")
        # UAS: Record-Route as received; UAC: reversed; each with the next CSeq of its own dialog
        assert [parse_name_addr(r).uri.params["proxy"] for r in bye_in.headers.get_all("route")] == ["first", "second"]
        assert [parse_name_addr(r).uri.params["proxy"] for r in bye_out.headers.get_all("route")] == \
            ["our-side", "callee-side"]
        assert bye_in.cseq == (in_cseq + 1, "BYE") and bye_out.cseq == (2, "BYE")
        assert bye_in.uri == f"sip:13812345678@127.0.0.1:{caller.port}" and bye_out.uri == f"sip:phone@127.0.0.1:{phone.port}"
        assert (bye_in.from_.tag, bye_in.to.tag) == (answered.local_tag, incoming.from_tag)
        assert (bye_out.from_.tag, bye_out.to.tag) == (outgoing.local_tag, "phonetag")
        for peer, bye in ((caller, bye_in), (phone, bye_out)):
            peer.send(build_response(bye, 200).to_bytes())


def _runtime_imports(path: Path) -> set[str]:
    """telephony modules ``path`` imports when it runs (TYPE_CHECKING blocks left out, function bodies in)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("telephony."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("telephony."))
    return found


def test_telephony_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: _runtime_imports(p) for p in TELEPHONY.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i for i in deps if i in graph} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    assert "dialog" in graph["user_agent"] and "dialog" in graph["outbound"]
    for module in sorted(graph):
        visit(module, [])


def test_outbound_calls_use_only_public_names_of_the_user_agent() -> None:
    tree = ast.parse((TELEPHONY / "outbound.py").read_text())
    private = sorted({ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and n.attr.startswith("_") and not n.attr.startswith("__")
                      and ast.unparse(n.value) != "self"})
    assert private == [], f"outbound.py reaches into private attributes: {private}"
    reflective = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "setattr", "hasattr")]
    assert reflective == [], f"outbound.py reads or attaches attributes by name: {reflective}"
    assert "user_agent" not in _runtime_imports(TELEPHONY / "outbound.py")


def test_our_offer_is_one_our_own_answerer_takes_with_keypad_events() -> None:
    from telephony.sdp import build_offer, negotiate, parse_sdp

    agreed = negotiate(parse_sdp(build_offer(address="10.0.0.1", port=40000, session_id=7)))
    assert (agreed.codec, agreed.dtmf_payload_type, agreed.remote_address, agreed.remote_port, agreed.direction) == (
        "PCMU", 101, "10.0.0.1", 40000, "sendrecv")
