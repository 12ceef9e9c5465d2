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
    """The JSON document of a validated entry or knowledge point (dates as ISO text, the region included).
    A record without an expiry date has no ``expiry_date`` key, as before the field existed."""
    doc = item.model_dump(mode="json")
    if doc.get("expiry_date") is None:
        doc.pop("expiry_date", None)
    return doc


def expiry_of(doc: dict) -> dt.date | None:
    """A record's expiry date (the last day it holds), if it has a valid one."""
    try:
        return dt.date.fromisoformat(doc["expiry_date"]) if doc.get("expiry_date") else None
    except (TypeError, ValueError):
        return None


def split_expired(entries: list[dict], points: list[dict], today: dt.date) -> tuple[list[dict], list[dict], list[Problem]]:
    """The records still in force on ``today`` (entries, points), and a warning for each one left out:
    a record whose expiry date has passed, and every point of an entry that expired."""
    left: list[Problem] = []
    kept_entries = []
    for doc in entries:
        ends = expiry_of(doc)
        if ends is not None and ends < today:
            left.append(Problem(f"entry:{doc.get('id')}", doc.get("id"), f"expired on {ends}: not served", "warning"))
        else:
            kept_entries.append(doc)
    expired_entries = {d.get("id") for d in entries} - {d.get("id") for d in kept_entries}
    kept_points = []
    for doc in points:
        ends = expiry_of(doc)
        if ends is not None and ends < today:
            left.append(Problem(f"point:{doc.get('id')}", doc.get("id"), f"expired on {ends}: not served", "warning"))
        elif doc.get("entry") in expired_entries:
            left.append(Problem(f"point:{doc.get('id')}", doc.get("id"),
                                f"its entry {doc.get('entry')} expired: not served", "warning"))
        else:
            kept_points.append(doc)
    return kept_entries, kept_points, left


def next_expiry(entries: list[dict], points: list[dict], today: dt.date) -> dt.date | None:
    """The earliest expiry date on or after ``today``: the day after it, what is served must be rebuilt."""
    dates = [d for d in (expiry_of(doc) for doc in [*entries, *points]) if d is not None and d >= today]
    return min(dates, default=None)


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
    """A corpus of the records in force ``today``, validated as the data files are (problems name
    ``entry:<id>``/``point:<id>``); expired records are left out, each with a warning (``split_expired``)."""
    today = today or dt.date.today()
    entries, points, expired = split_expired(entries, points, today)
    items = [(f"entry:{d.get('id')}", "entry", d) for d in entries]
    items += [(f"point:{d.get('id')}", "point", d) for d in points]
    corpus = build_corpus(items, fingerprint=fingerprint_of(entries, points), stale_after_years=stale_after_years,
                          today=today)
    corpus.problems.extend(expired)
    return corpus


def check_record(kind: str, doc: dict, parent: dict | None = None, *, today: dt.date | None = None) -> list[Problem]:
    """What ``kb validate`` would say about one record (a point with its parent entry's record, if it has one)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    items = [(f"{kind}:{doc.get('id')}", kind, doc)]
    if kind == "point" and parent is not None:
        items.insert(0, (f"entry:{parent.get('id')}", "entry", parent))
    corpus = build_corpus(items, fingerprint="", today=today)
    where = items[-1][0]
    found = [p for p in corpus.problems if p.path == where]
    ends = expiry_of(doc)
    if ends is not None and ends < (today or dt.date.today()) and not any(p.severity == "error" for p in found):
        found.append(Problem(where, doc.get("id"), f"expired on {ends}: it will not be served", "warning"))
    return found
