"""Knowledge for tests: a small corpus cut from the packs, and the knowledge console's records (the packs
in a new SQLite database with a first publication)."""

from __future__ import annotations

from pathlib import Path

import yaml

from knowledge_base.loader import load_corpus
from knowledge_base.records import pack_records
from xiaozhi.hub import migrations
from xiaozhi.hub.domain.accounts import StaffUser
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
from xiaozhi.hub.infra.store import Store

DATA = Path(__file__).resolve().parent.parent.parent / "knowledge_base" / "data"


def small_corpus(tmp_path: Path, entries: int = 3):
    """The first few e-voucher entries and their knowledge points, as a corpus of their own."""
    root = tmp_path / "data" / "national"
    (root / "points").mkdir(parents=True)
    doc = yaml.safe_load((DATA / "national" / "e_voucher.yaml").read_text(encoding="utf-8"))
    doc["entries"] = doc["entries"][:entries]
    keep = {e["id"] for e in doc["entries"]}
    points = yaml.safe_load((DATA / "national" / "points" / "e_voucher.yaml").read_text(encoding="utf-8"))
    points["points"] = [p for p in points["points"] if p["entry"] in keep]
    (root / "e_voucher.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    (root / "points" / "e_voucher.yaml").write_text(yaml.safe_dump(points, allow_unicode=True), encoding="utf-8")
    corpus = load_corpus(tmp_path / "data")
    assert not corpus.errors and len(corpus.points) >= 4
    return corpus


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
