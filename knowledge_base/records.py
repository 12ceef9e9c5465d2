"""Entries and knowledge points as plain records (JSON documents), for whoever keeps them outside the data files.

The hub keeps the agency's knowledge in its database (xiaozhi/hub/domain/knowledge_store.py): one JSON
document per entry or knowledge point, each carrying its own ``region``. This module turns the data files
into such records (the packs seed a new installation), records back into a ``Corpus`` checked by the same
code as the files (``loader.build_corpus``), and checks one record on its own for the console's editor.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from knowledge_base.loader import DATA_DIR, Corpus, Problem, build_corpus, load_corpus
from knowledge_base.schema import Entry, KnowledgePoint

KINDS = ("entry", "point")
MODELS = {"entry": Entry, "point": KnowledgePoint}


def record_of(item: Entry | KnowledgePoint) -> dict:
    """The JSON document of a validated entry or knowledge point (dates as ISO text, the region included)."""
    return item.model_dump(mode="json")


def pack_records(root: Path = DATA_DIR) -> tuple[list[dict], list[dict], Corpus]:
    """The data files' entries and knowledge points as records, and the corpus they were read from."""
    corpus = load_corpus(root)
    return [record_of(e) for e in corpus.entries], [record_of(p) for p in corpus.points], corpus


def fingerprint_of(entries: list[dict], points: list[dict]) -> str:
    """Identifies a set of records whatever their order: the vector cache is keyed by it."""
    digest = hashlib.sha256()
    for kind, docs in (("entry", entries), ("point", points)):
        for doc in sorted(docs, key=lambda d: str(d.get("id"))):
            digest.update(kind.encode() + b"\0" + json.dumps(doc, sort_keys=True, ensure_ascii=False).encode() + b"\0")
    return "db" + digest.hexdigest()[:14]


def corpus_from_records(
    entries: list[dict], points: list[dict], *, stale_after_years: int = 5, today: dt.date | None = None
) -> Corpus:
    """A corpus of these records, validated as the data files are (problems name ``entry:<id>``/``point:<id>``)."""
    items = [(f"entry:{d.get('id')}", "entry", d) for d in entries]
    items += [(f"point:{d.get('id')}", "point", d) for d in points]
    return build_corpus(items, fingerprint=fingerprint_of(entries, points), stale_after_years=stale_after_years,
                        today=today)


def check_record(kind: str, doc: dict, parent: dict | None = None, *, today: dt.date | None = None) -> list[Problem]:
    """What ``kb validate`` would say about one record (a point with its parent entry's record, if it has one)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    items = [(f"{kind}:{doc.get('id')}", kind, doc)]
    if kind == "point" and parent is not None:
        items.insert(0, (f"entry:{parent.get('id')}", "entry", parent))
    corpus = build_corpus(items, fingerprint="", today=today)
    where = items[-1][0]
    return [p for p in corpus.problems if p.path == where]
