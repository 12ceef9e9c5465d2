"""Web chats a resident walked away from are closed (XIAOZHI_IDLE_CLOSE_MIN): survey, analytics, queue."""

from __future__ import annotations

import datetime as dt

import pytest
from tests.support import DATABASES, open_session
from sqlalchemy import update

from xiaozhi.hub.infra.store import Conversation, Message, utcnow


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    return request.param


async def _age(store, conversation_id: str, minutes: float) -> None:
    """Make the conversation and its messages look ``minutes`` old."""
    then = utcnow() - dt.timedelta(minutes=minutes)
    async with store.sessions() as s, s.begin():
        await s.execute(update(Conversation).where(Conversation.id == conversation_id).values(updated_at=then))
        await s.execute(update(Message).where(Message.conversation_id == conversation_id).values(created_at=then))


def test_idle_web_chats_close_once_with_their_survey_and_waiting_ones_get_longer(hub):
    store, conversations = hub.app.state.store, hub.app.state.conversations
    asked, asked_auth = open_session(hub)
    hub.post(f"/api/sessions/{asked}/messages", json={"text": "医保电子凭证怎么激活"}, headers=asked_auth)
    silent, silent_auth = open_session(hub)
    waiting, waiting_auth = open_session(hub)
    assert hub.post(f"/api/sessions/{waiting}/escalate", headers=waiting_auth, json={}).status_code == 200
    recent, recent_auth = open_session(hub)
    hub.post(f"/api/sessions/{recent}/messages", json={"text": "异地就医怎么备案"}, headers=recent_auth)
    for sid in (asked, silent, waiting):
        hub.portal.call(_age, store, sid, 40)
    hub.portal.call(_age, store, recent, 40)
    hub.post(f"/api/sessions/{recent}/messages", json={"text": "还在吗"}, headers=recent_auth)  # written just now

    open_after, waiting_after = dt.timedelta(minutes=30), dt.timedelta(minutes=120)
    assert hub.portal.call(conversations.close_idle, open_after, waiting_after) == 2
    status = {sid: hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["status"]
              for sid, auth in ((asked, asked_auth), (silent, silent_auth), (waiting, waiting_auth), (recent, recent_auth))}
    assert status == {asked: "closed", silent: "closed", waiting: "escalated", recent: "open"}
    survey = hub.get(f"/api/sessions/{asked}/survey", headers=asked_auth)
    assert survey.status_code == 200 and survey.json()["survey"]["status"] == "offered"
    assert hub.portal.call(conversations.close_idle, open_after, waiting_after) == 0, "closed once"

    # Someone waiting for a person is closed after the longer wait; the queue item is then abandoned.
    hub.portal.call(_age, store, waiting, 130)
    assert hub.portal.call(conversations.close_idle, open_after, waiting_after) == 1
    assert hub.get(f"/api/sessions/{waiting}/messages", headers=waiting_auth).json()["status"] == "closed"


def test_two_closes_of_one_conversation_run_the_hooks_once(hub):
    conversations = hub.app.state.conversations
    sid, _ = open_session(hub)
    ran: list[str] = []

    async def hook(conv, reason):
        ran.append(reason)

    conversations.closed_hooks.append(hook)

    async def close_twice():
        # Two replicas (two Conversation objects read before either closed it) close at once.
        first = await conversations.store.get_conversation(sid)
        second = await conversations.store.get_conversation(sid)
        return [await conversations.close(first, "resident_ended"), await conversations.close(second, "idle")]

    assert hub.portal.call(close_twice) == [True, False]
    assert ran == ["resident_ended"]
