"""The hub's public chat API, with Rasa unreachable: validation, authorisation, persistence, degraded answers."""

import json

import pytest
from tests.support import DATABASES, open_session


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """Every hub and store in this module runs on SQLite and on PostgreSQL (conftest.py)."""
    return request.param


def test_openapi_docs_and_chat_page_are_served(hub):
    assert hub.get("/docs").status_code == 200
    assert "/api/sessions" in hub.get("/openapi.json").json()["paths"]
    page = hub.get("/")
    assert page.status_code == 200 and "医保小智" in page.text


def test_a_session_token_is_unguessable_and_unique(hub):
    first = hub.post("/api/sessions", json={}).json()
    second = hub.post("/api/sessions", json={}).json()
    assert len(first["token"]) >= 40 and first["token"] != second["token"]
    assert first["session_id"] != second["session_id"]


def test_with_rasa_down_the_hub_answers_from_the_knowledge_base_and_says_so(hub):
    sid, auth = open_session(hub)
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
    assert r.status_code == 200, r.text
    (reply,) = r.json()["replies"]
    assert reply["meta"]["degraded"] is True
    assert "知识库" in reply["text"]
    assert reply["meta"]["citations"][0]["topic"] == "e_voucher"
    assert hub.get("/readyz").json() == {"knowledge_base": True, "rasa": False, "degraded": True}


def test_resident_message_is_kept_even_when_nothing_can_answer(hub):
    sid, auth = open_session(hub)
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "嗯嗯那个啥呀"}, headers=auth)
    messages = hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]
    assert [m["role"] for m in messages] == ["resident", "bot"]
    assert messages[0]["text"] == "嗯嗯那个啥呀" and messages[0]["status"] == "answered"
    assert messages[1]["meta"]["outcome"] in ("answered", "abstained")


def test_asking_for_a_person_escalates_even_in_degraded_mode(hub):
    sid, auth = open_session(hub)
    reply = hub.post(f"/api/sessions/{sid}/messages", json={"text": "转人工"}, headers=auth).json()["replies"][0]
    assert reply["meta"]["outcome"] == "escalated"
    assert hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["status"] == "escalated"


def test_empty_message_is_a_clear_422(hub):
    sid, auth = open_session(hub)
    for text in ("", "   \n"):
        r = hub.post(f"/api/sessions/{sid}/messages", json={"text": text}, headers=auth)
        assert r.status_code == 422
        assert r.json()["error"] == "invalid_request" and r.json()["message"]


def test_a_100_kb_message_is_refused_with_413(hub):
    sid, auth = open_session(hub)
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "报" * 100_000}, headers=auth)
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large" and "太长" in r.json()["message"]


def test_a_message_over_the_character_limit_is_refused_and_logged(hub, caplog):
    sid, auth = open_session(hub)
    with caplog.at_level("INFO"):
        r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "我" * 1500}, headers=auth)
    assert r.status_code == 413 and r.json()["error"] == "message_too_long"
    assert "rejected a 1500-character message" in caplog.text


def test_invalid_json_is_a_clear_400(hub):
    sid, auth = open_session(hub)
    r = hub.post(
        f"/api/sessions/{sid}/messages",
        content=b'{"text": "\xe4\xbd\xa0',
        headers={**auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_json", "message": "请求不是合法的 JSON。"}


def test_a_second_session_cannot_read_the_first_transcript(hub):
    first, first_auth = open_session(hub)
    _, second_auth = open_session(hub)
    hub.post(f"/api/sessions/{first}/messages", json={"text": "我的电话13812345678"}, headers=first_auth)
    assert hub.get(f"/api/sessions/{first}/messages", headers=second_auth).status_code == 403
    assert hub.post(f"/api/sessions/{first}/messages", json={"text": "hi"}, headers=second_auth).status_code == 403
    assert hub.get(f"/api/sessions/{first}/messages").status_code == 401
    assert hub.get(f"/api/sessions/{first}/messages", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_websocket_delivers_the_turn_and_reports_bad_frames(hub):
    sid, auth = open_session(hub)
    token = auth["Authorization"].split()[1]
    with hub.websocket_connect(f"/api/sessions/{sid}/ws?token={token}") as ws:
        ws.send_text("not json")
        assert ws.receive_json()["error"] == "invalid_json"
        ws.send_text(json.dumps({"text": ""}))
        assert ws.receive_json()["error"] == "empty_message"
        ws.send_text(json.dumps({"text": "异地就医怎么备案"}))
        events = [ws.receive_json() for _ in range(3)]
    assert [e["type"] for e in events] == ["typing", "message", "message"]
    assert events[1]["message"]["role"] == "resident"
    assert events[2]["message"]["meta"]["citations"][0]["topic"] == "cross_region"


def test_websocket_with_a_wrong_token_is_closed(hub):
    sid, _ = open_session(hub)
    from starlette.websockets import WebSocketDisconnect

    try:
        with hub.websocket_connect(f"/api/sessions/{sid}/ws?token=wrong") as ws:
            ws.receive_json()
    except WebSocketDisconnect as exc:
        assert exc.code == 4401
    else:
        raise AssertionError("the socket should have been closed")


def test_a_closed_conversation_refuses_new_messages_with_409_over_http_and_websocket(hub):
    sid, auth = open_session(hub)
    token = auth["Authorization"].split()[1]
    with hub.websocket_connect(f"/api/sessions/{sid}/ws?token={token}") as ws:
        assert hub.post(f"/api/sessions/{sid}/close", headers=auth).status_code == 200
        ws.send_text(json.dumps({"text": "还有一个问题"}))
        refused = ws.receive_json()
        while refused["type"] in ("closed", "survey"):  # what closing published first
            refused = ws.receive_json()
    assert refused["type"] == "error" and refused["error"] == "conversation_closed"
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "还有一个问题"}, headers=auth)
    assert r.status_code == 409 and r.json()["error"] == "conversation_closed" and "重新开始" in r.json()["message"]
    assert hub.post(f"/api/sessions/{sid}/escalate", headers=auth).status_code == 409
    texts = [m["text"] for m in hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]]
    assert "还有一个问题" not in texts


def test_knowledge_base_search_endpoint(hub):
    r = hub.get("/api/kb/search", params={"q": "异地就医怎么备案", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == 3 and body["answer"]["citation"]["topic"] == "cross_region"
    assert hub.get("/api/kb/search", params={"q": ""}).status_code == 422


def test_turn_locks_are_dropped_when_a_conversation_is_idle(hub):
    # one lock per conversation while a turn runs or waits, none kept afterwards
    for _ in range(3):
        sid, auth = open_session(hub)
        assert hub.post(f"/api/sessions/{sid}/messages", json={"text": "异地就医怎么备案"}, headers=auth).status_code == 200
    assert len(hub.app.state.conversations._locks) == 0


def test_keyed_locks_serialise_one_key_and_forget_it_afterwards():
    import asyncio

    from xiaozhi.hub.domain.conversation import KeyedLocks

    async def scenario():
        locks, order = KeyedLocks(), []

        async def turn(key, n):
            async with locks.hold(key):
                order.append((key, n, "in"))
                await asyncio.sleep(0.01)
                order.append((key, n, "out"))

        await asyncio.gather(turn("a", 1), turn("a", 2), turn("b", 1))
        return locks, order

    locks, order = asyncio.run(scenario())
    a = [step for step in order if step[0] == "a"]
    assert a == [("a", 1, "in"), ("a", 1, "out"), ("a", 2, "in"), ("a", 2, "out")]
    assert ("b", 1, "in") in order[:3]  # another key does not wait
    assert len(locks) == 0
