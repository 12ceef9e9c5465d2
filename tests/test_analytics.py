"""精准分析: dashboard figures against a seeded dataset, access control, masked CSV export, /metrics."""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import pytest
from conftest import make_staff, open_session

from xiaozhi.hub import analytics
from xiaozhi.hub.store import Escalation, Message
from xiaozhi.hub.surveys import LOCAL_TZ, Survey


def local(d, h, mi=0) -> dt.datetime:
    return dt.datetime(2026, 3, d, h, mi, tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)


def cite(topic: str) -> list[dict]:
    return [
        {
            "id": "x",
            "topic": topic,
            "title": "t",
            "source": {"title": "s", "url": "https://example.gov.cn"},
            "region": "杭州市",
            "effective_date": "2024-01-01",
        }
    ]


async def seed(store) -> dict:
    """Five conversations, four inside 2026-03-02..03 (Asia/Shanghai)."""
    ids = {}

    async def conv(key, channel, region, created, *, contact="", status="open", closed=None):
        c, _ = await store.create_conversation(channel, region, contact=contact)
        await store.update_conversation(c.id, created_at=created, status=status, closed_at=closed)
        ids[key] = c.id
        return c.id

    async def turn(cid, question, when, **meta):
        q = await store.add_message(cid, "resident", question)
        (r,) = await store.add_messages(cid, [("bot", "回复", meta)], reply_to=q.id, answered=q.id)
        async with store.sessions() as s, s.begin():
            for mid in (q.id, r.id):
                (await s.get(Message, mid)).created_at = when

    # A: web, Hangzhou, answered, rated 5
    a = await conv("A", "web", "330100", local(2, 9, 15), status="closed", closed=local(2, 9, 20))
    await turn(
        a,
        "医保电子凭证怎么激活",
        local(2, 9, 16),
        outcome="answered",
        intent="ask_e_voucher",
        confidence=0.93,
        citations=cite("医保电子凭证"),
    )
    # B: web, Hangzhou, abstained then clarifying, escalated, waited 120 s, handled 300 s, rated 3
    b = await conv("B", "web", "330100", local(2, 9, 40), status="closed", closed=local(2, 9, 50))
    await turn(b, "门诊慢特病怎么报销啊？", local(2, 9, 41), outcome="abstained", intent="nlu_fallback", confidence=0.2)
    await turn(
        b,
        "我身份证号是110101199003074514，能查吗",
        local(2, 9, 42),
        outcome="clarifying",
        intent="nlu_fallback",
        confidence=0.4,
    )
    # C: phone, Ningbo, low confidence answer, escalated, hung up before an agent took it (abandoned)
    c = await conv(
        "C", "phone", "330200", local(2, 14, 5), contact="13812345678", status="closed", closed=local(2, 14, 9)
    )
    await turn(
        c,
        "门诊慢特病 怎么报销",
        local(2, 14, 6),
        outcome="answered",
        intent="ask_reimbursement",
        confidence=0.3,
        citations=cite("报销"),
    )
    # D: web, opened at night, nothing asked
    await conv("D", "web", "330100", local(3, 20, 0))
    # E: outside the range
    e = await conv("E", "web", "330100", local(5, 10, 0))
    await turn(e, "医保电子凭证怎么激活", local(5, 10, 1), outcome="answered", intent="ask_e_voucher", confidence=0.9)

    async with store.sessions() as s, s.begin():
        s.add(
            Escalation(
                conversation_id=b,
                channel="web",
                reason="requested",
                status="closed",
                created_at=local(2, 9, 43),
                claimed_at=local(2, 9, 45),
                closed_at=local(2, 9, 50),
            )
        )
        s.add(
            Escalation(
                conversation_id=c,
                channel="phone",
                reason="repeated_failure",
                status="closed",
                created_at=local(2, 14, 7),
                closed_at=local(2, 14, 9),
            )
        )
        s.add(Survey(conversation_id=a, channel="web", status="answered", rating=5, answered_via="chat"))
        s.add(Survey(conversation_id=b, channel="web", status="answered", rating=3, answered_via="chat"))
        s.add(Survey(conversation_id=c, channel="phone", status="failed", attempts=3))
    return ids


@pytest.fixture
def seeded(hub):
    ids = hub.portal.call(seed, hub.app.state.store)
    return hub, ids


def test_figures_match_the_seeded_dataset(seeded) -> None:
    hub, ids = seeded
    auth = make_staff(hub, "lead", "supervisor")
    r = hub.get("/api/staff/analytics", params={"from": "2026-03-02", "to": "2026-03-03"}, headers=auth)
    assert r.status_code == 200, r.text
    f = r.json()
    t = f["totals"]
    assert t["conversations"] == 4 and t["asked"] == 3 and t["contained"] == 1
    assert t["containment_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert t["escalated"] == 2 and t["escalation_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert t["abandoned"] == 1 and t["abandon_rate"] == 0.25
    assert t["avg_wait_s"] == 120.0 and t["avg_handle_s"] == 300.0
    assert f["by_channel"] == {"web": 3, "phone": 1}
    assert f["by_hour"]["web"][9] == 2 and f["by_hour"]["web"][20] == 1 and f["by_hour"]["phone"][14] == 1
    assert sum(f["by_hour"]["web"]) == 3
    assert f["by_day"] == {"2026-03-02": 3, "2026-03-03": 1}
    assert f["top_intents"][0] == {"intent": "nlu_fallback", "count": 2}
    assert {"topic": "医保电子凭证", "count": 1} in f["top_topics"] and {"topic": "报销", "count": 1} in f["top_topics"]
    assert f["outcomes"] == {"answered": 2, "abstained": 1, "clarifying": 1}
    sat = f["satisfaction"]
    assert sat["average"] == 4.0 and sat["answered"] == 2 and sat["surveys"] == 3
    assert sat["distribution"] == {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}
    regions = {r["region"]: r for r in f["by_region"]}
    assert regions["330100"]["conversations"] == 3 and regions["330100"]["asked"] == 2
    assert regions["330100"]["containment_rate"] == 0.5 and regions["330100"]["satisfaction"] == 4.0
    assert regions["330200"]["escalation_rate"] == 1.0
    assert regions["330100"]["region_name"] == "杭州市"
    gaps = f["knowledge_gaps"]
    assert sum(g["count"] for g in gaps) == 3  # two from B, one low-confidence from C
    assert gaps[0]["count"] >= 2  # the same question asked twice lands in one group
    text = str(gaps)
    assert "110101199003074514" not in text  # personal numbers masked in samples

    # region and channel filters
    only = hub.get(
        "/api/staff/analytics", params={"from": "2026-03-02", "to": "2026-03-03", "region": "330200"}, headers=auth
    ).json()
    assert only["totals"]["conversations"] == 1 and only["by_channel"] == {"phone": 1}
    phone = hub.get(
        "/api/staff/analytics", params={"from": "2026-03-01", "to": "2026-03-31", "channel": "web"}, headers=auth
    ).json()
    assert phone["totals"]["conversations"] == 4  # A, B, D, E


def test_gaps_grouped_by_normalised_text_without_a_knowledge_base() -> None:
    groups = analytics.group_gaps(
        [
            ("门诊慢特病怎么报销啊？", "abstained"),
            ("门诊慢特病 怎么报销", "low_confidence"),
            ("医保卡丢了", "abstained"),
        ]
    )
    assert groups[0]["count"] == 2 and groups[0]["outcomes"] == {"abstained": 1, "low_confidence": 1}
    assert groups[1]["count"] == 1


def test_access_needs_supervisor_and_bad_dates_are_clear(seeded) -> None:
    hub, _ = seeded
    assert hub.get("/api/staff/analytics").status_code == 401
    agent = make_staff(hub, "agent1", "agent")
    assert hub.get("/api/staff/analytics", headers=agent).status_code == 403
    assert hub.get("/api/staff/analytics/export.csv", headers=agent).status_code == 403
    _, resident = open_session(hub)
    assert hub.get("/api/staff/analytics", headers=resident).status_code == 401
    lead = make_staff(hub, "lead2", "supervisor")
    for params in (
        {"from": "2026-13-01"},
        {"from": "2026-03-05", "to": "2026-03-01"},
        {"from": "2024-01-01", "to": "2026-01-01"},
    ):
        r = hub.get("/api/staff/analytics", params=params, headers=lead)
        assert r.status_code == 422 and r.json()["error"] == "invalid_date_range", r.text
        assert any("\u4e00" <= ch <= "\u9fff" for ch in r.json()["message"])
    assert hub.get("/api/staff/analytics", params={"region": "hz"}, headers=lead).status_code == 422


def test_csv_export_is_masked_and_audited(seeded) -> None:
    hub, ids = seeded
    lead = make_staff(hub, "lead3", "supervisor")
    r = hub.get("/api/staff/analytics/export.csv", params={"from": "2026-03-02", "to": "2026-03-03"}, headers=lead)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    body = r.content.decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 4 and rows[0]["conversation_id"] == ids["A"]
    assert "13812345678" not in body and "110101199003074514" not in body
    phone_row = next(row for row in rows if row["conversation_id"] == ids["C"])
    assert phone_row["contact"].startswith("138") and "****" in phone_row["contact"]
    assert phone_row["escalated"] == "yes" and rows[0]["rating"] == "5"
    audit = hub.get("/api/staff/audit", headers=make_staff(hub, "boss", "admin")).json()
    assert any(e["action"] == "analytics.export" and e["actor"] == "lead3" for e in audit)


def test_prometheus_metrics_count_turns_outcomes_and_queue(hub) -> None:
    sid, auth = open_session(hub)
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "转人工"}, headers=auth)
    text = hub.get("/metrics").text
    assert 'xiaozhi_turns_total{channel="web"} 2.0' in text
    assert 'xiaozhi_bot_outcomes_total{channel="web",outcome="escalated"} 1.0' in text
    assert 'xiaozhi_turn_latency_seconds_count{channel="web"} 2.0' in text
    assert "xiaozhi_escalation_queue_length 1.0" in text
    assert "xiaozhi_active_calls" in text
    hub.post(f"/api/sessions/{sid}/close", headers=auth)
    text = hub.get("/metrics").text
    assert 'xiaozhi_conversations_closed_total{channel="web",reason="resident_ended"} 1.0' in text
    assert 'xiaozhi_surveys_open{status="offered"} 1.0' in text


def test_dashboard_page_is_served(hub) -> None:
    r = hub.get("/staff/analytics")
    assert r.status_code == 200 and "精准分析" in r.text


async def seed_many(store, n: int = 240, seed: int = 6) -> None:
    """A plausible fortnight for the screenshot: channels, hours, regions, outcomes, queue, ratings."""
    import random

    rnd = random.Random(seed)
    questions = [
        ("医保电子凭证怎么激活", "answered", "ask_e_voucher", "医保电子凭证"),
        ("异地就医怎么备案", "answered", "ask_cross_region_filing", "异地就医"),
        ("住院报销要什么材料", "answered", "ask_reimbursement", "报销"),
        ("门诊慢特病怎么申请", "answered", "ask_chronic", "门诊慢特病"),
        ("生育津贴什么时候发", "abstained", "nlu_fallback", None),
        ("生育津贴啥时候到账啊", "abstained", "nlu_fallback", None),
        ("惠民保理赔进度怎么查", "clarifying", "nlu_fallback", None),
        ("我身份证110101199003074514的医保卡余额", "clarifying", "ask_balance", None),
        ("长护险怎么申请", "abstained", "nlu_fallback", None),
    ]
    weights = [30, 25, 18, 8, 5, 4, 4, 3, 3]
    hours = [
        h for h in range(24) for _ in range({9: 9, 10: 10, 11: 8, 14: 8, 15: 9, 16: 7, 20: 4}.get(h, 1 if h < 7 else 3))
    ]
    for i in range(n):
        channel = rnd.choices(["web", "phone", "video"], [55, 40, 5])[0]
        region = rnd.choices(["330100", "330200", "330300", ""], [60, 20, 12, 8])[0]
        day = rnd.randint(2, 15)
        created = local(day, rnd.choice(hours), rnd.randint(0, 59))
        c, _ = await store.create_conversation(channel, region, contact="13900001111" if channel == "phone" else "")
        q, outcome, intent, topic = rnd.choices(questions, weights)[0]
        msg = await store.add_message(c.id, "resident", q)
        conf = rnd.uniform(0.7, 0.98) if outcome == "answered" else rnd.uniform(0.1, 0.45)
        await store.add_messages(
            c.id,
            [
                (
                    "bot",
                    "回复",
                    {
                        "outcome": outcome,
                        "intent": intent,
                        "confidence": conf,
                        "citations": cite(topic) if topic else [],
                    },
                )
            ],
            reply_to=msg.id,
            answered=msg.id,
        )
        escalate = outcome != "answered" and rnd.random() < 0.6 or rnd.random() < 0.08
        closed = created + dt.timedelta(minutes=rnd.randint(2, 25))
        async with store.sessions() as s, s.begin():
            from xiaozhi.hub.store import Conversation

            row = await s.get(Conversation, c.id)
            row.created_at, row.status, row.closed_at = created, "closed", closed
            if escalate:
                claimed = None if rnd.random() < 0.15 else created + dt.timedelta(seconds=rnd.randint(15, 240))
                s.add(
                    Escalation(
                        conversation_id=c.id,
                        channel=channel,
                        reason="requested",
                        status="closed",
                        created_at=created + dt.timedelta(seconds=5),
                        claimed_at=claimed,
                        closed_at=closed if claimed else None,
                        disposition="resolved" if claimed else "abandoned",
                    )
                )
            if rnd.random() < 0.7:
                answered = rnd.random() < 0.6
                s.add(
                    Survey(
                        conversation_id=c.id,
                        channel=channel,
                        status="answered" if answered else "expired",
                        rating=rnd.choices([5, 4, 3, 2, 1], [45, 30, 12, 8, 5])[0] if answered else None,
                    )
                )


def test_dashboard_in_the_browser_matches_the_api_and_exports(chromium, live_hub) -> None:
    import asyncio

    from browser import SCREENSHOT_DIR

    from xiaozhi.hub.store import Store

    url, app = live_hub

    async def fill():
        store = Store(app.state.settings.effective_database_url)  # the live hub's loop is another thread
        try:
            await seed(store)
            await seed_many(store)
        finally:
            await store.close()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        pool.submit(asyncio.run, fill()).result()
    import httpx

    admin = httpx.post(f"{url}/api/staff/login", json={"username": "admin", "password": "test-admin-password"}).json()
    auth = {"Authorization": f"Bearer {admin['token']}"}
    r = httpx.post(
        f"{url}/api/staff/users",
        headers=auth,
        json={"username": "lead", "password": "lead-password-123", "role": "supervisor", "display_name": "值班主任"},
    )
    assert r.status_code == 201, r.text
    figures = httpx.get(
        f"{url}/api/staff/analytics", params={"from": "2026-03-02", "to": "2026-03-15"}, headers=auth, timeout=60
    ).json()

    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, locale="zh-CN", accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/staff/analytics?from=2026-03-02&to=2026-03-15")
    page.get_by_label("用户名").fill("lead")
    page.get_by_label("密码").fill("lead-password-123")
    page.get_by_role("button", name="登录").click()
    page.locator("#status", has_text="已更新").wait_for(timeout=60000)
    kpis = dict(zip(page.locator(".kpi .l").all_inner_texts(), page.locator(".kpi .v").all_inner_texts()))
    t = figures["totals"]
    assert kpis["会话量"] == str(t["conversations"]) and t["conversations"] == 245
    assert kpis["自助解决率"] == f"{t['containment_rate'] * 100:.1f}%"
    assert kpis["转人工率"] == f"{t['escalation_rate'] * 100:.1f}%"
    assert kpis["满意度"] == f"{figures['satisfaction']['average']:.2f} / 5"
    assert page.locator("#hours svg rect").count() >= 24
    gap_rows = page.locator("#gaps tbody tr")
    assert gap_rows.count() == len(figures["knowledge_gaps"]) and gap_rows.count() >= 2
    assert "110101199003074514" not in page.content()
    assert page.locator("#regions tbody tr").count() == len(figures["by_region"])
    page.screenshot(path=str(SCREENSHOT_DIR / "analytics-dashboard.png"), full_page=True)
    with page.expect_download() as download:
        page.get_by_role("button", name="导出CSV（已脱敏）").click()
    body = Path(download.value.path()).read_text(encoding="utf-8-sig")
    assert body.count("\n") == 246 and "13900001111" not in body and "139****1111" in body
    # an agent cannot see it
    page.get_by_role("button", name="退出登录").click()
    page.get_by_label("用户名").wait_for()
    assert errors == []
    context.close()
