"""SIP messages (RFC 3261) over UDP: parse datagrams, read the headers a user agent needs, build replies.

``parse_message`` never raises. Bad input yields a :class:`SipParseError`; when enough of a request
was readable to answer it (Via, From, To, Call-ID, CSeq), the error keeps those headers so the user
agent can reply 400 Bad Request.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"
BRANCH_COOKIE = "z9hG4bK"
MAX_HEADERS = 128

COMPACT_FORMS = {
    "v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
    "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event",
    "r": "refer-to", "u": "allow-events", "x": "session-expires", "b": "referred-by",
}
CANONICAL_NAMES = {
    "via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq", "contact": "Contact",
    "content-length": "Content-Length", "content-type": "Content-Type", "max-forwards": "Max-Forwards",
    "record-route": "Record-Route", "route": "Route", "allow": "Allow", "accept": "Accept",
    "supported": "Supported", "require": "Require", "unsupported": "Unsupported", "server": "Server",
    "user-agent": "User-Agent", "www-authenticate": "WWW-Authenticate", "p-asserted-identity": "P-Asserted-Identity",
}
# headers whose comma-separated values are separate entries
MULTI_VALUE = {"via", "route", "record-route", "contact", "allow", "supported", "require", "p-asserted-identity"}

_HAS_TAG = re.compile(r";\s*tag\s*=", re.IGNORECASE)
_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([1-6]\d\d)(?: (.*))?$")
_REASONS = {
    100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK", 400: "Bad Request",
    404: "Not Found", 405: "Method Not Allowed", 415: "Unsupported Media Type", 416: "Unsupported URI Scheme",
    420: "Bad Extension", 480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    483: "Too Many Hops", 486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    482: "Loop Detected", 500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable", 505: "Version Not Supported",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def new_branch() -> str:
    return BRANCH_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(6)


def split_comma_values(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return [v for v in out if v]


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return params


@dataclass
class SipUri:
    scheme: str
    user: str
    host: str
    port: int | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host.strip("[]"))
            return True
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.scheme == "tel":
            return f"tel:{self.user}"
        userinfo = f"{self.user}@" if self.user else ""
        host = self.host
        port = f":{self.port}" if self.port else ""
        params = "".join(f";{k}={v}" if v else f";{k}" for k, v in self.params.items())
        return f"{self.scheme}:{userinfo}{host}{port}{params}"


def parse_uri(text: str) -> SipUri:
    """sip:, sips: or tel: URI; raises ValueError."""
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips", "tel"):
        raise ValueError(f"unsupported URI scheme in {text[:60]!r}")
    rest = rest.split("?", 1)[0]
    if scheme == "tel":
        number, _, params = rest.partition(";")
        if not number:
            raise ValueError("empty tel URI")
        return SipUri("tel", number, "", None, _parse_params(params))
    userinfo, at, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    hostport, _, params = hostpart.partition(";")
    host, port = _split_hostport(hostport)
    return SipUri(scheme, user, host, port, _parse_params(params))


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    hostport = hostport.strip()
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("bad IPv6 reference")
        host, rest = hostport[: end + 1], hostport[end + 1 :]
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = hostport.partition(":")
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-\[\]:_]+", host):
        raise ValueError(f"bad host {host[:60]!r}")
    port = None
    if port_s:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError("bad port")
        port = int(port_s)
    return host, port


@dataclass
class NameAddr:
    """A From/To/Contact/Route value: optional display name, URI, header parameters (tag, lr...)."""

    display: str
    uri: SipUri
    params: dict[str, str]
    raw: str

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")


def parse_name_addr(text: str) -> NameAddr:
    raw = text.strip()
    lt = raw.find("<")
    if lt >= 0:
        gt = raw.find(">", lt)
        if gt < 0:
            raise ValueError("unclosed <")
        display = raw[:lt].strip().strip('"')
        uri = parse_uri(raw[lt + 1 : gt])
        params = _parse_params(raw[gt + 1 :])
    else:
        # addr-spec without brackets: everything after the first ';' is a header parameter
        spec, _, params_s = raw.partition(";")
        display = ""
        uri = parse_uri(spec)
        params = _parse_params(params_s)
    return NameAddr(display, uri, params, raw)


@dataclass
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str]
    raw: str

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port or 5060}"


def parse_via(text: str) -> Via:
    raw = text.strip()
    proto, _, rest = raw.partition(" ")
    parts = proto.split("/")
    if len(parts) != 3 or parts[0].upper() != "SIP" or parts[1] != "2.0":
        raise ValueError("bad Via protocol")
    rest = rest.strip()
    hostport, _, params = rest.partition(";")
    host, port = _split_hostport(hostport)
    return Via(parts[2].upper(), host, port, _parse_params(params), raw)


class Headers:
    """Ordered headers with case-insensitive names (compact forms expanded); values kept verbatim."""

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items or []:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        key = name.strip().lower()
        key = COMPACT_FORMS.get(key, key)
        self._items.append((key, value.strip()))

    def get(self, name: str) -> str | None:
        key = name.lower()
        for k, v in self._items:
            if k == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split for the multi-value headers."""
        key = name.lower()
        out: list[str] = []
        for k, v in self._items:
            if k == key:
                out.extend(split_comma_values(v) if key in MULTI_VALUE else [v])
        return out

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


class _DialogHeaders:
    """What requests and responses alike are matched by: Call-ID and CSeq."""

    headers: Headers

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.headers.get("cseq") or "")


@dataclass
class SipRequest(_DialogHeaders):
    method: str
    uri: str
    headers: Headers
    body: bytes = b""

    @property
    def vias(self) -> list[Via]:
        return [parse_via(v) for v in self.headers.get_all("via")]

    @property
    def top_via(self) -> Via:
        return parse_via(self.headers.get_all("via")[0])

    @property
    def from_(self) -> NameAddr:
        return parse_name_addr(self.headers.get("from") or "")

    @property
    def to(self) -> NameAddr:
        return parse_name_addr(self.headers.get("to") or "")

    @property
    def request_uri(self) -> SipUri:
        return parse_uri(self.uri)

    def to_bytes(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} {SIP_VERSION}", self.headers, self.body)


@dataclass
class SipResponse(_DialogHeaders):
    status: int
    reason: str
    headers: Headers
    body: bytes = b""

    def to_bytes(self) -> bytes:
        return _serialize(f"{SIP_VERSION} {self.status} {self.reason}", self.headers, self.body)


@dataclass
class SipParseError:
    reason: str
    method: str | None = None  # set when the request line was readable
    headers: Headers | None = None  # set when the header block was readable

    @property
    def can_reply(self) -> bool:
        """Enough was read to send a 400 back (never to an ACK)."""
        if self.method is None or self.method == "ACK" or self.headers is None:
            return False
        if not all(self.headers.get(h) for h in ("via", "from", "to", "call-id", "cseq")):
            return False
        try:
            parse_via(self.headers.get_all("via")[0])
        except (ValueError, IndexError):
            return False
        return True


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= 2**31 or not _TOKEN.match(parts[1]):
        raise ValueError(f"bad CSeq {value[:40]!r}")
    return int(parts[0]), parts[1]


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    lines = [start_line]
    for name, value in headers.items():
        if name == "content-length":
            continue
        lines.append(f"{CANONICAL_NAMES.get(name, name.title())}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def parse_message(data: bytes) -> SipRequest | SipResponse | SipParseError:
    try:
        return _parse(data)
    except Exception as exc:  # the parser must never take the user agent down
        return SipParseError(f"unparseable: {type(exc).__name__}")


def _parse(data: bytes) -> SipRequest | SipResponse | SipParseError:
    data = data.lstrip(b"\r\n")  # RFC 3261 7.5: ignore leading CRLFs (also keep-alives)
    if not data:
        return SipParseError("empty datagram")
    sep = data.find(b"\r\n\r\n")
    if sep >= 0:
        head, body = data[:sep], data[sep + 4 :]
    else:
        sep = data.find(b"\n\n")
        head, body = (data[:sep], data[sep + 2 :]) if sep >= 0 else (data, b"")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return SipParseError("header block is not UTF-8")
    lines = text.replace("\r\n", "\n").split("\n")
    start = lines[0].strip()
    method: str | None = None
    status: int | None = None
    reason = ""
    uri = ""
    m = _STATUS_LINE.match(start)
    if m:
        status, reason = int(m.group(1)), m.group(2) or ""
    else:
        parts = start.split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]):
            return SipParseError("bad start line")
        if parts[2] != SIP_VERSION:
            return SipParseError("bad SIP version", method=parts[0].upper())
        method, uri = parts[0], parts[1]
        if method != method.upper():
            return SipParseError("method must be upper case")
    headers = Headers()
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":  # folded continuation of the previous header
            items = headers._items
            if not items:
                return SipParseError("continuation before any header", method=method)
            # RFC 3261 7.3.1: the fold is one SP; a value that began on the next line has no leading space
            items[-1] = (items[-1][0], f"{items[-1][1]} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name.strip()):
            return SipParseError("bad header line", method=method, headers=headers)
        headers.add(name, value)
        count += 1
        if count > MAX_HEADERS:
            return SipParseError("too many headers", method=method)
    cl = headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            return SipParseError("bad Content-Length", method=method, headers=headers)
        n = int(cl)
        if n > len(body):
            return SipParseError("body shorter than Content-Length", method=method, headers=headers)
        body = body[:n]
    for required in ("via", "from", "to", "call-id", "cseq"):
        if not headers.get(required):
            return SipParseError(f"missing {required}", method=method, headers=headers)
    try:
        cseq_num, cseq_method = parse_cseq(headers.get("cseq") or "")
        for via in headers.get_all("via"):  # every hop, not just the top one: responses echo them all
            parse_via(via)
        from_ = parse_name_addr(headers.get("from") or "")
        to = parse_name_addr(headers.get("to") or "")
        if method is not None:
            parse_uri(uri)
    except ValueError as exc:
        return SipParseError(str(exc)[:120], method=method, headers=headers)
    if status is not None:
        return SipResponse(status, reason, headers, body)
    assert method is not None
    if cseq_method != method:
        return SipParseError("CSeq method does not match the request", method=method, headers=headers)
    mf = headers.get("max-forwards")
    if mf is not None and (not mf.isdigit() or int(mf) > 255):
        return SipParseError("bad Max-Forwards", method=method, headers=headers)
    del from_, to, cseq_num
    return SipRequest(method, uri, headers, body)


def build_response(request: SipRequest | None, status: int, *, headers: Headers | None = None,
                   to_tag: str | None = None, reason: str | None = None,
                   extra: list[tuple[str, str]] | None = None, body: bytes = b"",
                   copy_record_route: bool = False) -> SipResponse:
    """A response copying Via, From, To (adding ``to_tag`` if it has none), Call-ID and CSeq."""
    src = request.headers if request is not None else headers
    assert src is not None
    out = Headers()
    for v in src.get_all("via"):
        out.add("via", v)
    if copy_record_route:
        for rr in src.get_all("record-route"):
            out.add("record-route", rr)
    out.add("from", src.get("from") or "")
    to = src.get("to") or ""
    if to_tag and not _HAS_TAG.search(to):
        to = f"{to};tag={to_tag}"
    out.add("to", to)
    out.add("call-id", src.get("call-id") or "")
    out.add("cseq", src.get("cseq") or "")
    for name, value in extra or []:
        out.add(name, value)
    return SipResponse(status, reason or reason_phrase(status), out, body)
