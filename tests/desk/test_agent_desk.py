"""The agent desk API: escalation queue, claim/transfer/release/close, bot silence while held, callbacks,
audit, authorisation. Rasa is unreachable in these hubs (degraded mode): answers come from the knowledge base.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from tests.support import DATABASES, make_staff, open_session, staff_login
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from xiaozhi.hub.app import create_app
from xiaozhi.hub.domain.desk import DeskError, ServiceHours
from xiaozhi.hub.migrations import prepare


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """Every hub and store in this module runs on SQLite and on PostgreSQL (conftest.py)."""
    return request.param


def escalate(client, sid: str, auth: dict, **body) -> dict:
    r = client.post(f"/api/sessions/{sid}/escalate", headers=auth, json=body or None)
    assert r.status_code == 200, r.text
    return r.json()


def queue(client, auth: dict, status: str = "open") -> list[dict]:
    r = client.get("/api/agent/queue", headers=auth, params={"status": status})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def say(client, sid: str, auth: dict, text: str) -> dict:
    r = client.post(f"/api/sessions/{sid}/messages", headers=auth, json={"text": text})
    assert r.status_code == 200, r.text
    return r.json()


def transcript(client, sid: str, auth: dict) -> dict:
    r = client.get(f"/api/sessions/{sid}/messages", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def test_queue_survives_a_restart_on_the_same_database(hub_settings, knowledge_base):
    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)) as first:
        sid, auth = open_session(first)
        say(first, sid, auth, "医保电子凭证怎么激活")
        queued = escalate(first, sid, auth)
        assert queued["status"] == "waiting"
    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)) as second:
        agent = make_staff(second, "zhang", "agent", display_name="张敏")
        (item,) = queue(second, agent)
        assert item["id"] == queued["queue_id"] and item["conversation_id"] == sid
        assert item["status"] == "waiting" and item["channel"] == "web" and item["topic"] == "e_voucher"
        assert item["agent"] == "" and item["claimed_at"] is None and item["waiting_s"] >= 0
        claimed = second.post(f"/api/agent/queue/{item['id']}/claim", headers=agent)
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["item"]["status"] == "claimed" and claimed.json()["item"]["agent"] == "zhang"
        assert transcript(second, sid, auth)["status"] == "with_agent"


def test_asking_twice_keeps_the_first_place_in_the_queue(hub):
    sid, auth = open_session(hub)
    first = escalate(hub, sid, auth)
    assert escalate(hub, sid, auth)["queue_id"] == first["queue_id"]
    say(hub, sid, auth, "转人工")  # the bot's escalation (degraded mode) joins the same item
    assert [i["id"] for i in queue(hub, staff_login(hub))] == [first["queue_id"]]
    texts = [m["text"] for m in transcript(hub, sid, auth)["messages"] if m["role"] == "system"]
    assert len(texts) == 1 and "排队" in texts[0]


def test_two_agents_claiming_at_once_only_one_wins(hub):
    a = make_staff(hub, "agent_a", "agent")
    b = make_staff(hub, "agent_b", "agent")
    sid, auth = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    state = hub.app.state

    async def both():
        ua, ub = await state.accounts.get_user("agent_a"), await state.accounts.get_user("agent_b")
        return await asyncio.gather(state.desk.claim(ua, item_id), state.desk.claim(ub, item_id), return_exceptions=True)

    results = hub.portal.call(both)
    errors = [r for r in results if isinstance(r, DeskError)]
    assert len(errors) == 1 and errors[0].status == 409, results
    winner = next(r for r in results if not isinstance(r, Exception))
    # Over HTTP too: whoever comes second is told it is taken.
    for auth_header in (a, b):
        r = hub.post(f"/api/agent/queue/{item_id}/claim", headers=auth_header)
        assert r.status_code == 409 and r.json()["error"] == "already_claimed"
    joined = [m for m in transcript(hub, sid, auth)["messages"] if m["role"] == "system" and "接入" in m["text"]]
    assert len(joined) == 1 and winner.agent in ("agent_a", "agent_b")


def test_bot_is_silent_while_an_agent_holds_the_conversation_and_resumes_after(hub):
    agent = make_staff(hub, "li", "agent", display_name="李华")
    sid, auth = open_session(hub)
    assert say(hub, sid, auth, "医保电子凭证怎么激活")["replies"]
    item_id = escalate(hub, sid, auth)["queue_id"]
    # Waiting in the queue, the bot still answers.
    assert say(hub, sid, auth, "异地就医怎么备案")["replies"]
    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent).status_code == 200

    held = say(hub, sid, auth, "我想问一下我妈妈的报销")
    assert held["replies"] == [] and held["message"]["role"] == "resident"
    r = hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "您好，我来帮您查一下。"})
    assert r.status_code == 201 and r.json()["message"]["role"] == "agent"
    after = transcript(hub, sid, auth)["messages"]
    assert [m["role"] for m in after[-2:]] == ["resident", "agent"]
    assert after[-1]["meta"]["agent_name"] == "李华" and after[-2]["text"] == "我想问一下我妈妈的报销"
    detail = hub.get(f"/api/agent/queue/{item_id}", headers=agent).json()
    assert detail["messages"][-2]["text"] == "我想问一下我妈妈的报销"

    assert hub.post(f"/api/agent/queue/{item_id}/release", headers=agent, json={"note": "下班交接"}).status_code == 200
    assert transcript(hub, sid, auth)["status"] == "escalated"
    assert say(hub, sid, auth, "医保电子凭证怎么激活")["replies"], "the bot answers again after release"
    (item,) = queue(hub, agent)
    assert item["status"] == "waiting" and item["agent"] == ""

    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent).status_code == 200
    assert say(hub, sid, auth, "还在吗")["replies"] == []
    r = hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "resolved", "note": "已说明"})
    assert r.status_code == 200, r.text
    closed = r.json()["item"]
    assert closed["status"] == "closed" and closed["disposition"] == "resolved" and closed["closed_at"]
    assert transcript(hub, sid, auth)["status"] == "open"
    assert say(hub, sid, auth, "医保电子凭证怎么激活")["replies"], "the bot answers again after close"
    assert queue(hub, agent) == []
    assert [i["id"] for i in queue(hub, agent, "closed")] == [item_id]


def test_messages_flow_over_both_websockets(hub):
    agent = make_staff(hub, "wang", "agent", display_name="王芳")
    token = agent["Authorization"].split()[1]
    sid, auth = open_session(hub)
    resident_token = auth["Authorization"].split()[1]
    item_id = escalate(hub, sid, auth)["queue_id"]
    with hub.websocket_connect(f"/api/agent/ws?token={token}") as desk_ws:
        assert desk_ws.receive_json()["type"] == "hello"
        first = desk_ws.receive_json()
        assert first["type"] == "queue" and [i["id"] for i in first["items"]] == [item_id]
        assert "wang" in first["online"]
        assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent).status_code == 200
        for _ in range(10):  # an earlier change (this agent coming online) may still be queued ahead
            update = desk_ws.receive_json()
            if update["type"] == "queue" and update["items"][0]["status"] == "claimed":
                break
        assert update["items"][0]["status"] == "claimed" and update["items"][0]["agent"] == "wang"
        with hub.websocket_connect(f"/api/sessions/{sid}/ws?token={resident_token}") as resident_ws:
            resident_ws.send_json({"text": "我的报销进度怎么查"})
            event = desk_ws.receive_json()
            while not (event["type"] == "message" and event["message"]["role"] == "resident"):
                event = desk_ws.receive_json()
            assert event["conversation_id"] == sid and event["message"]["text"] == "我的报销进度怎么查"
            hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "请稍等，我帮您查询。"})
            event = resident_ws.receive_json()
            while not (event["type"] == "message" and event["message"]["role"] == "agent"):
                assert event.get("message", {}).get("role") != "bot", "the bot must stay silent"
                event = resident_ws.receive_json()
            assert event["message"]["text"] == "请稍等，我帮您查询。"


def test_transfer_to_another_agent_and_back_to_the_queue_with_a_note(hub):
    a = make_staff(hub, "xu", "agent", display_name="徐静")
    b = make_staff(hub, "zhou", "agent", display_name="周强", skills=["cross_region"])
    sid, auth = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=a)
    r = hub.post(f"/api/agent/queue/{item_id}/transfer", headers=a, json={"to_agent": "zhou", "note": "异地问题"})
    assert r.status_code == 200, r.text
    assert r.json()["item"]["agent"] == "zhou" and r.json()["item"]["status"] == "claimed"
    assert transcript(hub, sid, auth)["status"] == "with_agent"
    # The first agent no longer holds it.
    r = hub.post(f"/api/agent/queue/{item_id}/messages", headers=a, json={"text": "还在吗"})
    assert r.status_code == 404
    detail = hub.get(f"/api/agent/queue/{item_id}", headers=b).json()
    assert detail["summary"]["notes"][0]["text"] == "异地问题" and detail["summary"]["notes"][0]["by"] == "xu"
    r = hub.post(
        f"/api/agent/queue/{item_id}/transfer", headers=b, json={"topic": "reimbursement", "note": "需要报销组处理"}
    )
    assert r.status_code == 200, r.text
    item = r.json()["item"]
    assert item["status"] == "waiting" and item["agent"] == "" and item["topic"] == "reimbursement"
    assert transcript(hub, sid, auth)["status"] == "escalated"
    assert queue(hub, b) == [], "a cross-region agent does not see the reimbursement queue"
    assert [i["id"] for i in queue(hub, a)] == [item_id]
    # Bad transfers are refused with a reason.
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=a)
    r = hub.post(f"/api/agent/queue/{item_id}/transfer", headers=a, json={"to_agent": "nobody"})
    assert r.status_code == 404 and r.json()["error"] == "agent_not_found"
    r = hub.post(f"/api/agent/queue/{item_id}/transfer", headers=a, json={})
    assert r.status_code == 422 and "备注" in r.json()["message"]


def test_agent_sees_only_items_for_their_skills(hub):
    cross = make_staff(hub, "cr_agent", "agent", skills=["cross_region"])
    reimb = make_staff(hub, "re_agent", "agent", skills=["reimbursement"])
    general = make_staff(hub, "all_agent", "agent")
    supervisor = make_staff(hub, "boss", "supervisor")
    sid, auth = open_session(hub)
    answer = say(hub, sid, auth, "住院费用报销需要哪些材料")["replies"][0]
    assert answer["meta"]["citations"][0]["topic"] == "reimbursement"
    item_id = escalate(hub, sid, auth)["queue_id"]
    assert queue(hub, cross) == []
    assert hub.get(f"/api/agent/queue/{item_id}", headers=cross).status_code == 404
    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=cross).status_code == 404
    assert [i["topic"] for i in queue(hub, reimb)] == ["reimbursement"]
    assert len(queue(hub, general)) == 1 and len(queue(hub, supervisor)) == 1
    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=reimb).status_code == 200
    # Once held, other agents no longer see it; supervisors still do.
    assert queue(hub, general) == [] and queue(hub, supervisor)[0]["agent"] == "re_agent"


def test_summary_priority_and_sla_warning(hub):
    agent = make_staff(hub, "chen", "agent")
    sid1, auth1 = open_session(hub, region="330100")
    say(hub, sid1, auth1, "医保电子凭证怎么激活")
    say(hub, sid1, auth1, "公积金怎么提取")  # another agency's question, declined: a failed turn
    first = escalate(hub, sid1, auth1)["queue_id"]
    sid2, auth2 = open_session(hub)
    elderly = escalate(hub, sid2, auth2, elderly=True)["queue_id"]
    items = queue(hub, agent)
    assert [i["id"] for i in items] == [elderly, first], "the elderly resident is served first"
    assert items[0]["elderly"] and items[0]["priority"] > items[1]["priority"]
    assert not any(i["sla_warning"] for i in items)
    hub.app.state.desk.sla_warning_s = 0
    assert all(i["sla_warning"] for i in queue(hub, agent))

    detail = hub.get(f"/api/agent/queue/{first}", headers=agent).json()
    summary = detail["summary"]
    assert summary["slots"]["region"] == "330100"
    assert "e_voucher" in [c["topic"] for c in summary["citations"]]
    assert summary["failed_turns"] >= 1 and summary["resident_turns"] == 2
    assert summary["last_question"] == "公积金怎么提取"
    roles = [m["role"] for m in detail["messages"]]
    assert roles.count("resident") == 2 and "bot" in roles
    assert detail["conversation"]["region_code"] == "330100"


def test_out_of_hours_requests_become_callback_tickets(hub_settings, knowledge_base):
    now = dt.datetime.now(ZoneInfo("Asia/Shanghai"))
    hour = (now.hour + 3) % 24  # a half-hour window hours away from now
    settings = hub_settings.model_copy(update={"desk_service_hours": f"{hour:02d}:00-{hour:02d}:30"})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as hub:
        agent = make_staff(hub, "night", "agent")
        sid, auth = open_session(hub)
        queued = escalate(hub, sid, auth)
        assert queued["status"] == "callback"
        notice = [m for m in transcript(hub, sid, auth)["messages"] if m["role"] == "system"]
        assert len(notice) == 1 and "回电" in notice[0]["text"] and f"{hour:02d}:00-{hour:02d}:30" in notice[0]["text"]
        (item,) = queue(hub, agent)
        assert item["status"] == "callback" and not item["sla_warning"]
        assert queue(hub, agent, "callback")[0]["id"] == queued["queue_id"]
        assert hub.get("/api/agent/config", headers=agent).json()["in_service"] is False
        # Next morning an agent works the ticket and closes it.
        assert hub.post(f"/api/agent/queue/{item['id']}/claim", headers=agent).status_code == 200
        r = hub.post(f"/api/agent/queue/{item['id']}/close", headers=agent, json={"disposition": "called_back"})
        assert r.status_code == 200 and r.json()["item"]["disposition"] == "called_back"


def test_no_agent_online_gives_a_callback_when_configured(hub_settings, knowledge_base):
    settings = hub_settings.model_copy(update={"desk_callback_when_no_agent_online": True})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as hub:
        agent = make_staff(hub, "solo", "agent")
        sid, auth = open_session(hub)
        assert escalate(hub, sid, auth)["status"] == "callback"
        token = agent["Authorization"].split()[1]
        with hub.websocket_connect(f"/api/agent/ws?token={token}") as ws:
            ws.receive_json()
            sid2, auth2 = open_session(hub)
            assert escalate(hub, sid2, auth2)["status"] == "waiting"


def test_service_hours():
    hours = ServiceHours.parse("08:30-12:00,13:30-17:30", "12345", "Asia/Shanghai")
    utc = dt.UTC
    monday = dt.datetime(2026, 11, 23, tzinfo=utc)  # a Monday
    assert not hours.open_at(monday.replace(hour=0, minute=29))  # 08:29 in Hangzhou
    assert hours.open_at(monday.replace(hour=0, minute=30))
    assert not hours.open_at(monday.replace(hour=4, minute=30))  # lunch break, 12:30
    assert not hours.open_at(monday.replace(hour=9, minute=30))  # 17:30
    assert not hours.open_at((monday + dt.timedelta(days=5)).replace(hour=2))  # Saturday 10:00
    assert ServiceHours.parse("00:00-24:00", "1234567", "Asia/Shanghai").open_at(monday)
    for bad in ("8-17", "17:30-08:30", "", "25:00-26:00"):
        with pytest.raises(ValueError):
            ServiceHours.parse(bad, "12345", "Asia/Shanghai")


def test_every_agent_action_is_audited(hub):
    agent = make_staff(hub, "audit_me", "agent")
    sid, auth = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    hub.get(f"/api/agent/queue/{item_id}", headers=agent)
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent)
    hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "您好"})
    hub.post(f"/api/agent/queue/{item_id}/release", headers=agent)
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent)
    hub.post(f"/api/agent/queue/{item_id}/transfer", headers=agent, json={"note": "转回队列"})
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent)
    hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "resolved"})
    entries = hub.get("/api/staff/audit", headers=staff_login(hub), params={"actor": "audit_me"}).json()
    actions = [e["action"] for e in reversed(entries) if e["action"].startswith("queue.")]
    assert actions == [
        "queue.view", "queue.claim", "queue.message", "queue.release", "queue.claim", "queue.transfer",
        "queue.claim", "queue.close",
    ]
    assert all(e["target"] == sid for e in entries if e["action"].startswith("queue."))
    assert all("您好" not in str(e["detail"]) for e in entries), "message text stays out of the audit log"


def test_residents_and_logged_out_agents_cannot_reach_the_desk(hub):
    agent = make_staff(hub, "leaver", "agent")
    sid, auth = open_session(hub)
    other_sid, _ = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    # A resident's conversation token opens nothing on the desk, nor another resident's conversation.
    for path in ("/api/agent/queue", f"/api/agent/queue/{item_id}", "/api/agent/canned", "/api/agent/config"):
        assert hub.get(path, headers=auth).status_code == 401, path
        assert hub.get(path).status_code == 401, path
    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=auth).status_code == 401
    assert hub.get(f"/api/sessions/{other_sid}/messages", headers=auth).status_code == 403
    assert hub.post(f"/api/sessions/{other_sid}/escalate", headers=auth).status_code == 403
    resident_token = auth["Authorization"].split()[1]
    with pytest.raises(WebSocketDisconnect) as refused, hub.websocket_connect(f"/api/agent/ws?token={resident_token}") as ws:
        ws.receive_json()
    assert refused.value.code == 4401
    # After logout the agent's token is dead.
    assert hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent).status_code == 200
    assert hub.post("/api/staff/logout", headers=agent).status_code == 204
    r = hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "还能发吗"})
    assert r.status_code == 401
    assert hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "resolved"}).status_code == 401
    assert hub.get("/api/agent/queue", headers=agent).status_code == 401
    assert all(m["role"] != "agent" for m in transcript(hub, sid, auth)["messages"])


def test_bad_requests_get_clear_errors(hub):
    agent = make_staff(hub, "careful", "agent")
    other = make_staff(hub, "other", "agent")
    sid, auth = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    r = hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "先说话"})
    assert r.status_code == 409 and r.json()["message"] == "请先接起这条再操作。"
    hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent)
    r = hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "whatever"})
    assert r.status_code == 422 and r.json()["message"] == "请选择处理结果。"
    r = hub.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "   "})
    assert r.status_code == 422
    assert hub.post(f"/api/agent/queue/{item_id}/release", headers=other).status_code == 404
    assert hub.post("/api/agent/queue/999999/claim", headers=agent).status_code == 404
    assert hub.get("/api/agent/queue", headers=agent, params={"status": "bogus"}).status_code == 422
    r = hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "resolved"})
    assert r.status_code == 200
    r = hub.post(f"/api/agent/queue/{item_id}/close", headers=agent, json={"disposition": "resolved"})
    assert r.status_code in (404, 409)


def test_a_resident_who_leaves_while_waiting_abandons_the_item(hub):
    agent = make_staff(hub, "late", "agent")
    sid, auth = open_session(hub)
    item_id = escalate(hub, sid, auth)["queue_id"]
    state = hub.app.state

    async def hang_up():
        conv = await state.store.get_conversation(sid)
        await state.conversations.close(conv, "hangup")

    hub.portal.call(hang_up)
    assert queue(hub, agent) == []
    (item,) = queue(hub, agent, "closed") or queue(hub, staff_login(hub), "closed")
    assert item["id"] == item_id and item["disposition"] == "abandoned"
    r = hub.post(f"/api/sessions/{sid}/escalate", headers=auth)
    assert r.status_code == 409


def test_canned_responses_and_knowledge_search(hub):
    agent = make_staff(hub, "helper", "agent")
    canned = hub.get("/api/agent/canned", headers=agent).json()["responses"]
    assert len(canned) >= 8 and all(c["text"] and c["title"] for c in canned)
    r = hub.get("/api/agent/kb/search", headers=agent, params={"q": "异地就医怎么备案", "region": "330100"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert results and results[0]["citation"]["topic"] == "cross_region" and results[0]["answer"]
    assert hub.get("/api/agent/kb/search", headers=agent, params={"q": ""}).status_code == 422
    page = hub.get("/agent")
    assert page.status_code == 200 and "坐席工作台" in page.text


def test_an_agent_socket_closes_after_logout(hub, monkeypatch):
    import time

    from xiaozhi.hub.channels import desk as desk_channel

    monkeypatch.setattr(desk_channel, "QUEUE_REFRESH_S", 60.0)  # the periodic re-check cannot be what closes it
    agent = make_staff(hub, "gone", "agent")
    token = agent["Authorization"].split()[1]
    with hub.websocket_connect(f"/api/agent/ws?token={token}") as ws:
        assert ws.receive_json()["type"] == "hello"
        assert ws.receive_json()["type"] == "queue"
        logged_out = time.monotonic()
        assert hub.post("/api/staff/logout", headers=agent).status_code == 204
        # no queue change needed: the logout itself makes the socket re-check its login
        with pytest.raises(WebSocketDisconnect) as closed:
            for _ in range(5):
                event = ws.receive_json()
                assert event["type"] != "queue" or not event["items"], "a logged-out agent must not get the queue"
        assert closed.value.code == 4401
        assert time.monotonic() - logged_out < 30, "closed by the logout, not by the 60 s periodic re-check"


async def test_an_older_database_gains_the_queue_columns(tmp_path):
    import sqlite3

    from xiaozhi.hub.infra.store import Store

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the escalations table as the previous release made it
        db.execute("CREATE TABLE escalations (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id VARCHAR(36), "
                   "channel VARCHAR(16), reason VARCHAR(32), status VARCHAR(16), created_at DATETIME)")
        db.execute("INSERT INTO escalations (conversation_id, channel, reason, status, created_at) "
                   "VALUES ('c-old', 'web', 'requested', 'waiting', '2026-01-05 01:00:00')")
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await prepare(store)
        (old,) = await store.escalations()
        assert (old.priority, old.topic, old.agent, old.claimed_at, old.disposition, old.summary) == (0, "", "", None, "", {})
    finally:
        await store.close()


def test_the_queue_preview_and_stored_summary_mask_personal_numbers(hub):
    """Issue 19: the preview every matching agent sees before anyone takes the item, and escalations.summary,
    carried raw ID, phone and card numbers. The holder still reads them in the transcript."""
    from sqlalchemy import select

    from xiaozhi.hub.infra.store import Escalation

    agent = make_staff(hub, "masker", "agent")
    sid, auth = open_session(hub)
    question = "我身份证11010519491231002X，手机13812345678，卡号6222020200112233446丢了怎么补办医保卡"
    say(hub, sid, auth, question)
    item_id = escalate(hub, sid, auth)["queue_id"]
    (item,) = [i for i in queue(hub, agent) if i["id"] == item_id]
    preview = item["last_question"]
    for raw in ("11010519491231002X", "13812345678", "6222020200112233446"):
        assert raw not in preview, preview
    assert "110105********002X" in preview and "138****5678" in preview and "6222***********3446" in preview
    assert "补办医保卡" in preview

    async def stored_summaries() -> list[dict]:
        async with hub.app.state.store.sessions() as s:
            return [e.summary for e in (await s.execute(select(Escalation))).scalars()]

    stored = hub.portal.call(stored_summaries)
    assert stored and all(raw not in str(summary) for summary in stored
                          for raw in ("13812345678", "11010519491231002X", "6222020200112233446"))
    claimed = hub.post(f"/api/agent/queue/{item_id}/claim", headers=agent).json()
    assert question in [m["text"] for m in claimed["messages"]]  # the transcript is whole for the holder
