"""Every endpoint of the hub, HTTP and WebSocket, is classified here, and each class is enforced.

Adding a route? Add one line to ROUTES with who may use it. An unclassified route fails
``test_every_route_is_classified``: nobody adds an endpoint without deciding who may call it.

Levels (who is admitted; everybody else must get 401/403, or a WebSocket closed before accept):
- ``public``: anyone, no token.
- ``resident``: only the resident holding *this* conversation's token (not another resident's,
  not staff: staff reach conversations through the agent routes).
- ``agent`` / ``supervisor`` / ``admin``: logged-in staff with at least that role.
- ``party`` / ``assigned_agent``: video calls (see PARTY and ASSIGNED below).
Each route is tried with: no credentials, the conversation's own resident token, another
resident's token, an agent, a supervisor, an admin, and an agent who logged out.
"""

from __future__ import annotations

import pytest
from tests.support import ADMIN_PASSWORD, client_from, open_session, staff_login
from starlette.routing import Mount
from starlette.websockets import WebSocketDisconnect

PUBLIC, RESIDENT, AGENT, SUPERVISOR, ADMIN = "public", "resident", "agent", "supervisor", "admin"
# The conversation's resident, or the agent who claimed it, or a supervisor/admin. The agent of this
# test has claimed nothing, so it is refused (claiming is tested with the agent desk).
PARTY = "party"
# The agent who claimed the conversation, or a supervisor/admin; never the resident.
ASSIGNED = "assigned_agent"

# (method, path) -> level. Methods: GET/POST/PUT/PATCH/DELETE, "WS" for WebSocket routes, "MOUNT"
# for mounted apps (static files).
ROUTES: dict[tuple[str, str], str] = {
    # operations and documentation
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    # web chat
    ("GET", "/"): PUBLIC,
    ("MOUNT", "/static"): PUBLIC,
    ("POST", "/api/sessions"): PUBLIC,
    ("POST", "/api/sessions/{session_id}/messages"): RESIDENT,
    ("GET", "/api/sessions/{session_id}/messages"): RESIDENT,
    ("WS", "/api/sessions/{session_id}/ws"): RESIDENT,
    # knowledge base: public policy text, also used by the action server
    ("GET", "/api/kb/search"): PUBLIC,
    ("GET", "/api/kb/entries/{entry_id}"): PUBLIC,
    ("POST", "/api/kb/answer"): PUBLIC,
    ("GET", "/api/kb/more/{entry_id}"): PUBLIC,
    # staff accounts
    ("POST", "/api/staff/login"): PUBLIC,
    ("POST", "/api/staff/logout"): AGENT,
    ("GET", "/api/staff/me"): AGENT,
    ("GET", "/api/staff/users"): ADMIN,
    ("POST", "/api/staff/users"): ADMIN,
    ("PATCH", "/api/staff/users/{username}"): ADMIN,
    ("GET", "/api/staff/audit"): ADMIN,
    # conversation actions of the resident (widget, surveys)
    ("POST", "/api/sessions/{session_id}/escalate"): RESIDENT,
    ("POST", "/api/sessions/{session_id}/close"): RESIDENT,
    ("GET", "/api/sessions/{session_id}/survey"): RESIDENT,
    ("POST", "/api/sessions/{session_id}/survey"): RESIDENT,
    # pages and scripts: static, the data behind them needs a login or a conversation token
    ("GET", "/agent"): PUBLIC,
    ("GET", "/agent/call"): PUBLIC,
    ("GET", "/video"): PUBLIC,
    ("GET", "/staff/analytics"): PUBLIC,
    ("GET", "/widget.js"): PUBLIC,
    ("GET", "/widget-demo"): PUBLIC,
    ("GET", "/widget-demo.css"): PUBLIC,
    # Prometheus metrics (aggregates, no personal data); the ingress does not route it (deploy/)
    ("GET", "/metrics"): PUBLIC,  # unless XIAOZHI_METRICS_TOKEN is set: test_analytics.py
    # agent desk
    ("GET", "/api/agent/config"): AGENT,
    ("GET", "/api/agent/canned"): AGENT,
    ("GET", "/api/agent/kb/search"): AGENT,
    ("GET", "/api/agent/queue"): AGENT,
    ("GET", "/api/agent/queue/{item_id}"): AGENT,
    ("POST", "/api/agent/queue/{item_id}/claim"): AGENT,
    ("POST", "/api/agent/queue/{item_id}/close"): AGENT,
    ("POST", "/api/agent/queue/{item_id}/messages"): AGENT,
    ("POST", "/api/agent/queue/{item_id}/release"): AGENT,
    ("POST", "/api/agent/queue/{item_id}/transfer"): AGENT,
    ("WS", "/api/agent/ws"): AGENT,
    # analytics and exports
    ("GET", "/api/staff/analytics"): SUPERVISOR,
    ("GET", "/api/staff/analytics/export.csv"): SUPERVISOR,
    ("GET", "/api/staff/analytics/regions"): SUPERVISOR,
    # the knowledge console (issue 18): agents read, supervisors edit and send for review, admins publish
    ("GET", "/staff/knowledge"): PUBLIC,
    ("GET", "/api/staff/kb/records"): AGENT,
    ("GET", "/api/staff/kb/records/{kind}/{record_id}"): AGENT,
    ("POST", "/api/staff/kb/check/{kind}"): SUPERVISOR,
    ("POST", "/api/staff/kb/records/{kind}"): SUPERVISOR,
    ("PUT", "/api/staff/kb/records/{kind}/{record_id}"): SUPERVISOR,
    ("POST", "/api/staff/kb/records/{kind}/{record_id}/state"): SUPERVISOR,
    ("POST", "/api/staff/kb/records/{kind}/{record_id}/restore"): SUPERVISOR,
    ("POST", "/api/staff/kb/publish"): ADMIN,
    ("GET", "/api/staff/kb/publications"): AGENT,
    ("GET", "/api/staff/kb/reminders"): AGENT,
    ("GET", "/api/staff/kb/records/{kind}/{record_id}/answered"): SUPERVISOR,
    ("POST", "/api/staff/kb/import-packs"): ADMIN,
    ("GET", "/api/staff/kb/template.{fmt}"): AGENT,
    ("GET", "/api/staff/kb/export.{fmt}"): AGENT,
    ("POST", "/api/staff/kb/import"): SUPERVISOR,
    # video: a kiosk opens its own conversation; then only the conversation's parties
    ("POST", "/api/video/sessions"): PUBLIC,
    ("GET", "/api/video/config"): PUBLIC,  # the recording notice and camera size, before a conversation exists
    ("GET", "/api/video/sessions/{conversation_id}"): PARTY,
    ("POST", "/api/video/sessions/{conversation_id}/resident/offer"): RESIDENT,
    ("POST", "/api/video/sessions/{conversation_id}/agent/offer"): ASSIGNED,
    ("POST", "/api/video/sessions/{conversation_id}/chat"): PARTY,
    ("POST", "/api/video/sessions/{conversation_id}/hangup"): PARTY,
    ("WS", "/api/video/sessions/{conversation_id}/ws"): PARTY,
}

ADMITTED = {
    PUBLIC: {"anonymous", "resident", "other_resident", "agent", "supervisor", "admin", "logged_out"},
    RESIDENT: {"resident"},
    AGENT: {"agent", "supervisor", "admin"},
    SUPERVISOR: {"supervisor", "admin"},
    ADMIN: {"admin"},
    PARTY: {"resident", "supervisor", "admin"},
    ASSIGNED: {"supervisor", "admin"},
}
IDENTITIES = ["anonymous", "resident", "other_resident", "agent", "supervisor", "admin", "logged_out"]


def _flatten(routes):
    """Routes as the application serves them, routers included (FastAPI nests included routers)."""
    try:
        from fastapi.routing import _iter_included_route_candidates

        yield from _iter_included_route_candidates(routes)
    except ImportError:  # older FastAPI: included routes are already flat
        yield from routes


def app_routes(app) -> set[tuple[str, str]]:
    found = set()
    for route in _flatten(app.routes):
        path = getattr(route, "path", None)
        if path is None:
            continue
        if isinstance(route, Mount):
            found.add(("MOUNT", path))
        elif getattr(route, "methods", None):
            found |= {(m, path) for m in route.methods if m != "HEAD"}
        else:
            found.add(("WS", path))
    return found


def test_every_route_is_classified(hub):
    routes = app_routes(hub.app)
    unclassified = sorted(routes - ROUTES.keys())
    assert not unclassified, (
        "classify these routes in tests/staff/test_authorization.py ROUTES (public / resident / agent / "
        f"supervisor / admin): {unclassified}"
    )
    stale = sorted(ROUTES.keys() - routes)
    assert not stale, f"ROUTES names endpoints the hub no longer has: {stale}"


class Identities:
    """Credentials of each identity; staff tokens are renewed whenever a request ended them (logout)."""

    def __init__(self, client) -> None:
        self.client = client
        self.session_id, resident = open_session(client)
        self.other_session_id, other = open_session(client)
        self.tokens = {"resident": resident["Authorization"][7:], "other_resident": other["Authorization"][7:]}
        admin = self._login("admin", ADMIN_PASSWORD)
        for role in ("agent", "supervisor"):
            r = client.post(
                "/api/staff/users",
                json={"username": f"authz_{role}", "password": f"authz-{role}-pass-1", "role": role},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert r.status_code == 201, r.text
        self.tokens["admin"] = admin
        self.refresh()
        gone = self._login("authz_agent", "authz-agent-pass-1")
        assert client.post("/api/staff/logout", headers={"Authorization": f"Bearer {gone}"}).status_code == 204
        self.tokens["logged_out"] = gone

    def _login(self, username: str, password: str) -> str:
        r = self.client.post("/api/staff/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        return r.json()["token"]

    def refresh(self) -> None:
        for role, password in (("agent", "authz-agent-pass-1"), ("supervisor", "authz-supervisor-pass-1"),
                               ("admin", ADMIN_PASSWORD)):
            token = self.tokens.get(role)
            if token is None or self.client.get("/api/staff/me", headers={"Authorization": f"Bearer {token}"}).status_code != 200:
                username = "admin" if role == "admin" else f"authz_{role}"
                self.tokens[role] = self._login(username, password)

    def token(self, identity: str) -> str | None:
        return self.tokens.get(identity)


PARAMS = {"username": "authz_agent", "entry_id": "no-such-entry", "item_id": "999999", "kind": "point",
          "record_id": "no-such-record", "fmt": "csv"}


def concrete(path: str, ids: Identities) -> str:
    import re

    def value(match):
        name = match.group(1).split(":")[0]
        if name in ("session_id", "conversation_id"):
            return ids.session_id
        return PARAMS.get(name, "1")

    return re.sub(r"\{([^}]+)\}", value, path)


# A valid body for routes that validate the body before they check who is calling (a 422 would
# hide the answer to "who may call this"); every other write gets ``{}``.
BODIES: dict[tuple[str, str], dict] = {
    ("POST", "/api/video/sessions/{conversation_id}/resident/offer"): {"sdp": "v=0 not really an offer", "type": "offer"},
    ("POST", "/api/video/sessions/{conversation_id}/agent/offer"): {"sdp": "v=0 not really an offer", "type": "offer"},
    ("POST", "/api/video/sessions/{conversation_id}/chat"): {"text": "授权测试"},
}


def _http(client, method: str, url: str, token: str | None, body: dict | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs = {"json": body if body is not None else {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, url, headers=headers, **kwargs)


def _websocket_admitted(client, url: str, token: str | None) -> bool:
    sep = "&" if "?" in url else "?"
    target = f"{url}{sep}token={token}" if token else url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with client.websocket_connect(target, headers=headers):
            return True
    except WebSocketDisconnect as closed:
        assert closed.code in (1008, 4401, 4403), f"{url}: refused with an unexpected close code {closed.code}"
        return False


@pytest.fixture
def trusted_client(hub):
    """The hub seen from an exempt address, so dozens of logins are not rate-limited."""
    return client_from(hub, "127.0.0.1", raise_server_exceptions=False)


def test_each_route_admits_exactly_its_level(hub, trusted_client):
    ids = Identities(trusted_client)
    problems = []
    checked = 0
    for (method, path), level in sorted(ROUTES.items()):
        if (method, path) not in app_routes(hub.app):
            continue
        if method == "MOUNT":
            method, path = "GET", path + "/chat.js"
        for identity in IDENTITIES:
            ids.refresh()
            url = concrete(path, ids)
            should = identity in ADMITTED[level]
            if method == "WS":
                admitted = _websocket_admitted(trusted_client, url, ids.token(identity))
                detail = "accepted" if admitted else "refused"
            else:
                r = _http(trusted_client, method, url, ids.token(identity), BODIES.get((method, path)))
                if r.status_code >= 500:
                    problems.append(f"{method} {url} as {identity}: {r.status_code} {r.text[:120]}")
                admitted = r.status_code not in (401, 403)
                detail = r.status_code
            checked += 1
            if admitted != should:
                problems.append(f"{method} {path} ({level}) as {identity}: {detail}")
    assert checked >= 7 * len(ROUTES) - 7
    assert not problems, "\n".join(problems)


def test_a_resident_token_never_opens_another_conversation(hub, trusted_client):
    """The wrong resident is refused with 403 (it is a valid token, for another conversation)."""
    ids = Identities(trusted_client)
    other = ids.token("other_resident")
    r = _http(trusted_client, "GET", f"/api/sessions/{ids.session_id}/messages", other)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = _http(trusted_client, "POST", f"/api/sessions/{ids.session_id}/messages", other)
    assert r.status_code == 403
    assert not _websocket_admitted(trusted_client, f"/api/sessions/{ids.session_id}/ws", other)
    # a staff token is not a conversation token either
    r = _http(trusted_client, "GET", f"/api/sessions/{ids.session_id}/messages", ids.token("admin"))
    assert r.status_code == 401


def test_admin_reads_of_accounts_and_of_the_audit_log_are_audited(hub):
    admin = staff_login(hub)
    assert hub.get("/api/staff/users", headers=admin).status_code == 200
    first = hub.get("/api/staff/audit", headers=admin, params={"limit": 50}).json()
    assert any(e["action"] == "user.list" and e["actor"] == "admin" for e in first)
    assert not any(e["action"] == "audit.read" for e in first)  # recorded after the read it records
    again = hub.get("/api/staff/audit", headers=admin, params={"actor": "admin"}).json()
    read = next(e for e in again if e["action"] == "audit.read")
    assert read["detail"]["limit"] == 50 and read["client"]
