"""Schema fuzzing of the hub's HTTP API from its own OpenAPI description (schemathesis, in-process ASGI).

Every operation gets generated valid and invalid requests, with and without a valid resident token
and a valid admin token; no request may produce a 5xx, and responses must match the documented
schema and content type. Rate limits are off here (they would answer 429 to the fuzzer's volume;
they are tested in test_security.py).
"""

from __future__ import annotations

import json
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.support import ADMIN_PASSWORD


@pytest.fixture(scope="module")
def fuzz_app(settings, knowledge_base, tmp_path_factory):
    from pydantic import SecretStr

    from xiaozhi.hub.app import create_app
    from tests.support import free_port

    s = settings.model_copy(
        update={
            "var_dir": tmp_path_factory.mktemp("fuzz"),
            "rasa_url": f"http://127.0.0.1:{free_port()}",  # nothing there: degraded mode, fast
            "rasa_timeout_s": 2.0,
            "kb_reload_interval_s": 0,
            "admin_password": SecretStr(ADMIN_PASSWORD),
            "rate_limit_enabled": False,
        }
    )
    return create_app(s, knowledge_base=knowledge_base)


@pytest.fixture(scope="module")
def credentials(fuzz_app):
    """A real resident session and a real admin login, so the fuzzer also gets past authorisation."""
    from schemathesis.python import asgi

    with asgi.get_client(fuzz_app) as client:
        base = f"http://{asgi.HOST}"
        session = client.post(f"{base}/api/sessions", json={}).json()
        admin = client.post(f"{base}/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()
    return session, admin["token"]


def _schema():
    """The OpenAPI description of an application built the same way (building one starts nothing).

    (schemathesis' lazy ``from_fixture`` loader does not work with pytest 9, so the schema is read
    at import; requests go to the ``fuzz_app`` fixture, which shares the session's knowledge base.)
    """
    from xiaozhi.hub.app import create_app
    from xiaozhi.settings import Settings

    return schemathesis.openapi.from_dict(create_app(Settings(kb_reload_interval_s=0)).openapi())


schema = _schema()


def half(value) -> bool:
    """A fair, stable coin for a generated value: the same answer in every run and every process
    (``hash()`` of a str changes with PYTHONHASHSEED, so the same case met different credentials)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    return zlib.crc32(text.encode("utf-8")) % 2 == 0


# The fixture's admin must stay usable for the whole run: with the admin's own token, a generated
# PATCH /api/staff/users/admin could disable it or change its role or password (which revokes the
# token), and every later admin case would be a 401 that tests nothing. Such requests go to another
# user instead (404 or a real update of a fuzz-created account; either is a valid answer).
ADMIN_SELF = ("/api/staff/users/{username}", "admin")


def aim(case, session: dict, admin_token: str) -> None:
    """Give about half the cases real credentials (deterministically) and keep the admin intact."""
    path = case.operation.path
    if "{session_id}" in path or "{conversation_id}" in path:
        # half the time the real conversation with its own token, else whatever was generated
        if case.path_parameters and half(case.path_parameters):
            key = "session_id" if "{session_id}" in path else "conversation_id"
            case.path_parameters[key] = session["session_id"]
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {session['token']}"}
    elif path.startswith(("/api/staff", "/api/agent")) and not path.endswith("/login"):
        if half([case.method, path, case.query, case.path_parameters]):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {admin_token}"}
    if path == ADMIN_SELF[0] and case.method.upper() != "GET" and (case.path_parameters or {}).get("username") == ADMIN_SELF[1]:
        case.path_parameters["username"] = "fuzz-someone-else"
    if path.endswith("/logout"):
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.slow
def test_api_answers_every_generated_request_without_a_server_error(case, fuzz_app, credentials):
    session, admin_token = credentials
    aim(case, session, admin_token)
    case.call_and_validate(app=fuzz_app, checks=[not_a_server_error, response_schema_conformance,
                                                 content_type_conformance])


@pytest.mark.slow
def test_the_admin_is_still_logged_in_after_the_fuzzing(fuzz_app, credentials):
    """Runs after the fuzz cases (same module fixtures): they never locked the admin out."""
    from schemathesis.python import asgi

    with asgi.get_client(fuzz_app) as client:
        me = client.get(f"http://{asgi.HOST}/api/staff/me", headers={"Authorization": f"Bearer {credentials[1]}"})
    assert me.status_code == 200 and me.json()["username"] == "admin"


EXPECTED_HALVES = [True, False, False, False, True, False, False, True]


def test_the_credential_choice_is_stable_across_runs():
    # Fixed expectations: with hash() these flip with PYTHONHASHSEED from one run to the next.
    samples = [{"session_id": "a"}, {"session_id": "b"}, {"conversation_id": "x1"}, {"conversation_id": "日"},
               ["GET", "/api/staff/users", {"limit": 3}, None], ["PATCH", "/api/staff/users/{username}", None, {"username": "z"}],
               {"session_id": ""}, {"conversation_id": "0"}]
    assert [half(s) for s in samples] == EXPECTED_HALVES
    assert sum(half({"session_id": str(i)}) for i in range(200)) in range(70, 131)  # roughly fair


def test_generated_requests_never_change_the_admins_own_account():
    class Case:
        class operation:
            path = "/api/staff/users/{username}"

        method = "PATCH"
        query = None
        headers = None
        path_parameters = {"username": "admin"}

    case = Case()
    aim(case, {"session_id": "s", "token": "t"}, "admin-token")
    assert case.path_parameters["username"] != "admin"


def test_symbols_that_crash_the_tokenizer_still_get_an_answer(hub):
    """Found by this fuzzing: ° and ± made the e5 tokenizer panic (a BaseException), which escaped
    every handler; "体温38.5°C" is an ordinary thing to write."""
    from tests.support import open_session

    assert hub.get("/api/kb/search", params={"q": "体温38.5°C能报销吗"}).status_code == 200
    sid, auth = open_session(hub)
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "发烧39°C，门诊±多少能报"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["replies"][0]["meta"].get("degraded") is True


# -- issue 19: whatever characters a JSON string can carry ----------------------------------------------
from hypothesis import given, strategies as st  # noqa: E402

ANY_CHARACTER = st.characters(exclude_categories=())  # lone surrogates, NUL, controls, format characters too
ODD_TEXTS = st.text(ANY_CHARACTER, max_size=20) | st.sampled_from(
    ["\x00", "医保\x00卡", "\ud800", "报销\udfff", "\u200b\u200b", "\ufeff", "\u2060\u200d", " \x00 ", "\ud83d\ude00"])


@pytest.fixture(scope="module")
def own_session(fuzz_app):
    """A conversation of this test's own (the schema fuzzing may have closed the shared one)."""
    from schemathesis.python import asgi

    with asgi.get_client(fuzz_app) as client:
        return client.post(f"http://{asgi.HOST}/api/sessions", json={}).json()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(text=ODD_TEXTS)
def test_any_text_is_stored_cleaned_or_refused_in_chinese_never_a_server_error(text, fuzz_app, own_session):
    from schemathesis.python import asgi

    from xiaozhi.hub.infra.schemas import clean_text

    session = own_session
    base = f"http://{asgi.HOST}/api/sessions/{session['session_id']}/messages"
    headers = {"authorization": f"Bearer {session['token']}", "content-type": "application/json"}
    with asgi.get_client(fuzz_app) as client:
        r = client.post(base, data=json.dumps({"text": text}).encode(), headers=headers)
    assert r.status_code in (200, 422), (text, r.status_code, r.text)
    if r.status_code == 200:
        stored = r.json()["message"]["text"]
        received = json.loads(json.dumps(text))  # what the hub decodes: an escaped surrogate pair is one character
        assert stored == clean_text(received) and "\x00" not in stored
        stored.encode("utf-8")  # no lone surrogate left
    else:
        assert r.json()["fields"] == [{"field": "text", "problem": "消息不能为空"}], text
