"""The agent console in headless Chromium: an agent logs in, a resident escalates from the chat page, the
agent accepts and they exchange messages both ways; the bot stays silent while the agent holds the
conversation. Screenshots of the console go to docs/screenshots/agent-console-*.png (docs/agent-desk.md).
"""

from __future__ import annotations

import re

import httpx
from tests.support.browser import SCREENSHOT_DIR
from tests.support import ADMIN_PASSWORD
from playwright.sync_api import expect

TIMEOUT_MS = 20_000


def _make_agent(url: str, username: str, password: str, display_name: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()["token"]
        r = client.post(
            "/api/staff/users",
            json={"username": username, "password": password, "role": "agent", "display_name": display_name},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text


def test_agent_accepts_a_chat_escalation_and_talks_with_the_resident(chromium, live_hub) -> None:
    url, app = live_hub
    _make_agent(url, "liming", "liming-password-1", "李明")
    app.state.desk.sla_warning_s = 3  # so the screenshot shows the overdue flag without a minute's wait
    with httpx.Client(base_url=url, timeout=30) as client:  # an elderly resident already waiting
        created = client.post("/api/sessions", json={"region": "330100"}).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        sid = created["session_id"]
        client.post(f"/api/sessions/{sid}/messages", json={"text": "异地住院回来怎么报销"}, headers=headers)
        assert client.post(f"/api/sessions/{sid}/escalate", json={"elderly": True}, headers=headers).status_code == 200
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)

    desk_ctx = chromium.new_context(viewport={"width": 1440, "height": 900}, locale="zh-CN")
    resident_ctx = chromium.new_context(viewport={"width": 420, "height": 800}, locale="zh-CN")
    try:
        desk = desk_ctx.new_page()
        desk.set_default_timeout(TIMEOUT_MS)
        desk.goto(f"{url}/agent")
        expect(desk.locator("#login-view")).to_be_visible()
        desk.fill("#username", "liming")
        desk.fill("#password", "wrong-password")
        desk.click("#login-form button[type=submit]")
        expect(desk.locator("#login-error")).to_have_text("用户名或密码不正确。")
        desk.fill("#password", "liming-password-1")
        desk.click("#login-form button[type=submit]")
        expect(desk.locator("#desk-view")).to_be_visible()
        expect(desk.locator("#me")).to_contain_text("李明")
        expect(desk.locator("#queue li")).to_have_count(1)

        # The resident asks the bot something, then asks for a person on the plain chat page.
        resident = resident_ctx.new_page()
        resident.set_default_timeout(TIMEOUT_MS)
        resident.goto(f"{url}/")
        resident.fill("#text", "医保电子凭证怎么激活")
        resident.click("#form button[type=submit]")
        expect(resident.locator("#log li.bot")).to_have_count(2)  # greeting + answer (degraded: from the KB)
        resident.fill("#text", "转人工")
        resident.click("#form button[type=submit]")
        expect(resident.locator("#log li.bot").last).to_contain_text("人工")

        item = desk.locator("#queue li[data-status=waiting]", has_text="医保电子凭证")
        expect(item).to_have_count(1)
        expect(item).to_contain_text("医保电子凭证怎么激活")  # what they asked, not "转人工"
        expect(desk.locator("#queue li").first).to_contain_text("长者")  # elderly first
        expect(desk.locator("#queue li").first.locator(".sla-flag")).to_have_text("超时")
        desk.screenshot(path=str(SCREENSHOT_DIR / "agent-console-queue.png"))

        item.locator("button.claim").click()
        expect(desk.locator("#conv-state")).to_have_text("我正在处理")
        expect(desk.locator("#transcript li.resident")).to_have_count(2)
        expect(desk.locator("#summary")).to_contain_text("引用条目")
        expect(resident.locator("#log li.system").last).to_contain_text("工作人员李明已接入")

        # Agent -> resident, starting from a canned response.
        desk.locator("#canned button", has_text="问候").click()
        expect(desk.locator("#reply")).to_have_value(re.compile(r"^您好，我是医保服务中心的工作人员"))
        desk.click("#send")
        expect(resident.locator("#log li.agent")).to_have_count(1)
        expect(resident.locator("#log li.agent")).to_contain_text("工作人员李明")

        # Resident -> agent; the bot says nothing while the agent holds the conversation.
        bot_replies = resident.locator("#log li.bot").count()
        resident.fill("#text", "我想给我妈妈激活，她不会用智能手机")
        resident.click("#form button[type=submit]")
        expect(desk.locator("#transcript li.resident").last).to_contain_text("她不会用智能手机")
        desk.fill("#reply", "可以在“亲情账户”里帮妈妈添加并激活，我把步骤发给您。")
        desk.keyboard.press("Control+Enter")
        expect(resident.locator("#log li.agent")).to_have_count(2)
        assert resident.locator("#log li.bot").count() == bot_replies, "the bot must stay silent"

        # Knowledge-base search beside the chat.
        desk.fill("#kb-q", "电子凭证 亲情账户")
        desk.click("#kb-form button[type=submit]")
        expect(desk.locator("#kb-results li button").first).to_be_visible()
        desk.screenshot(path=str(SCREENSHOT_DIR / "agent-console-chat.png"))
        resident.screenshot(path=str(SCREENSHOT_DIR / "agent-console-resident-view.png"))

        # Close with a disposition: the resident is told, the bot answers again.
        desk.select_option("#disposition", "resolved")
        desk.click("#close-btn")
        expect(desk.locator("#action-status")).to_contain_text("已解决")
        expect(resident.locator("#log li.system").last).to_contain_text("本次人工服务已结束")
        expect(desk.locator("#queue li")).to_have_count(1)  # only the elderly resident still waits
        resident.fill("#text", "异地就医怎么备案")
        resident.click("#form button[type=submit]")
        expect(resident.locator("#log li.bot")).to_have_count(bot_replies + 1)

        # Logout: the console returns to the login form and the token is dead.
        desk.click("#logout")
        expect(desk.locator("#login-view")).to_be_visible()
        expect(desk.locator("#login-error")).to_have_text("您已退出登录。")
        desk.screenshot(path=str(SCREENSHOT_DIR / "agent-console-login.png"))
    finally:
        desk_ctx.close()
        resident_ctx.close()


def test_after_a_reload_the_agent_reopens_a_held_conversation_by_clicking_it(chromium, live_hub) -> None:
    """Issue 19: a `const open` in renderQueue hid open(id), so clicking a queue item threw and, after a
    reload, an agent could neither reply to, release nor close a conversation they held."""
    url, _app = live_hub
    _make_agent(url, "wangfang", "wangfang-password-1", "王芳")
    with httpx.Client(base_url=url, timeout=30) as client:
        created = client.post("/api/sessions", json={}).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        sid = created["session_id"]
        client.post(f"/api/sessions/{sid}/messages", json={"text": "门诊慢特病怎么申请"}, headers=headers)
        assert client.post(f"/api/sessions/{sid}/escalate", json={}, headers=headers).status_code == 200

    ctx = chromium.new_context(viewport={"width": 1440, "height": 900}, locale="zh-CN")
    errors: list[str] = []
    try:
        desk = ctx.new_page()
        desk.on("pageerror", lambda exc: errors.append(str(exc)))
        desk.set_default_timeout(TIMEOUT_MS)
        desk.goto(f"{url}/agent")
        desk.fill("#username", "wangfang")
        desk.fill("#password", "wangfang-password-1")
        desk.click("#login-form button[type=submit]")
        item = desk.locator("#queue li", has_text="门诊慢特病")
        item.locator("button.claim").click()
        expect(desk.locator("#conv-state")).to_have_text("我正在处理")

        desk.reload()  # the console forgets which conversation was open; the agent still holds it
        expect(desk.locator("#desk-view")).to_be_visible()
        expect(desk.locator("#conv")).to_be_hidden()
        held = desk.locator("#queue li[data-status=claimed]", has_text="门诊慢特病")
        expect(held).to_contain_text("我正在处理")
        held.locator(".q").click()  # the item itself, not a button in it
        expect(desk.locator("#conv")).to_be_visible()
        expect(desk.locator("#conv-state")).to_have_text("我正在处理")
        expect(desk.locator("#transcript li.resident")).to_have_count(1)
        expect(desk.locator("#reply")).to_be_enabled()
        desk.fill("#reply", "您好，门诊慢特病可以在浙里办申请，我把步骤发给您。")
        desk.click("#send")
        expect(desk.locator("#transcript li.agent")).to_have_count(1)
        expect(desk.locator("#release-btn")).to_be_enabled()
        desk.select_option("#disposition", "resolved")
        desk.click("#close-btn")
        expect(desk.locator("#action-status")).to_contain_text("已解决")
        assert errors == [], errors
    finally:
        ctx.close()
