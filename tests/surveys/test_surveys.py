"""智能回访: scheduling policy (delay, quiet hours, retries with backoff, once only) and the chat survey API."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from tests.support import DATABASES, open_session

from xiaozhi.hub.domain.surveys import LOCAL_TZ, SurveyPolicy, SurveyService, parse_quiet_hours
from xiaozhi.hub.infra.store import Store
from xiaozhi.hub.migrations import prepare


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """Every hub and store in this module runs on SQLite and on PostgreSQL (conftest.py)."""
    return request.param


def run_isolated(coro, store: Store | None = None):
    """Run a coroutine on a fresh loop in its own thread: a session-wide Playwright (sync API) keeps
    an event loop running in the main thread once any browser test has run.

    With a store, its connections are closed before that loop ends: asyncpg's belong to the loop
    that opened them (the store opens new ones on the next loop)."""
    from concurrent.futures import ThreadPoolExecutor

    async def run():
        try:
            return await coro
        finally:
            if store is not None:
                await store.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def local(y, mo, d, h, mi=0) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, tzinfo=LOCAL_TZ).astimezone(dt.timezone.utc)


POLICY = SurveyPolicy(delay_s=600, retry_s=1800, max_attempts=3, quiet=parse_quiet_hours("21:00-08:30"))


def test_quiet_hours_parse_and_reject() -> None:
    assert parse_quiet_hours("") is None
    assert parse_quiet_hours("21:00-08:30") == (dt.time(21), dt.time(8, 30))
    for bad in ("21-8", "25:00-08:00", "21:00-08:61", "夜里"):
        with pytest.raises(ValueError):
            parse_quiet_hours(bad)


def test_no_call_in_quiet_hours_across_midnight() -> None:
    assert not POLICY.in_quiet_hours(local(2026, 3, 2, 20, 59))
    assert POLICY.in_quiet_hours(local(2026, 3, 2, 21, 0))
    assert POLICY.in_quiet_hours(local(2026, 3, 3, 3, 0))
    assert not POLICY.in_quiet_hours(local(2026, 3, 3, 8, 30))
    # closed at 20:55 + 10 min delay = 21:05 -> next morning 08:30 local
    assert POLICY.first_call(local(2026, 3, 2, 20, 55)) == local(2026, 3, 3, 8, 30)
    # closed at 02:00 -> 08:30 the same morning
    assert POLICY.first_call(local(2026, 3, 3, 2, 0)) == local(2026, 3, 3, 8, 30)
    # daytime: just the delay
    assert POLICY.first_call(local(2026, 3, 3, 10, 0)) == local(2026, 3, 3, 10, 10)
    # a daytime window (not across midnight) works too
    lunch = SurveyPolicy(quiet=parse_quiet_hours("12:00-13:30"))
    assert lunch.allowed(local(2026, 3, 3, 12, 15)) == local(2026, 3, 3, 13, 30)


def test_retries_back_off_and_respect_quiet_hours() -> None:
    t = local(2026, 3, 3, 10, 0)
    assert POLICY.retry_at(t, 1) == t + dt.timedelta(minutes=30)
    assert POLICY.retry_at(t, 2) == t + dt.timedelta(minutes=60)
    assert POLICY.retry_at(local(2026, 3, 3, 20, 45), 1) == local(2026, 3, 4, 8, 30)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def store(tmp_path, database_url):
    s = Store(database_url or f"sqlite+aiosqlite:///{tmp_path / 'surveys.db'}")
    run_isolated(prepare(s), s)
    yield s


def test_phone_survey_retries_then_gives_up_never_at_night(store) -> None:
    async def scenario():
        clock = Clock(local(2026, 3, 3, 20, 0))
        calls: list[tuple[int, dt.datetime]] = []
        answers = iter([None, RuntimeError("trunk unreachable"), None])

        async def caller(survey):
            calls.append((survey.id, clock.now))
            a = next(answers)
            if isinstance(a, Exception):
                raise a
            return a

        svc = SurveyService(store, POLICY, phone_caller=caller, clock=clock)
        conv, _ = await store.create_conversation("phone", "330100", contact="138****5678")
        await store.update_conversation(conv.id, status="closed", closed_at=clock.now)
        conv.closed_at = clock.now
        survey = await svc.schedule(conv, "caller_hung_up")
        assert survey.status == "pending" and survey.due_at == local(2026, 3, 3, 20, 10)
        assert await svc.run_due() == 0  # not due yet
        clock.now = local(2026, 3, 3, 20, 10)
        assert await svc.run_due() == 1  # attempt 1: no answer
        s = await svc.for_conversation(conv.id)
        assert (s.status, s.attempts, s.last_error) == ("pending", 1, "no_key")
        # the retry would be 20:40 (+30 min): before quiet hours, so allowed
        assert s.due_at.replace(tzinfo=dt.timezone.utc) == local(2026, 3, 3, 20, 40)
        clock.now = local(2026, 3, 3, 20, 40)
        assert await svc.run_due() == 1  # attempt 2: the trunk fails
        s = await svc.for_conversation(conv.id)
        assert s.status == "pending" and s.attempts == 2 and "trunk unreachable" in s.last_error
        # +60 min = 21:40: quiet hours -> 08:30 next morning
        assert s.due_at.replace(tzinfo=dt.timezone.utc) == local(2026, 3, 4, 8, 30)
        clock.now = local(2026, 3, 3, 23, 0)
        assert await svc.run_due() == 0  # nothing at night, even when overdue
        clock.now = local(2026, 3, 4, 8, 31)
        assert await svc.run_due() == 1  # attempt 3: no answer -> failed
        s = await svc.for_conversation(conv.id)
        assert (s.status, s.attempts) == ("failed", 3)
        clock.now = local(2026, 3, 5, 10, 0)
        assert await svc.run_due() == 0
        assert len(calls) == 3
        # every attempt fell outside the quiet hours
        assert not any(POLICY.in_quiet_hours(when) for _, when in calls)

    run_isolated(scenario(), store)


def test_keypad_answer_is_stored_once_and_a_second_close_does_not_reschedule(store) -> None:
    async def scenario():
        clock = Clock(local(2026, 3, 3, 10, 0))

        async def caller(survey):
            return 4

        svc = SurveyService(store, POLICY, phone_caller=caller, clock=clock)
        conv, _ = await store.create_conversation("phone")
        first = await svc.schedule(conv, "caller_hung_up")
        again = await svc.schedule(conv, "escalation_closed")
        assert again.id == first.id
        clock.now += dt.timedelta(minutes=11)
        assert await svc.run_due() == 1
        s = await svc.for_conversation(conv.id)
        assert (s.status, s.rating, s.answered_via) == ("answered", 4, "keypad")
        assert await svc.run_due() == 0
        from xiaozhi.hub.domain.surveys import SurveyError

        with pytest.raises(SurveyError) as err:
            await svc.answer(conv.id, 5)
        assert err.value.code == "already_answered"
        assert (await svc.for_conversation(conv.id)).rating == 4

    run_isolated(scenario(), store)


def test_phone_survey_without_a_trunk_is_recorded_unreachable(store) -> None:
    async def scenario():
        svc = SurveyService(store, POLICY)
        conv, _ = await store.create_conversation("phone")
        s = await svc.schedule(conv, "caller_hung_up")
        assert s.status == "unreachable"
        assert await svc.run_due() == 0

    run_isolated(scenario(), store)


def test_chat_survey_offered_on_close_answered_once_comment_masked(hub) -> None:
    sid, auth = open_session(hub)
    assert hub.get(f"/api/sessions/{sid}/survey", headers=auth).json() == {"survey": None}
    assert hub.post(f"/api/sessions/{sid}/survey", json={"rating": 5}, headers=auth).status_code == 404
    hub.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
    closed = hub.post(f"/api/sessions/{sid}/close", headers=auth)
    assert closed.status_code == 200, closed.text
    assert closed.json()["survey"]["status"] == "offered"
    survey = hub.get(f"/api/sessions/{sid}/survey", headers=auth).json()["survey"]
    assert survey["status"] == "offered" and "1分" in survey["question"]
    for bad in ({"rating": 0}, {"rating": 6}, {"rating": "很好"}, {}):
        r = hub.post(f"/api/sessions/{sid}/survey", json=bad, headers=auth)
        assert r.status_code == 422, (bad, r.text)
    ok = hub.post(f"/api/sessions/{sid}/survey", json={"rating": 4, "comment": "挺好，我电话13812345678"}, headers=auth)
    assert ok.status_code == 200 and ok.json()["survey"]["rating"] == 4
    twice = hub.post(f"/api/sessions/{sid}/survey", json={"rating": 1}, headers=auth)
    assert twice.status_code == 409 and twice.json()["error"] == "already_answered"
    assert "评价过" in twice.json()["message"]
    # another resident's token cannot answer or read it
    other, other_auth = open_session(hub)
    assert hub.get(f"/api/sessions/{sid}/survey", headers=other_auth).status_code == 403
    # stored, masked
    app = hub.app

    async def stored():
        return await app.state.surveys.for_conversation(sid)

    row = hub.portal.call(stored)
    assert row.rating == 4 and "13812345678" not in row.comment and "138" in row.comment


def test_closing_twice_keeps_one_survey(hub) -> None:
    sid, auth = open_session(hub)
    assert hub.post(f"/api/sessions/{sid}/close", headers=auth).status_code == 200
    assert hub.post(f"/api/sessions/{sid}/close", headers=auth).status_code == 200
    assert hub.get(f"/api/sessions/{sid}/survey", headers=auth).json()["survey"]["status"] == "offered"


def test_an_escalation_closed_without_closing_the_conversation_gets_a_survey(store) -> None:
    from xiaozhi.hub.infra.store import Escalation

    async def scenario():
        clock = Clock(local(2026, 3, 3, 10, 0))
        published: list[tuple[str, dict]] = []
        svc = SurveyService(store, POLICY, clock=clock, publish=lambda cid, ev: published.append((cid, ev)))
        handled, _ = await store.create_conversation("web")
        abandoned, _ = await store.create_conversation("web")
        waiting, _ = await store.create_conversation("web")
        async with store.sessions() as s, s.begin():
            t = clock.now - dt.timedelta(minutes=5)
            s.add(
                Escalation(
                    conversation_id=handled.id,
                    channel="web",
                    reason="requested",
                    status="closed",
                    created_at=t,
                    claimed_at=t,
                    closed_at=clock.now,
                    disposition="resolved",
                )
            )
            s.add(
                Escalation(
                    conversation_id=abandoned.id,
                    channel="web",
                    reason="requested",
                    status="closed",
                    created_at=t,
                    closed_at=clock.now,
                    disposition="abandoned",
                )
            )
            s.add(
                Escalation(
                    conversation_id=waiting.id, channel="web", reason="requested", status="waiting", created_at=t
                )
            )
        await svc.run_due()
        assert (await svc.for_conversation(handled.id)).status == "offered"
        assert await svc.for_conversation(abandoned.id) is None
        assert await svc.for_conversation(waiting.id) is None
        assert [cid for cid, ev in published if ev["type"] == "survey"] == [handled.id]
        await svc.run_due()  # once only
        assert len(published) == 1

    run_isolated(scenario(), store)


def test_bad_survey_settings_are_logged_and_the_hub_still_serves(hub_settings, knowledge_base, caplog) -> None:
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    settings = hub_settings.model_copy(
        update={"survey_sip_uri": "tel:+8657112345", "survey_quiet_hours": "夜里", "survey_poll_interval_s": 0}
    )
    with caplog.at_level("ERROR", logger="xiaozhi.hub.domain.surveys"):
        with TestClient(create_app(settings, knowledge_base=knowledge_base)) as client:
            assert client.app.state.surveys.phone_caller is None
            assert client.app.state.surveys.policy.quiet == (dt.time(21), dt.time(8, 30))
            sid, auth = open_session(client)
            assert client.post(f"/api/sessions/{sid}/close", headers=auth).json()["survey"]["status"] == "offered"
    text = caplog.text
    assert "XIAOZHI_SURVEY_SIP_URI" in text and "XIAOZHI_SURVEY_QUIET_HOURS" in text
