"""Two hub replicas on one PostgreSQL database, as the deployment runs them (deploy/, docs/scaling.md).

A resident's socket and the agent answering them are usually on different replicas: messages,
queue changes and agent presence must reach both. Follow-up calls must be placed once however
many replicas poll for them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
from tests.support import ADMIN_PASSWORD, client_from, make_staff, open_session
from fastapi.testclient import TestClient

from xiaozhi.hub.app import create_app
from xiaozhi.hub.migrations import prepare


@pytest.fixture
def database_backend() -> str:
    return "postgresql"


@pytest.fixture
def replicas(hub_settings, knowledge_base):
    settings = hub_settings.model_copy(update={"desk_callback_when_no_agent_online": True})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as a:
        with TestClient(create_app(settings, knowledge_base=knowledge_base)) as b:
            yield a, b


def receive_until(ws, wanted, limit: int = 20) -> dict:
    for _ in range(limit):
        event = ws.receive_json()
        if wanted(event):
            return event
    raise AssertionError("the expected event never came")


def test_resident_and_agent_on_different_replicas_see_each_other_live(replicas):
    a, b = replicas
    assert a.app.state.conversations.bus.replica != b.app.state.conversations.bus.replica
    agent = make_staff(a, "wang", "agent", display_name="王芳")
    token = agent["Authorization"].split()[1]
    sid, auth = open_session(a)
    resident_token = auth["Authorization"].split()[1]

    with b.websocket_connect(f"/api/agent/ws?token={token}") as desk_ws:  # the agent works on replica B
        assert desk_ws.receive_json()["type"] == "hello"
        assert "wang" in desk_ws.receive_json()["online"]
        # Replica A knows the agent is online on B: the resident is queued, not given a callback ticket.
        for _ in range(50):
            if "wang" in a.app.state.desk.online:
                break
            asyncio.run(asyncio.sleep(0.05))
        queued = a.post(f"/api/sessions/{sid}/escalate", headers=auth, json={})
        assert queued.json()["status"] == "waiting", queued.text
        item_id = queued.json()["queue_id"]
        update = receive_until(desk_ws, lambda e: e["type"] == "queue" and e["items"])
        assert [i["id"] for i in update["items"]] == [item_id], "B's desk saw A's new queue item"

        assert b.post(f"/api/agent/queue/{item_id}/claim", headers=agent).status_code == 200
        with a.websocket_connect(f"/api/sessions/{sid}/ws?token={resident_token}") as resident_ws:
            resident_ws.send_json({"text": "我的报销进度怎么查"})
            event = receive_until(desk_ws, lambda e: e["type"] == "message" and e["message"]["role"] == "resident")
            assert event["conversation_id"] == sid and event["message"]["text"] == "我的报销进度怎么查"
            b.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": "请稍等，我帮您查询。"})
            event = receive_until(resident_ws, lambda e: e["type"] == "message" and e["message"]["role"] == "agent")
            assert event["message"]["text"] == "请稍等，我帮您查询。"
            # A message too big for one NOTIFY reaches the other replica as a reference, read from the database.
            long_text = "您需要准备以下材料：" + "身份证、医保电子凭证、住院发票、费用清单、出院小结。" * 70
            r = b.post(f"/api/agent/queue/{item_id}/messages", headers=agent, json={"text": long_text[:2000]})
            assert r.status_code == 201, r.text
            event = receive_until(resident_ws, lambda e: e["type"] == "message" and e["message"]["role"] == "agent")
            assert event["message"]["text"] == long_text[:2000]

    # The agent left B: A stops counting them once B says so.
    for _ in range(50):
        if "wang" not in a.app.state.desk.online:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert "wang" not in a.app.state.desk.online


def test_wrong_passwords_count_on_every_replica(replicas):
    """Five guesses from one address, spread over two replicas, lock that address on both.

    With the counters in each replica's memory the guesser got five per replica."""
    a, b = replicas
    guesser = [client_from(a, "203.0.113.66"), client_from(b, "203.0.113.66")]

    def login(client, password):
        return client.post("/api/staff/login", json={"username": "admin", "password": password})

    for i in range(5):
        assert login(guesser[i % 2], "x" * 12).status_code == 401
    for client in guesser:
        locked = login(client, ADMIN_PASSWORD)
        assert locked.status_code == 429 and "15分钟" in locked.json()["message"]
    # Only that address: the admin at their desk logs in through either replica.
    assert login(client_from(b, "192.0.2.10"), ADMIN_PASSWORD).status_code == 200
    assert login(client_from(a, "192.0.2.10"), ADMIN_PASSWORD).status_code == 200


def test_replicas_starting_together_on_an_empty_database_all_start_with_one_first_admin(hub_settings, knowledge_base):
    """A deployment's first start: four hubs create the schema and the first admin at the same time.

    Without the start-up lock all but one failed on PostgreSQL's catalog (duplicate pg_type rows)."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from xiaozhi.hub.domain.accounts import AuditEntry, StaffUser

    apps = [create_app(hub_settings, knowledge_base=knowledge_base) for _ in range(4)]

    async def start_and_stop(app):
        async with app.router.lifespan_context(app):
            return app.state.store.engine.url

    async def first_start():
        results = await asyncio.gather(*(start_and_stop(app) for app in apps), return_exceptions=True)
        from xiaozhi.hub.infra.store import Store

        store = Store(hub_settings.effective_database_url)
        try:
            async with store.sessions() as s:
                users = (await s.execute(select(StaffUser.username))).scalars().all()
                created = (await s.execute(
                    select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "user.create")
                )).scalar_one()
        finally:
            await store.close()
        return results, users, created

    with ThreadPoolExecutor(1) as pool:  # a fresh loop: Playwright may own this thread's
        results, users, created = pool.submit(asyncio.run, first_start()).result()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert users == [hub_settings.admin_username] and created == 1


def test_a_due_follow_up_call_is_placed_once_by_two_polling_replicas(fresh_postgres_url):
    from concurrent.futures import ThreadPoolExecutor

    from xiaozhi.hub.infra.store import Store
    from xiaozhi.hub.domain.surveys import LOCAL_TZ, SurveyPolicy, SurveyService

    now = dt.datetime(2026, 3, 3, 10, 0, tzinfo=LOCAL_TZ)  # daytime: calls allowed
    calls: list[int] = []

    async def ring(survey):
        calls.append(survey.id)
        await asyncio.sleep(0.2)
        return 4

    async def scenario():
        stores = [Store(fresh_postgres_url), Store(fresh_postgres_url)]  # one per replica
        try:
            await prepare(stores[0])
            services = [SurveyService(st, SurveyPolicy(delay_s=0), phone_caller=ring, clock=lambda: now) for st in stores]
            conv, _ = await stores[0].create_conversation("phone", "330100", contact="138****5678")
            conv.closed_at = now - dt.timedelta(minutes=5)
            await services[0].schedule(conv, "caller_hung_up")
            # Both replicas read the survey as due before either claims it: one of them gets it.
            seen = [await service.due_ids(now) for service in services]
            assert seen[0] == seen[1] and len(seen[0]) == 1
            claimed = [await service.claim(ids, now) for service, ids in zip(services, seen)]
            assert sorted(len(c) for c in claimed) == [0, 1]
            # And polling as a whole: the call is placed once.
            for c in claimed:
                for survey in c:
                    await services[0]._call(survey)
            counts = await asyncio.gather(*(service.run_due() for service in services))
            # A replica starting up meanwhile does not take a call in progress for a cut-off one.
            survey = await services[1].for_conversation(conv.id)
            return sorted(counts), survey
        finally:
            for st in stores:
                await st.close()

    with ThreadPoolExecutor(1) as pool:  # a fresh loop: Playwright may own this thread's
        counts, survey = pool.submit(asyncio.run, scenario()).result()
    assert counts == [0, 0] and len(calls) == 1
    assert survey.status == "answered" and survey.rating == 4


def test_a_call_in_progress_is_not_taken_for_a_cut_off_one(fresh_postgres_url):
    from concurrent.futures import ThreadPoolExecutor

    from xiaozhi.hub.infra.store import Store
    from xiaozhi.hub.domain.surveys import CALL_STALE_S, LOCAL_TZ, SurveyPolicy, SurveyService

    clock = [dt.datetime(2026, 3, 3, 10, 0, tzinfo=LOCAL_TZ)]
    seen: list[str] = []

    async def scenario():
        store = Store(fresh_postgres_url)
        try:
            await prepare(store)
            other = SurveyService(store, SurveyPolicy(delay_s=0), clock=lambda: clock[0])  # another replica

            async def ring(survey):  # while this call rings, the other replica recovers
                await other.recover()
                seen.append((await other.for_conversation(survey.conversation_id)).status)
                return None  # no key pressed

            service = SurveyService(store, SurveyPolicy(delay_s=0), phone_caller=ring, clock=lambda: clock[0])
            conv, _ = await store.create_conversation("phone", "330100")
            conv.closed_at = clock[0]
            await service.schedule(conv, "caller_hung_up")
            assert await service.run_due() == 1
            # A call left "calling" by a crashed replica is retried once it is stale.
            from sqlalchemy import update

            from xiaozhi.hub.domain.surveys import Survey

            async with store.sessions() as s, s.begin():
                await s.execute(update(Survey).values(status="calling", due_at=clock[0]))
            await other.recover()
            fresh = (await other.for_conversation(conv.id)).status
            clock[0] += dt.timedelta(seconds=CALL_STALE_S + 1)
            await other.recover()
            stale = (await other.for_conversation(conv.id)).status
            return fresh, stale
        finally:
            await store.close()

    with ThreadPoolExecutor(1) as pool:
        fresh, stale = pool.submit(asyncio.run, scenario()).result()
    assert seen == ["calling"], "another replica's recovery took a live call for a cut-off one"
    assert (fresh, stale) == ("calling", "pending")


def test_an_agent_on_another_replica_joins_and_ends_the_residents_video(hub_settings, knowledge_base, tmp_path):
    """The resident's peer lives on replica A; the agent's requests reach B and are forwarded to A."""
    import httpx
    from tests.support.browser import serve
    from tests.support import free_port
    from tests.support.video_clients import an_offer

    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    apps = [
        create_app(hub_settings.model_copy(update={"replica_url": url, "var_dir": tmp_path / name}),
                   knowledge_base=knowledge_base)
        for url, name in zip(urls, "ab")
    ]
    with serve(apps[0], ports[0]), serve(apps[1], ports[1]), \
            httpx.Client(base_url=urls[0], timeout=60) as a, httpx.Client(base_url=urls[1], timeout=60) as b:
        created = a.post("/api/video/sessions", json={}).json()
        sid, resident = created["session_id"], {"Authorization": f"Bearer {created['token']}"}
        r = a.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"}, headers=resident)
        assert r.status_code == 200, r.text
        # no media connects here (a video item is queued when it does): the resident asks for a person
        assert a.post(f"/api/sessions/{sid}/escalate", headers=resident).status_code == 200
        agent = make_staff(a, "zhao", "agent", display_name="赵敏")
        (item,) = [i for i in b.get("/api/agent/queue", headers=agent).json()["items"] if i["conversation_id"] == sid]
        assert b.post(f"/api/agent/queue/{item['id']}/claim", headers=agent).status_code == 200

        r = b.post(f"/api/video/sessions/{sid}/agent/offer", json={"sdp": an_offer("agent"), "type": "offer"},
                   headers=agent)
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "video" and "m=video" in r.json()["sdp"]
        held_a, held_b = apps[0].state.video.get(sid), getattr(apps[1].state, "video", None)
        assert held_a is not None and held_a.describe()["agent"] == "zhao", "the agent's peer was made on A"
        assert held_b is None or held_b.get(sid) is None
        info = b.get(f"/api/video/sessions/{sid}", headers=agent).json()  # state as the owner knows it
        assert info["session"]["agent"] == "zhao" and [m for m in info["messages"] if m["role"] == "system"]

        # An agent who logs out on B (B's socket notices) leaves the call held on A.
        apps[1].state.conversations.bus.publish("video", {"drop_agent": sid, "agent": "zhao"})
        for _ in range(100):
            if apps[0].state.video.get(sid).agent is None:
                break
            time.sleep(0.05)
        assert apps[0].state.video.get(sid).agent is None
        r = b.post(f"/api/video/sessions/{sid}/agent/offer", json={"sdp": an_offer("agent"), "type": "offer"},
                   headers=agent)
        assert r.status_code == 200, r.text

        r = b.post(f"/api/video/sessions/{sid}/hangup", headers=agent)
        assert r.status_code == 200 and r.json() == {"closed": True}
        assert apps[0].state.video.get(sid) is None

        # The resident comes back, then their conversation is closed through replica B: A hangs up.
        r = a.post(f"/api/video/sessions/{sid}/resident/offer", json={"sdp": an_offer(), "type": "offer"}, headers=resident)
        assert r.status_code == 200, r.text
        assert b.post(f"/api/sessions/{sid}/close", headers=resident).status_code == 200
        for _ in range(100):
            if apps[0].state.video.get(sid) is None:
                break
            time.sleep(0.05)
        assert apps[0].state.video.get(sid) is None, "A kept the video of a conversation closed on B"
