"""JSON logs (XIAOZHI_LOG_FORMAT=json) with request and conversation ids, masked as the text lines are (issue 17).

The hub gives every HTTP request and WebSocket an id (the caller's X-Request-ID when it is a plain
token, else a new one), returns it as a header, passes it on to Rasa, and every log line written
while handling it carries it; the lines of a conversation's turn carry the conversation id too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import pytest
from tests.support import free_port, make_staff, open_session
from tests.support.dialogue import WebhookServer
from tests.support.phone import needs_whisper, phone_hub, placed_call, until_quiet

from xiaozhi.logs import configure_logging

VALID_ID = "11010519491231002X"  # GB 11643's own example
PHONE = "13812345678"
CARD = "6222021234567890128"  # passes the Luhn check


@contextlib.contextmanager
def _captured(fmt: str | None):
    """configure_logging as `xiaozhi hub` calls it, its handler writing into a buffer; restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO", fmt)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def json_log():
    with _captured("json") as buffer:
        yield buffer


@pytest.fixture
def text_log():
    with _captured(None) as buffer:  # the default, as XIAOZHI_LOG_FORMAT unset gives
        yield buffer


def lines(buffer: io.StringIO) -> list[dict]:
    """Every line is one JSON object (a traceback included)."""
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_chat_turn_logs_json_lines_with_its_request_and_conversation_ids(hub, json_log):
    sid, auth = open_session(hub)
    # Nothing listens on Rasa's port: the turn is answered in degraded mode and says so in the log,
    # from the task that runs the turn (the ids follow it there).
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "异地就医怎么备案"},
                 headers={**auth, "X-Request-ID": "web-turn.17_a"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "web-turn.17_a"
    records = lines(json_log)
    turn = [rec for rec in records if rec.get("request_id") == "web-turn.17_a"]
    assert turn, records
    assert any(rec["message"].startswith("Rasa unavailable") for rec in turn), turn
    for rec in turn:
        assert rec["conversation_id"] == sid
        assert {"time", "level", "logger", "message"} <= rec.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", rec["time"])
    # Lines outside any request carry neither id.
    logging.getLogger("xiaozhi.test").info("between requests")
    assert "request_id" not in lines(json_log)[-1] and "conversation_id" not in lines(json_log)[-1]


@pytest.mark.parametrize("given", ["has space", "x" * 65, "ünïcode".encode(), PHONE, "", "a/b"])
def test_an_unusable_request_id_is_replaced_by_a_new_one(hub, given):
    r = hub.get("/healthz", headers={"X-Request-ID": given})
    assert r.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers["x-request-id"]


def test_every_response_has_a_request_id_of_its_own(hub):
    first, second = hub.get("/healthz"), hub.get("/api/staff/me")  # an error answer too (401)
    assert second.status_code == 401
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_the_request_id_goes_on_to_rasa(hub, hub_settings):
    """The dialogue server (a small real HTTP server speaking the hub's webhook protocol, as in
    test_fault_tolerance.py) receives the turn's X-Request-ID, so its side can be matched."""
    server = WebhookServer(int(hub_settings.rasa_url.rsplit(":", 1)[1]))
    server.start()
    try:
        sid, auth = open_session(hub)
        r = hub.post(f"/api/sessions/{sid}/messages", json={"text": "你好"}, headers={**auth, "X-Request-ID": "to-rasa-1"})
        assert r.status_code == 200 and "（对话服务）" in r.json()["replies"][0]["text"]
    finally:
        server.stop()
    assert [h.get("X-Request-ID") for h in server.headers] == ["to-rasa-1"]


def test_json_lines_are_masked_message_extra_fields_and_traceback(json_log):
    log = logging.getLogger("xiaozhi.hub.test")
    log.info("居民说：身份证%s 电话%s 卡号%s", VALID_ID, PHONE, CARD,
             extra={"said": f"我的卡{CARD}", "details": {"phone": PHONE, "ids": [VALID_ID]}})
    try:
        raise ValueError(f"cannot parse 电话{PHONE} 身份证{VALID_ID}")
    except ValueError:
        log.exception("handling %s failed", PHONE)
    text = json_log.getvalue()
    assert PHONE not in text and VALID_ID not in text and CARD not in text, text
    said, failed = lines(json_log)
    assert said["message"] == "居民说：身份证110105********002X 电话138****5678 卡号6222***********0128"
    assert said["said"] == "我的卡6222***********0128"
    assert said["details"] == {"phone": "138****5678", "ids": ["110105********002X"]}
    assert failed["level"] == "ERROR" and failed["message"] == "handling 138****5678 failed"
    assert failed["exception"].startswith("Traceback") and "ValueError: cannot parse 电话138****5678" in failed["exception"]


def test_the_text_format_is_the_default_and_unchanged_outside_requests(text_log):
    from xiaozhi.log_context import conversation_scope, request_id

    log = logging.getLogger("xiaozhi.test")
    log.info("电话%s", PHONE)
    token = request_id.set("r-1")
    try:
        with conversation_scope("c-1"):
            log.warning("in a turn")
    finally:
        request_id.reset(token)
    first, second = text_log.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO xiaozhi\.test: 电话138\*\*\*\*5678", first), first
    assert second.endswith(" WARNING xiaozhi.test [req=r-1 conv=c-1]: in a turn"), second


def test_uvicorn_access_lines_are_json_with_the_request_id(json_log):
    """A real uvicorn server with log_config=None (as `xiaozhi hub` runs it): its access logger goes
    through the same handler, and the access line of a request carries that request's id."""
    import httpx
    from tests.support.browser import serve
    from fastapi import FastAPI

    from xiaozhi.log_context import RequestIdMiddleware

    app = FastAPI()

    @app.get("/api/kb/search")
    async def search(q: str) -> dict:
        logging.getLogger("xiaozhi.test").info("searching")
        return {"q": len(q)}

    app.add_middleware(RequestIdMiddleware)
    with serve(app, free_port(), log_config=None, log_level=None, lifespan="off") as url:
        r = httpx.get(f"{url}/api/kb/search", params={"q": f"电话{PHONE}"}, headers={"X-Request-ID": "access-17"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "access-17"
    records = lines(json_log)
    access = [rec for rec in records if rec["logger"] == "uvicorn.access"]
    assert len(access) == 1 and access[0]["request_id"] == "access-17", records
    assert "GET /api/kb/search?q=" in access[0]["message"] and PHONE not in json_log.getvalue()
    assert any(rec["message"] == "searching" and rec["request_id"] == "access-17" for rec in records)
    assert any(rec["logger"] == "uvicorn.error" for rec in records)  # start-up lines: the same handler


def test_a_chat_websocket_has_an_id_for_its_lifetime_and_names_its_conversation(hub, json_log):
    sid, auth = open_session(hub)
    token = auth["Authorization"].split()[1]
    with hub.websocket_connect(f"/api/sessions/{sid}/ws?token={token}", headers={"X-Request-ID": "ws-17"}) as ws:
        assert (b"x-request-id", b"ws-17") in ws.extra_headers
        ws.send_text("not json")  # answered with an error and logged
        assert ws.receive_json()["type"] == "error"
    refused = [rec for rec in lines(json_log) if "invalid JSON" in rec["message"]]
    assert len(refused) == 1 and refused[0]["request_id"] == "ws-17" and refused[0]["conversation_id"] == sid


def test_a_desk_action_names_the_conversation_it_acts_on(hub, json_log):
    sid, auth = open_session(hub)
    item = hub.post(f"/api/sessions/{sid}/escalate", headers=auth).json()
    agent = make_staff(hub, "agent17", "agent")
    r = hub.post(f"/api/agent/queue/{item['queue_id']}/claim", headers={**agent, "X-Request-ID": "claim-17"})
    assert r.status_code == 200, r.text
    audit = [rec for rec in lines(json_log) if "queue.claim" in rec["message"]]
    assert len(audit) == 1 and audit[0]["request_id"] == "claim-17" and audit[0]["conversation_id"] == sid, audit


@needs_whisper
async def test_a_phone_turn_names_its_conversation(hub_settings, knowledge_base, json_log):
    """A call is no HTTP request: its turns' lines carry the conversation id alone."""
    async with phone_hub(hub_settings, knowledge_base) as app, placed_call(app) as (peer, call, rtp):
        await until_quiet(rtp)
        phone = app.state.phone
        live = next(iter(phone.bot.sessions.values())).call
        conv_id = live.metadata["conversation"].id
        await phone.reply(live, "医保电子凭证怎么激活", source="speech", confidence=0.95)
        peer.in_dialog("BYE", call)
        await peer.expect(200)
    turn = [rec for rec in lines(json_log) if rec["message"].startswith("Rasa unavailable")]
    assert turn and all(rec["conversation_id"] == conv_id and "request_id" not in rec for rec in turn), turn
