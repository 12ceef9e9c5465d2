"""精准分析: dashboard figures against a seeded dataset, access control, masked CSV export, /metrics."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from pathlib import Path

import pytest
from tests.support import DATABASES, make_staff, open_session

from xiaozhi.hub.domain import analytics
from xiaozhi.hub.domain.desk import CALLBACK_TEXT
from xiaozhi.hub.domain.surveys import LOCAL_TZ, Survey
from xiaozhi.hub.infra.store import Escalation, Message


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """Every hub and store in this module runs on SQLite and on PostgreSQL (conftest.py)."""
    return request.param


def local(d, h, mi=0) -> dt.datetime:
    return dt.datetime(2026, 3, d, h, mi, tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)


def cite(topic: str) -> list[dict]:
    return [
        {
            "id": f"{topic}-guide",  # an entry per topic, so the answer-quality list has rows
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

    # A: web, Hangzhou, answered from the knowledge base (shaped like a Rasa reply: NLU intent
    # confidence beside the search's kb_confidence), then a greeting with a low NLU score that is
    # no knowledge gap; rated 5
    a = await conv("A", "web", "330100", local(2, 9, 15), status="closed", closed=local(2, 9, 20))
    await turn(
        a,
        "医保电子凭证怎么激活",
        local(2, 9, 16),
        **rasa_reply("answered", "ask_e_voucher", 0.93, kb=0.82, citations=cite("e_voucher")),
    )
    await turn(a, "好的谢谢", local(2, 9, 17), **rasa_reply("answered", "thanks", 0.35))
    # B: web, Hangzhou, abstained then clarifying, escalated, waited 120 s, handled 300 s, rated 3
    b = await conv("B", "web", "330100", local(2, 9, 40), status="closed", closed=local(2, 9, 50))
    await turn(b, "门诊慢特病怎么报销啊？", local(2, 9, 41), **rasa_reply("abstained", "nlu_fallback", 0.2, kb=0.03))
    await turn(
        b,
        "我身份证号是110101199003074514，能查吗",
        local(2, 9, 42),
        **rasa_reply("clarifying", "nlu_fallback", 0.4, kb=0.3),
    )
    # C: phone (dialled entry point looks like a formula), Ningbo, a low-confidence answer from the
    # hub's degraded mode (Rasa down: no intent, confidence None, kb_confidence 0.3), escalated,
    # hung up 180 s into the queue before an agent took it (abandoned)
    c = await conv(
        "C", "phone", "330200", local(2, 14, 5), contact="13812345678", status="closed", closed=local(2, 14, 9)
    )
    await store.update_conversation(c, entry_point='=HYPERLINK("http://evil.example")')
    await turn(
        c,
        "门诊慢特病 怎么报销",
        local(2, 14, 6),
        **degraded_reply(0.3, citations=cite("reimbursement")),
    )
    # D: web, opened at night, 转人工 pressed out of hours: a callback ticket (the desk's notice),
    # called back the next morning; nothing asked
    d = await conv("D", "web", "330100", local(3, 20, 0))
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
                created_at=local(2, 14, 6),
                closed_at=local(2, 14, 9),
                disposition="abandoned",
            )
        )
        callback = Escalation(
            conversation_id=d,
            channel="web",
            reason="requested",
            status="closed",
            created_at=local(3, 20, 1),
            claimed_at=local(4, 9, 0),
            closed_at=local(4, 9, 5),
            disposition="resolved",
        )
        s.add(callback)
        await s.flush()
        callback_id = callback.id
        s.add(Survey(conversation_id=a, channel="web", status="answered", rating=5, answered_via="chat"))
        s.add(Survey(conversation_id=b, channel="web", status="answered", rating=3, answered_via="chat"))
        s.add(Survey(conversation_id=c, channel="phone", status="failed", attempts=3))
    await store.add_message(
        d, "system", CALLBACK_TEXT.format(hours="工作日 9:00-17:00", how="给您回电"), meta={"queue_id": callback_id}
    )
    return ids


def rasa_reply(outcome: str, intent: str, nlu: float, *, kb: float | None = None, citations=()) -> dict:
    """Bot message meta as the hub stores a Rasa reply (BotReply.meta(): rasa_client.py)."""
    meta = {
        "spoken": "回复",
        "outcome": outcome,
        "intent": intent,
        "confidence": nlu,  # the NLU intent score
        "citations": list(citations),
        "steps": [],
        "buttons": [],
    }
    if kb is not None:
        meta["search"] = {"confidence": kb, "abstain": outcome != "answered", "candidates": []}
        if outcome == "answered":
            meta["kb_confidence"] = kb
    return meta


def degraded_reply(kb: float, *, citations=()) -> dict:
    """Meta of the hub's own answer from the knowledge base while Rasa is down (conversation.py)."""
    return {
        "spoken": "回复",
        "outcome": "answered",
        "intent": None,
        "confidence": None,
        "citations": list(citations),
        "steps": [],
        "buttons": [],
        "kb_confidence": kb,
        "degraded": True,
    }


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
    assert t["escalated"] == 3 and t["escalation_rate"] == pytest.approx(2 / 3, abs=1e-4)  # D asked nothing
    assert t["abandoned"] == 1 and t["abandon_rate"] == 0.25
    # live queue: B waited 120 s for an agent, C gave up after 180 s; D's overnight callback is apart
    assert t["avg_wait_s"] == 150.0 and t["avg_handle_s"] == 300.0
    assert f["queue"] == {"answered": 1, "abandoned": 1, "avg_wait_answered_s": 120.0, "avg_wait_abandoned_s": 180.0}
    assert f["callbacks"] == {"count": 1, "called_back": 1, "avg_callback_s": 12 * 3600 + 59 * 60.0}
    assert f["by_channel"] == {"web": 3, "phone": 1}
    assert f["by_hour"]["web"][9] == 2 and f["by_hour"]["web"][20] == 1 and f["by_hour"]["phone"][14] == 1
    assert sum(f["by_hour"]["web"]) == 3
    assert f["by_day"] == {"2026-03-02": 3, "2026-03-03": 1}
    assert f["top_intents"][0] == {"intent": "nlu_fallback", "label": "未能识别", "count": 2}
    assert {"intent": "ask_e_voucher", "label": "医保电子凭证激活", "count": 1} in f["top_intents"]
    # the knowledge base's topic codes, shown with their Chinese labels
    assert {"topic": "e_voucher", "label": "医保电子凭证", "count": 1} in f["top_topics"]
    assert {"topic": "reimbursement", "label": "医疗费用报销", "count": 1} in f["top_topics"]
    assert f["outcomes"] == {"answered": 3, "abstained": 1, "clarifying": 1}
    sat = f["satisfaction"]
    assert sat["average"] == 4.0 and sat["answered"] == 2 and sat["surveys"] == 3
    assert sat["distribution"] == {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}
    regions = {r["region"]: r for r in f["by_region"]}
    assert regions["330100"]["conversations"] == 3 and regions["330100"]["asked"] == 2
    assert regions["330100"]["containment_rate"] == 0.5 and regions["330100"]["satisfaction"] == 4.0
    assert regions["330200"]["escalation_rate"] == 1.0
    assert regions["330100"]["region_name"] == "杭州市"
    assert regions["330200"]["region_name"] == "宁波市"  # no knowledge-base entry: named all the same
    gaps = f["knowledge_gaps"]
    # two from B, one from C's degraded answer with kb_confidence 0.3; A's answer (kb 0.82, NLU 0.93)
    # and its greeting (NLU 0.35, not from a search) are no gaps
    assert sum(g["count"] for g in gaps) == 3
    assert sum(g["outcomes"].get("low_confidence", 0) for g in gaps) == 1
    low = [g for g in gaps if g["outcomes"].get("low_confidence")]
    assert "门诊慢特病 怎么报销" in low[0]["samples"] and "好的谢谢" not in str(gaps)
    assert gaps[0]["count"] >= 2  # the same question asked twice lands in one group
    text = str(gaps)
    assert "110101199003074514" not in text  # personal numbers masked in samples

    # region and channel filters
    only = hub.get(
        "/api/staff/analytics", params={"from": "2026-03-02", "to": "2026-03-03", "region": "330200"}, headers=auth
    ).json()
    assert only["totals"]["conversations"] == 1 and only["by_channel"] == {"phone": 1}
    # the region filter offers the regions that exist, by name, with the code as value
    offered = {r["code"]: r["name"] for r in hub.get("/api/staff/analytics/regions", headers=auth).json()["regions"]}
    assert offered["330100"] == "杭州市" and offered["330200"] == "宁波市"
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


def test_every_intent_and_topic_has_a_chinese_label() -> None:
    import yaml

    from knowledge_base.schema import TOPIC_LABELS, TOPICS

    domain = yaml.safe_load((Path(__file__).parent.parent.parent / "bot" / "domain.yml").read_text(encoding="utf-8"))
    labels = analytics.intent_labels()
    assert set(domain["intents"]) | {"nlu_fallback"} <= set(labels), set(domain["intents"]) - set(labels)
    assert all(re.search(r"[\u4e00-\u9fff]", v) for v in labels.values())
    assert set(TOPIC_LABELS) == set(TOPICS)
    assert analytics.intent_label("some_new_intent") == "some_new_intent"  # unknown: the code


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
    # every text cell is guarded against spreadsheet formulas, not only the question
    assert phone_row["entry_point"] == '\'=HYPERLINK("http://evil.example")'
    assert analytics._csv_safe("+8657112393") == "'+8657112393" and analytics._csv_safe("杭州") == "杭州"
    audit = hub.get("/api/staff/audit", headers=make_staff(hub, "boss", "admin")).json()
    assert any(e["action"] == "analytics.export" and e["actor"] == "lead3" for e in audit)


def test_metrics_need_the_bearer_token_once_one_is_set(hub_settings, knowledge_base, caplog) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from xiaozhi.hub.app import create_app

    caplog.set_level("INFO")
    settings = hub_settings.model_copy(update={"metrics_token": SecretStr("scrape-me-please")})
    with TestClient(create_app(settings, knowledge_base=knowledge_base)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me-please"}):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "metrics_token_required"
            assert "xiaozhi_turns_total" not in refused.text
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
        assert ok.status_code == 200 and "xiaozhi_turns_total" in ok.text
    assert "/metrics refused" in caplog.text and "scrape-me-please" not in caplog.text


def test_dashboard_page_is_served(hub) -> None:
    r = hub.get("/staff/analytics")
    assert r.status_code == 200 and "精准分析" in r.text


async def seed_many(store, n: int = 240, seed: int = 6) -> None:
    """A plausible fortnight for the screenshot: channels, hours, regions, outcomes, queue, ratings."""
    import random

    rnd = random.Random(seed)
    questions = [
        ("医保电子凭证怎么激活", "answered", "ask_e_voucher", "e_voucher"),
        ("异地就医怎么备案", "answered", "ask_cross_region", "cross_region"),
        ("住院报销要什么材料", "answered", "ask_reimbursement", "reimbursement"),
        ("门诊慢特病怎么申请", "answered", "ask_chronic_disease", "chronic_disease"),
        ("生育津贴什么时候发", "abstained", "nlu_fallback", None),
        ("生育津贴啥时候到账啊", "abstained", "nlu_fallback", None),
        ("惠民保理赔进度怎么查", "clarifying", "nlu_fallback", None),
        ("我身份证110101199003074514的医保卡余额", "clarifying", "ask_personal_account", None),
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
                    rasa_reply(
                        outcome, intent, rnd.uniform(0.5, 0.99), kb=conf, citations=cite(topic) if topic else []
                    ),
                )
            ],
            reply_to=msg.id,
            answered=msg.id,
        )
        escalate = outcome != "answered" and rnd.random() < 0.6 or rnd.random() < 0.08
        closed = created + dt.timedelta(minutes=rnd.randint(2, 25))
        async with store.sessions() as s, s.begin():
            from xiaozhi.hub.infra.store import Conversation

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


@pytest.mark.parametrize("database_backend", ["sqlite"])  # the page; the figures on PostgreSQL are tested above
def test_dashboard_in_the_browser_matches_the_api_and_exports(chromium, live_hub) -> None:
    import asyncio

    from tests.support.browser import SCREENSHOT_DIR

    from xiaozhi.hub.infra.store import Store

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

    def secs(x):
        if x is None:
            return "—"
        return f"{round(x)}秒" if x < 60 else f"{x / 60:.1f}分钟" if x < 3600 else f"{x / 3600:.1f}小时"

    assert kpis == {
        "会话量": str(t["conversations"]),
        "自助解决率": f"{t['containment_rate'] * 100:.1f}%",
        "确认解决率": f"{t['confirmed_rate'] * 100:.1f}%",
        "未解决率": f"{t['unresolved_rate'] * 100:.1f}%",
        "重复来访率": "—",  # the seeded conversations carry no caller hash or visitor id
        "转人工率": f"{t['escalation_rate'] * 100:.1f}%",
        "放弃会话": f"{t['abandoned']}（{t['abandon_rate'] * 100:.1f}%）",
        "满意度": f"{figures['satisfaction']['average']:.2f} / 5",
        "平均等待": secs(t["avg_wait_s"]),
        "平均处理": secs(t["avg_handle_s"]),
        "非工作时间回访": str(figures["callbacks"]["count"]),
    }
    assert page.locator(".kpi .s").inner_text() == f"平均 {secs(figures['callbacks']['avg_callback_s'])} 后回电"
    assert t["conversations"] == 245 and t["avg_wait_s"] is not None
    # issue 21: the headline counts only conversations that got an answer; each figure says what it is
    r = figures["resolution"]
    assert t["containment_rate"] == round((r["confirmed"] + r["answered"]) / r["closed"], 4)
    assert r["unresolved"] > 0 and t["containment_rate"] < 1 - t["escalation_rate"]  # the old figure was higher
    tile = page.locator(".kpi", has=page.locator(".l", has_text="自助解决率")).locator(".d").inner_text()
    assert tile in figures["definitions"]["containment_rate"] and "确认解决" in tile
    assert page.locator(".kpi .d").count() == len(kpis)
    assert page.locator("#definitions dt").count() == len(figures["definitions"])
    assert page.locator("#resolution-channels tbody tr").count() == len(r["by_channel"])
    assert "电话" in page.locator("#resolution-channels").inner_text()
    assert page.locator("#resolution-topics tbody tr").count() == len(r["by_topic"])
    assert page.locator("#quality tbody tr").count() == len(figures["entry_quality"]) >= 1
    linked = [g for g in figures["knowledge_gaps"] if g["nearest_entry"] in {q["entry"] for q in figures["entry_quality"]}]
    assert page.locator("#gaps a[href^='#entry-']").count() == len(linked)
    assert page.locator("#who").inner_text() == "值班主任（主管）"
    # intents and topics in Chinese, not the dialogue's or the knowledge base's codes
    charts = page.locator("#intents").inner_text() + page.locator("#topics").inner_text()
    assert "医保电子凭证" in charts and "异地就医" in charts and "未能识别" in charts
    assert not re.search(r"[a-z]+_[a-z_]+", charts), charts
    # regions: a select of the regions that exist, named; the table names them too
    options = page.locator("#region option").all_inner_texts()
    assert "杭州市（330100）" in options and "宁波市（330200）" in options and "温州市（330300）" in options
    assert "温州市（330300）" in page.locator("#regions").inner_text()
    assert page.locator("#hours svg rect").count() >= 24
    gap_rows = page.locator("#gaps tbody tr")
    assert gap_rows.count() == len(figures["knowledge_gaps"]) and gap_rows.count() >= 2
    assert "110101199003074514" not in page.content()
    assert page.locator("#regions tbody tr").count() == len(figures["by_region"])
    page.screenshot(path=str(SCREENSHOT_DIR / "analytics-dashboard.png"), full_page=True)
    page.locator("#region").select_option("330200")
    page.get_by_role("button", name="查询").click()
    ningbo = next(r["conversations"] for r in figures["by_region"] if r["region"] == "330200")
    page.locator(".kpi", has=page.locator(".l", has_text="会话量")).locator(".v", has_text=f"{ningbo}").wait_for()
    assert page.locator("#regions tbody tr").count() == 1
    page.locator("#region").select_option("")
    page.get_by_role("button", name="查询").click()
    page.locator("#regions tbody tr").nth(1).wait_for()
    with page.expect_download() as download:
        page.get_by_role("button", name="导出CSV（已脱敏）").click()
    body = Path(download.value.path()).read_text(encoding="utf-8-sig")
    assert body.count("\n") == 246 and "13900001111" not in body and "139****1111" in body
    # an agent cannot see it
    page.get_by_role("button", name="退出登录").click()
    page.get_by_label("用户名").wait_for()
    assert errors == []
    context.close()
