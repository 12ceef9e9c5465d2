"""Read the knowledge-base data files into validated entries, and check the corpus as a whole."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from knowledge_base.schema import LOCAL_RULE_NOTICE, SPOKEN_POINT_TARGET, Entry, EntryFile, KnowledgePoint

DATA_DIR = Path(__file__).resolve().parent / "data"


class CorpusError(Exception):
    """The data files cannot be loaded: the message lists every problem found."""


@dataclass
class Problem:
    path: str
    entry_id: str | None
    message: str
    # "error" stops indexing; "source" (a citation a resident cannot check: site root, no document
    # or date) is served but refused by `kb validate`; "warning" is reported only.
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.path}" + (f" [{self.entry_id}]" if self.entry_id else "")
        return f"{self.severity}: {where}: {self.message}"


@dataclass
class Corpus:
    entries: list[Entry]
    problems: list[Problem] = field(default_factory=list)
    fingerprint: str = ""
    points: list[KnowledgePoint] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def refused(self) -> list[Problem]:
        """What `kb validate` refuses: errors, and citations a resident cannot check."""
        return [p for p in self.problems if p.severity in ("error", "source")]

    def by_id(self) -> dict[str, Entry]:
        return {e.id: e for e in self.entries}

    def points_of(self) -> dict[str, list[KnowledgePoint]]:
        """Each entry's knowledge points, in file order."""
        out: dict[str, list[KnowledgePoint]] = {}
        for point in self.points:
            out.setdefault(point.entry, []).append(point)
        return out

    def coverage(self) -> dict[str, dict[str, int]]:
        """Per topic: entries, knowledge points, and how many of those points are verified."""
        topics: dict[str, dict[str, int]] = {}
        entries = self.by_id()
        for e in self.entries:
            topics.setdefault(e.topic_name, {"entries": 0, "points": 0, "verified": 0})["entries"] += 1
        for p in self.points:
            parent = entries.get(p.entry)
            if parent is None:
                continue
            row = topics[parent.topic_name]
            row["points"] += 1
            row["verified"] += p.verified
        return topics


def _data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def load_corpus(root: Path = DATA_DIR, *, stale_after_years: int = 5, today: dt.date | None = None) -> Corpus:
    """Load and validate every data file below ``root``; problems are collected, not raised."""
    items: list[tuple[str, str, object]] = []
    problems: list[Problem] = []
    digest = hashlib.sha256()
    for path in _data_files(root):
        rel = str(path.relative_to(root))
        raw = path.read_bytes()
        digest.update(rel.encode() + b"\0" + raw)
        try:
            doc = EntryFile.model_validate(yaml.safe_load(raw) or {})
        except (yaml.YAMLError, ValidationError) as exc:
            problems.append(Problem(rel, None, f"file is not a valid entry file: {exc}"))
            continue
        items += [(rel, "entry", _in_region(raw_entry, doc)) for raw_entry in doc.entries]
        items += [(rel, "point", _in_region(raw_point, doc)) for raw_point in doc.points]
    corpus = build_corpus(items, fingerprint=digest.hexdigest()[:16], stale_after_years=stale_after_years, today=today)
    corpus.problems[:0] = problems
    return corpus


def _in_region(raw, doc: EntryFile):
    """An item of a file in the file's region (an item that is not a mapping stays as it is: refused later)."""
    return {**raw, "region": doc.region} if isinstance(raw, dict) else raw


def build_corpus(
    items, *, fingerprint: str, stale_after_years: int = 5, today: dt.date | None = None
) -> Corpus:
    """A corpus from ``(where, kind, raw)`` items in order: ``kind`` is "entry" or "point", ``raw`` a mapping
    carrying its own ``region``, ``where`` names it in problems (a data file, or a database record).

    The data files and the database (the console's records, xiaozhi/hub/domain/knowledge_store.py) are
    checked by this same code, so what ``kb validate`` refuses the console refuses too."""
    today = today or dt.date.today()
    entries: list[Entry] = []
    points: list[KnowledgePoint] = []
    point_files: dict[str, str] = {}
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for rel, kind, raw in items:
        if kind == "entry":
            entry = _validated(Entry, raw, rel, problems)
            if entry is None:
                continue
            if entry.id in seen:
                problems.append(Problem(rel, entry.id, f"duplicate id (also in {seen[entry.id]})"))
                continue
            seen[entry.id] = rel
            if entry.local_figure and LOCAL_RULE_NOTICE not in (entry.answer + entry.spoken):
                problems.append(
                    Problem(rel, entry.id, f"local_figure entries must say “{LOCAL_RULE_NOTICE}”")
                )
            problems.extend(Problem(rel, entry.id, m, "source") for m in entry.source.problems())
            if entry.review:
                problems.append(Problem(rel, entry.id, f"needs review: {entry.review}", "warning"))
            if entry.effective_date > today:
                problems.append(Problem(rel, entry.id, "effective_date is in the future", "warning"))
            elif (today - entry.effective_date).days > 365 * stale_after_years:
                problems.append(
                    Problem(rel, entry.id, f"source older than {stale_after_years} years: re-check it", "warning")
                )
            entries.append(entry)
        else:
            point = _validated(KnowledgePoint, raw, rel, problems)
            if point is None:
                continue
            if point.id in seen or point.id in point_files:
                problems.append(Problem(rel, point.id, f"duplicate id (also in {seen.get(point.id) or point_files[point.id]})"))
                continue
            point_files[point.id] = rel
            problems.extend(_check_point(rel, point))
            points.append(point)
    by_id = {e.id: e for e in entries}
    for point in list(points):
        if point.entry not in by_id:
            problems.append(Problem(point_files[point.id], point.id, f"parent entry {point.entry!r} does not exist"))
            points.remove(point)
    problems.extend(_check_overrides(entries, seen))
    return Corpus(entries=entries, problems=problems, fingerprint=fingerprint, points=points)


def _validated(model, raw, rel: str, problems: list[Problem]):
    """One entry or knowledge point (its region included); None (and the problem noted) if invalid."""
    try:
        return model.model_validate(raw)
    except (ValidationError, TypeError) as exc:
        item_id = raw.get("id") if isinstance(raw, dict) else None
        message = _short_validation_message(exc) if isinstance(exc, ValidationError) else "not a mapping"
        problems.append(Problem(rel, item_id, message))
        return None


def _check_point(rel: str, point: KnowledgePoint) -> list[Problem]:
    found = [Problem(rel, point.id, m, "source") for m in point.source.problems()]
    text = point.answer + point.spoken
    if point.local_figure and LOCAL_RULE_NOTICE not in text:
        found.append(Problem(rel, point.id, f"local_figure points must say “{LOCAL_RULE_NOTICE}”"))
    if len(point.spoken) > SPOKEN_POINT_TARGET:
        found.append(Problem(rel, point.id, f"spoken form has {len(point.spoken)} characters (aim for <= {SPOKEN_POINT_TARGET})", "warning"))
    missing = [f for f in point.facts if f not in point.answer]
    if missing:
        found.append(Problem(rel, point.id, f"facts not stated in the answer: {', '.join(missing)}", "warning"))
    if point.review:
        found.append(Problem(rel, point.id, f"needs review: {point.review}", "warning"))
    return found


def _check_overrides(entries: list[Entry], where: dict[str, str]) -> list[Problem]:
    """A local entry may replace a national one; two entries of one region may not replace the same one."""
    by_id = {e.id: e for e in entries}
    claimed: dict[tuple[str, str], str] = {}
    problems = []
    for entry in entries:
        if entry.overrides is None:
            continue
        target = by_id.get(entry.overrides)
        if target is None:
            problems.append(Problem(where[entry.id], entry.id, f"overrides unknown entry {entry.overrides!r}"))
            continue
        if target.region.code == entry.region.code:
            problems.append(Problem(where[entry.id], entry.id, "overrides an entry of its own region"))
        key = (entry.region.code, entry.overrides)
        if key in claimed:
            problems.append(
                Problem(where[entry.id], entry.id, f"region conflict: {claimed[key]} already overrides {entry.overrides}")
            )
        claimed[key] = entry.id
    return problems


def _short_validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
