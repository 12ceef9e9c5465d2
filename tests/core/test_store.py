"""The store: a database made by an older release before schema migrations gains the columns and indexes added
since (the one-time bridge, xiaozhi/hub/migrations/pre_alembic.py; tests/core/test_migrations.py has the rest), and
what several replicas do to one database (SQLite and PostgreSQL)."""

import asyncio
import sqlite3

import pytest
from tests.support import DATABASES

from xiaozhi.hub.infra.store import Store
from xiaozhi.hub.migrations import prepare


def test_an_older_database_gains_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the conversations table as the first release made it
        db.execute(
            "CREATE TABLE conversations (id VARCHAR(36) PRIMARY KEY, token_hash VARCHAR(64) UNIQUE, "
            "channel VARCHAR(16), region_code VARCHAR(6), status VARCHAR(16), created_at DATETIME, updated_at DATETIME)"
        )
        db.execute("INSERT INTO conversations VALUES ('c1', 'h1', 'web', '330100', 'open', '2026-01-01', '2026-01-01')")

    async def upgrade():
        store = Store(f"sqlite+aiosqlite:///{path}")
        await prepare(store)
        conv = await store.get_conversation("c1")
        await store.close()
        return conv

    conv = asyncio.run(upgrade())
    assert (conv.channel, conv.region_code, conv.contact, conv.entry_point, conv.meta) == ("web", "330100", "", "", {})
    assert conv.closed_at is None


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    return request.param


def test_older_tables_gain_boolean_integer_and_json_columns_on_both_databases(tmp_path, database_url):
    """The additive upgrade's DDL must suit the database: PostgreSQL refuses `BOOLEAN DEFAULT 1`."""
    from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert, select

    from xiaozhi.hub.domain.accounts import StaffUser

    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    old = MetaData()  # staff_users before skills and disabling; escalations before the agent desk
    users = Table("staff_users", old, Column("id", Integer, primary_key=True), Column("username", String(64)),
                  Column("display_name", String(64)), Column("role", String(16)), Column("password_hash", String(256)),
                  Column("created_at", DateTime(timezone=True)))
    queue = Table("escalations", old, Column("id", Integer, primary_key=True), Column("conversation_id", String(36)),
                  Column("channel", String(16)), Column("reason", String(32)), Column("status", String(16)),
                  Column("created_at", DateTime(timezone=True)))

    async def upgrade():
        store = Store(url)
        try:
            async with store.engine.begin() as conn:
                await conn.run_sync(old.create_all)
                await conn.execute(insert(users).values(username="li", display_name="", role="agent", password_hash="x"))
                await conn.execute(insert(queue).values(conversation_id="c-old", channel="web", reason="requested",
                                                        status="waiting"))
            await prepare(store)
            async with store.sessions() as s:
                user = (await s.execute(select(StaffUser))).scalar_one()
            return user, await store.escalations()
        finally:
            await store.close()

    user, (item,) = asyncio.run(upgrade())
    assert user.active is True and not user.skills
    assert (item.priority, item.topic, item.agent, item.claimed_at, item.disposition, item.summary) == (0, "", "", None, "", {})


def test_a_conversation_has_one_open_queue_item_even_when_replicas_queue_it_at_once(tmp_path, database_url):
    """Four stores (as four hub replicas) queue the same conversations concurrently: one item each.

    Before the partial unique index, PostgreSQL let every replica's read-then-insert through."""
    from xiaozhi.hub.infra.store import Escalation

    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"

    async def race():
        stores = [Store(url) for _ in range(4)]
        try:
            await prepare(stores[0])  # replicas starting together: tests/core/test_replicas.py
            results = []
            for _ in range(10):
                conv, _token = await stores[0].create_conversation("web")
                items = await asyncio.gather(*(s.add_escalation(conv.id, "web", "requested") for s in stores))
                results.append((conv.id, {item.id for item in items}))
            # Closed, the item no longer counts: the same conversation may be queued again.
            conv_id, (item_id,) = results[0]
            async with stores[0].sessions() as s, s.begin():
                (await s.get(Escalation, item_id)).status = "closed"
            again = await stores[1].add_escalation(conv_id, "web", "requested")
            return results, item_id, again.id
        finally:
            for s in stores:
                await s.close()

    results, first, again = asyncio.run(race())
    assert all(len(ids) == 1 for _conv, ids in results), results
    assert again != first


def test_an_older_queue_with_duplicate_open_items_keeps_one_open_item_each_and_gets_its_index(
    tmp_path, database_url, caplog
):
    from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, inspect, insert

    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    old = MetaData()  # escalations as an older release made them, without the one-open-item index
    queue = Table("escalations", old, Column("id", Integer, primary_key=True), Column("conversation_id", String(36)),
                  Column("channel", String(16)), Column("reason", String(32)), Column("status", String(16)),
                  Column("created_at", DateTime(timezone=True)))

    def wipe(connection):
        everything = MetaData()
        everything.reflect(connection)
        everything.drop_all(connection)

    async def upgrade(rows):
        store = Store(url)
        try:
            async with store.engine.begin() as conn:
                await conn.run_sync(wipe)  # each round a database of that older release, unversioned
                await conn.run_sync(old.create_all)
                for conversation_id, status in rows:
                    await conn.execute(insert(queue).values(conversation_id=conversation_id, channel="web",
                                                            reason="requested", status=status))
            await prepare(store)
            async with store.engine.connect() as conn:
                names = await conn.run_sync(lambda c: {i["name"] for i in inspect(c).get_indexes("escalations")})
            item = await store.add_escalation("c-dup", "web", "requested")
            return names, item, len(await store.escalations())
        finally:
            await store.close()

    # an older release queued c-dup twice (two replicas at once); an agent holds the second
    names, item, waiting = asyncio.run(upgrade([("c-dup", "waiting"), ("c-dup", "claimed"), ("c-old", "closed")]))
    assert "uq_escalations_open_conversation" in names, "the duplicate closed, the index is made"
    assert "closed 1 duplicate open queue item(s) (ids 1)" in caplog.text
    assert item.id == 2 and item.status == "claimed", "the conversation keeps the item the agent holds"
    assert waiting == 0

    caplog.clear()
    names, item, waiting = asyncio.run(upgrade([("c-dup", "closed"), ("c-dup", "waiting"), ("c-old", "closed")]))
    assert "uq_escalations_open_conversation" in names, "rows that fit get the index on upgrade"
    assert waiting == 1 and "remove the duplicates" not in caplog.text


def test_the_idle_close_scan_reads_the_status_index_not_every_conversation(tmp_path):
    """The idle close runs every minute over all conversations ever held; revision 0002's index on
    (status, channel, updated_at) is what keeps it from reading the closed ones. The plan of the very
    statement the store sends is checked (SQLite's planner picks an index for equality terms unasked)."""
    import datetime as dt

    from sqlalchemy import event

    path = tmp_path / "hub.db"

    async def capture() -> list[tuple[str, tuple]]:
        store = Store(f"sqlite+aiosqlite:///{path}")
        sent: list[tuple[str, tuple]] = []
        try:
            await prepare(store)
            event.listen(store.engine.sync_engine, "before_cursor_execute",
                         lambda conn, cursor, statement, params, context, many: sent.append((statement, params)))
            await store.idle_conversations("web", "open", dt.datetime.now(dt.timezone.utc))
        finally:
            await store.close()
        return sent

    [(statement, params)] = [(st, p) for st, p in asyncio.run(capture()) if "FROM conversations" in st]
    with sqlite3.connect(path) as db:
        plan = " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params))
    assert "USING INDEX ix_conversations_status_channel_updated" in plan, plan
