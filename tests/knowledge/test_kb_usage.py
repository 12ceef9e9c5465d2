"""The knowledge console's usage count (issue 18): how many conversations of the last 30 days each entry and
knowledge point answered, read from what analytics already stores (the replies' answers), as a list column,
a filter and a sort, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from tests.support import make_staff, open_session
from xiaozhi.hub.infra.store import Conversation, Message

DATABASES = ["sqlite", "postgresql"]
POINT, ENTRY = "cr-settlement-failed.hotline", "cr-settlement-failed"
QUESTION = "异地就医结算出了问题，打什么电话求助？"


def _ask(hub, session, auth, text=QUESTION):
    r = hub.post(f"/api/sessions/{session}/messages", json={"text": text}, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def _old_conversation(hub, days_ago: int) -> None:
    """A conversation answered with the point ``days_ago`` days ago, as the chat would have stored it."""
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    store = hub.app.state.services.store

    async def insert():
        async with store.sessions() as s, s.begin():
            conv = Conversation(id=str(uuid.uuid4()), token_hash=uuid.uuid4().hex, channel="web", created_at=at)
            s.add(conv)
            await s.flush()
            s.add(Message(conversation_id=conv.id, seq=1, role="bot", text="打12393。", created_at=at,
                          meta={"answers": [{"entry": ENTRY, "point": POINT, "topic": "cross_region"}]}))

    hub.portal.call(insert)


@pytest.mark.parametrize("database_backend", DATABASES)
def test_usage_count_lists_filters_and_sorts_by_conversations_of_the_last_30_days(hub, database_backend):
    agent = make_staff(hub, "kb_usage", "agent")
    first, auth = open_session(hub)
    reply = _ask(hub, first, auth)
    assert reply["replies"][-1]["meta"]["answers"][0]["point"] == POINT
    _ask(hub, first, auth)  # the same conversation again counts once
    second, auth2 = open_session(hub)
    _ask(hub, second, auth2)
    _old_conversation(hub, days_ago=10)
    _old_conversation(hub, days_ago=40)  # older than 30 days: not counted

    def listed(**params):
        r = hub.get("/api/staff/kb/records", params={"limit": 500, **params}, headers=agent)
        assert r.status_code == 200, r.text
        return r.json()

    points = {r["id"]: r["uses"] for r in listed(entry=ENTRY, kind="point")["records"]}
    assert points[POINT] == 3 and sum(points.values()) == 3, points
    entries = {r["id"]: r["uses"] for r in listed(kind="entry")["records"]}
    assert entries[ENTRY] == 3 and sum(entries.values()) == 3

    used = listed(min_uses=1)
    assert [(r["kind"], r["id"]) for r in used["records"]] == [("entry", ENTRY), ("point", POINT)]
    assert used["total"] == 2 and used["usage_days"] == 30
    assert listed(min_uses=4)["total"] == 0
    unused = listed(entry=ENTRY, kind="point", max_uses=0)
    assert unused["total"] == len(points) - 1 and POINT not in {r["id"] for r in unused["records"]}

    by_use = listed(kind="point", sort="uses", limit=3)
    assert by_use["records"][0]["id"] == POINT and by_use["total"] == listed(kind="point", limit=1)["total"]
    ids = [r["id"] for r in by_use["records"][1:]]
    assert ids == sorted(ids)  # ties stay in id order
    page = listed(kind="point", sort="uses", limit=2, offset=1)["records"]
    assert [r["id"] for r in page] == ids

    exported = hub.get("/api/staff/kb/export.csv", params={"min_uses": 1}, headers=agent)
    assert exported.status_code == 200
    assert [line.split(",")[0] for line in exported.content.decode("utf-8-sig").splitlines()[1:]] == [POINT]
