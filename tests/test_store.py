"""The store upgrades a database made by an older release by adding the columns added since."""

import asyncio
import sqlite3

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
