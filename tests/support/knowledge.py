"""The knowledge console's records for tests: the packs in a new SQLite database with a first publication."""

from __future__ import annotations

from pathlib import Path

from knowledge_base.records import pack_records
from xiaozhi.hub import migrations
from xiaozhi.hub.domain.accounts import StaffUser
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
from xiaozhi.hub.infra.store import Store


async def seeded_records(kb_data_dir: Path, db_path: Path, admin: StaffUser) -> tuple[Store, KnowledgeStore, int]:
    """The store (close it), its knowledge records holding the packs as published by ``admin``, and how
    many records that base serves (entries and points)."""
    entries, points, _ = pack_records(kb_data_dir)
    store = Store(f"sqlite+aiosqlite:///{db_path}")
    await migrations.prepare(store)
    records = KnowledgeStore(store)
    await records.import_packs(entries, points)
    corpus, _ = await records.served_corpus()
    await records.record_publication(admin, corpus, "seed")
    return store, records, len(entries) + len(points)
