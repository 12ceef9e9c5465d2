"""The store upgrades a database made by an older release by adding the columns added since (SQLite and PostgreSQL)."""

import asyncio
import sqlite3

import pytest
from conftest import DATABASES

from xiaozhi.hub.store import Store


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
        await store.create_schema()
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

    from xiaozhi.hub.accounts import StaffUser

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
            await store.create_schema()
            async with store.sessions() as s:
                user = (await s.execute(select(StaffUser))).scalar_one()
            return user, await store.escalations()
        finally:
            await store.close()

    user, (item,) = asyncio.run(upgrade())
    assert user.active is True and not user.skills
    assert (item.priority, item.topic, item.agent, item.claimed_at, item.disposition, item.summary) == (0, "", "", None, "", {})
