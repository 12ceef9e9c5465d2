"""The hub's own chat page (/) in headless Chromium: a question typed before the page has its
conversation, or while the hub cannot be reached, is kept and sent, never dropped."""

from __future__ import annotations

import json
import re

import httpx
from playwright.sync_api import expect

from tests.support.browser import refuse_first_posts

TIMEOUT_MS = 30_000


def test_a_question_sent_while_the_page_connects_is_kept_and_answered(chromium, live_hub) -> None:
    """The hub refuses the page's first two attempts to open a conversation; the resident has
    already pressed 发送. The question stays in the box, the resident is told, and it is sent once."""
    url, _ = live_hub
    context = chromium.new_context(locale="zh-CN")
    page = context.new_page()
    refused = refuse_first_posts(page, re.compile(r".*/api/sessions$"), 2)
    page.goto(f"{url}/")
    page.fill("#text", "医保电子凭证怎么激活")
    page.click("#form button[type=submit]")
    expect(page.locator("#text")).to_have_value("医保电子凭证怎么激活", timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("连上后会自动发送您的问题", timeout=TIMEOUT_MS)
    resident = page.locator("#log li.resident", has_text="医保电子凭证怎么激活")
    expect(resident).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator("#log li.bot")).to_have_count(2, timeout=TIMEOUT_MS)  # greeting + answer
    assert len(refused) == 2
    expect(page.locator("#text")).to_have_value("")
    context.close()


def test_a_question_the_hub_did_not_take_goes_back_into_the_box(chromium, live_hub) -> None:
    """No WebSocket (a proxy drops them) and the one HTTP send fails: the question is put back in
    the box with a plain message, and sending it again gets the answer."""
    url, _ = live_hub
    context = chromium.new_context(locale="zh-CN")
    page = context.new_page()
    page.add_init_script("window.WebSocket = function () { throw new Error('blocked by proxy'); };")
    refuse_first_posts(page, re.compile(r".*/api/sessions/[^/]+/messages$"), 1)
    page.goto(f"{url}/")
    expect(page.locator("#log li.bot")).to_have_count(1, timeout=TIMEOUT_MS)  # the greeting
    page.fill("#text", "异地就医怎么备案")
    page.click("#form button[type=submit]")
    expect(page.locator("#status")).to_have_text("网络连接中断。您的问题还在输入框里，请稍后再点“发送”。", timeout=TIMEOUT_MS)
    expect(page.locator("#text")).to_have_value("异地就医怎么备案")
    page.click("#form button[type=submit]")
    expect(page.locator("#log li.bot")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(page.locator("#log li.resident", has_text="异地就医怎么备案")).to_have_count(1)
    assert page.locator("#log li.bot").last.locator(".cite").count() >= 1
    context.close()


def stored_session(page) -> dict:
    """The conversation the page keeps in localStorage (id and token)."""
    return json.loads(page.evaluate("localStorage.getItem('xiaozhi.session')"))


def open_chat(chromium, url: str):
    """The chat page opened and greeted; returns (context, page, its conversation)."""
    context = chromium.new_context(locale="zh-CN")
    page = context.new_page()
    page.goto(f"{url}/")
    expect(page.locator("#log li.bot")).to_have_count(1, timeout=TIMEOUT_MS)  # the greeting
    return context, page, stored_session(page)


def as_resident(url: str, session: dict, action: str) -> None:
    """What another tab of the resident's (the widget's buttons) does to the same conversation."""
    r = httpx.post(f"{url}/api/sessions/{session['session_id']}/{action}",
                   headers={"Authorization": f"Bearer {session['token']}"}, json={}, timeout=30)
    assert r.status_code == 200, r.text


def test_while_queued_for_a_person_the_status_line_keeps_saying_so(chromium, live_hub) -> None:
    """The conversation is queued for an agent (here through the escalate API, as the widget's
    button does); the bot still answers questions meanwhile, and its answer must not blank the
    line that tells the resident they are waiting for a person."""
    url, _ = live_hub
    context, page, session = open_chat(chromium, url)
    as_resident(url, session, "escalate")
    expect(page.locator("#status")).to_have_text("已为您排队转接人工客服。", timeout=TIMEOUT_MS)
    page.fill("#text", "医保电子凭证怎么激活")
    page.click("#form button[type=submit]")
    expect(page.locator("#log li.bot")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_have_text("已为您排队转接人工客服。")
    context.close()


def test_a_question_after_the_conversation_was_closed_goes_to_a_new_one(chromium, live_hub) -> None:
    """The conversation is closed (an agent ended it, or the resident elsewhere) while the page is open.
    The next question is not refused and lost: the page starts a new conversation and asks it there."""
    url, _ = live_hub
    context, page, first = open_chat(chromium, url)
    as_resident(url, first, "close")
    expect(page.locator("#status")).to_contain_text("本次对话已结束", timeout=TIMEOUT_MS)
    page.fill("#text", "异地就医怎么备案")
    page.click("#form button[type=submit]")
    expect(page.locator("#log li.resident", has_text="异地就医怎么备案")).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator("#log li.bot").last.locator(".cite").first).to_be_visible(timeout=TIMEOUT_MS)
    second = stored_session(page)
    assert second["session_id"] != first["session_id"]
    expect(page.locator("#text")).to_have_value("")
    context.close()
