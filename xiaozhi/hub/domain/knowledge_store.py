"""The agency's own knowledge: entries and knowledge points in the database, versioned, reviewed, published.

One row per record (``kb_records``: an entry or a knowledge point, its JSON document validated by
knowledge_base/schema.py), every change a row of ``kb_versions`` (who, when, what changed as a diff, why),
and every publication a row of ``kb_publications``, whose id is the generation every hub replica polls.

Review states of a record's working copy: draft -> in_review -> published -> retired. Only what was
published is served: a record keeps serving its last published document (``published``) while a new draft
of it is edited and reviewed; retiring it stops serving it. Who may move a record between states is
``TRANSITIONS``; the router checks nothing else.

The YAML packs seed an empty installation (``import_packs``, automatic on first use of the console or
``xiaozhi kb import-packs``) and can be re-imported: a record staff changed since its last import is
left alone (reported as a conflict) unless forced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from sqlalchemy import JSON, Date, DateTime, Index, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, mapped_column

from knowledge_base.loader import Problem
from knowledge_base.records import KINDS, check_record, corpus_from_records, next_expiry
from knowledge_base.schema import TOPICS
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.infra.store import Base, Store, aware, utcnow

log = logging.getLogger(__name__)

STATES = ("draft", "in_review", "published", "retired")
STATE_LABELS = {"draft": "草稿", "in_review": "待审核", "published": "已发布", "retired": "已停用"}
# (from, to) -> the least role that may make the move.
TRANSITIONS: dict[tuple[str, str], Role] = {
    ("draft", "in_review"): Role.supervisor,
    ("in_review", "draft"): Role.supervisor,  # sent back
    ("in_review", "published"): Role.admin,
    ("draft", "published"): Role.admin,
    ("published", "retired"): Role.admin,
    ("retired", "draft"): Role.supervisor,
}
IMPORT_ACTOR = "packs"  # the actor of versions written by an import of the YAML packs


class KnowledgeRecord(Base):
    __tablename__ = "kb_records"
    __table_args__ = (Index("ix_kb_records_state_topic", "state", "topic"),)

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # entry | point
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    entry_id: Mapped[str] = mapped_column(String(128), default="", index=True)  # a point's entry; an entry's own id
    topic: Mapped[str] = mapped_column(String(32), default="")  # a point takes its entry's
    region_code: Mapped[str] = mapped_column(String(6), default="100000")
    state: Mapped[str] = mapped_column(String(16), default="draft")
    version: Mapped[int] = mapped_column(Integer, default=1)  # the working copy's version
    doc: Mapped[dict] = mapped_column(JSON)  # the working copy
    published: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # what is served (None: nothing)
    published_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    expiry_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    search_text: Mapped[str] = mapped_column(Text, default="")  # title/question, answer, source: what the list searches
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(64), default="")
    imported_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the version the last import wrote


class KnowledgeVersion(Base):
    """One change of a record (an edit, a restore, an import or a move between review states): numbered from 1."""

    __tablename__ = "kb_versions"
    __table_args__ = (UniqueConstraint("kind", "record_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    record_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # create, edit, restore, import, state
    state: Mapped[str] = mapped_column(String(16))  # the record's state after this change
    doc: Mapped[dict] = mapped_column(JSON)
    diff: Mapped[list] = mapped_column(JSON, default=list)  # [{"field", "before", "after"}]
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16), default="")
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KnowledgePublication(Base):
    """One publication: the generation number (id) every replica serves up to, and what it held."""

    __tablename__ = "kb_publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    entries: Mapped[int] = mapped_column(Integer, default=0)
    points: Mapped[int] = mapped_column(Integer, default=0)
    fingerprint: Mapped[str] = mapped_column(String(32), default="")
    note: Mapped[str] = mapped_column(Text, default="")


class RecordInvalid(ValueError):
    """A record's document does not pass the knowledge base's checks; ``problems`` says each reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


class RecordNotFound(LookupError):
    pass


class TransitionRefused(PermissionError):
    """A review move this role may not make, or that does not exist from the record's state."""


@dataclass
class Filters:
    """What the console's list filters by (all optional; ``text`` matches title/question, answer, source)."""

    kind: str | None = None
    topic: str | None = None
    region: str | None = None
    state: str | None = None
    text: str | None = None
    source_older_than_years: float | None = None
    expiring_within_days: int | None = None  # expired, or expiring within this many days (0: expired)
    entry: str | None = None
    ids: list[str] = field(default_factory=list)
    # Usage: conversations of the last 30 days answered with the record (analytics.usage_counts).
    min_uses: int | None = None
    max_uses: int | None = None
    sort: str = "id"  # id (kind, then id) | uses (most used first)

    @property
    def needs_uses(self) -> bool:
        return self.min_uses is not None or self.max_uses is not None or self.sort == "uses"


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)  # records staff changed since their last import


def _actor(user: StaffUser | str) -> tuple[str, str]:
    return (user.username, user.role) if isinstance(user, StaffUser) else (user, "")


def _flat(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("source", "region"):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def diff(before: dict | None, after: dict) -> list[dict]:
    """Fields that changed (source.* and region.* one by one), with the values before and after."""
    old, new = _flat(before or {}), _flat(after)
    return [
        {"field": k, "before": old.get(k), "after": new.get(k)}
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _date(value) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None


class KnowledgeStore:
    """The records, their versions and the publications, on the hub's store."""

    def __init__(self, store: Store, *, stale_after_years: int = 5, expiry_warn_days: int = 60) -> None:
        self.store = store
        self.stale_after_years = stale_after_years
        self.expiry_warn_days = expiry_warn_days  # the reminders list records expiring within this many days
        self.seeded = False  # the console's first request found records (or seeded them)
        self._importing = asyncio.Lock()  # one import at a time in this process (SQLite has no advisory lock)

    # -- checking ---------------------------------------------------------------------------------
    async def _parent(self, s, kind: str, doc: dict) -> dict | None:
        if kind != "point" or not isinstance(doc.get("entry"), str):
            return None
        row = await s.get(KnowledgeRecord, ("entry", doc["entry"]))
        return row.doc if row is not None else None

    async def check(self, kind: str, doc: dict) -> list[Problem]:
        """Every problem ``kb validate`` would report for this document (errors, sources, warnings)."""
        async with self.store.sessions() as s:
            parent = await self._parent(s, kind, doc)
        return check_record(kind, doc, parent)

    def _normalised(self, kind: str, doc: dict, parent: dict | None) -> dict:
        """The validated document as stored (dates ISO, folded lines joined); RecordInvalid if it is refused."""
        from knowledge_base.records import MODELS, record_of

        problems = check_record(kind, doc, parent)
        if kind == "point" and parent is None:
            problems.append(Problem(f"point:{doc.get('id')}", doc.get("id"), f"parent entry {doc.get('entry')!r} does not exist"))
        refused = [p for p in problems if p.severity in ("error", "source")]
        if refused:
            raise RecordInvalid(refused)
        return record_of(MODELS[kind].model_validate(doc))

    @staticmethod
    def _columns(row: KnowledgeRecord, kind: str, doc: dict, parent: dict | None) -> None:
        row.entry_id = doc["entry"] if kind == "point" else doc["id"]
        row.topic = (parent or {}).get("topic", "") if kind == "point" else doc.get("topic", "")
        row.region_code = (doc.get("region") or {}).get("code", "100000")
        source = doc.get("source") or {}
        row.source_date = _date(source.get("date")) or (_date(doc.get("effective_date")) if kind == "entry" else None)
        row.expiry_date = _date(doc.get("expiry_date"))
        title = doc.get("title") or doc.get("question") or ""
        row.search_text = "\n".join(
            [row.id, title, *doc.get("questions", []), *doc.get("asks", []), doc.get("answer", ""),
             doc.get("spoken", ""), source.get("title", ""), source.get("document") or ""]
        )

    # -- writing ----------------------------------------------------------------------------------
    async def save(self, user: StaffUser | str, kind: str, doc: dict, *, reason: str = "", create: bool | None = False,
                   action: str | None = None) -> KnowledgeRecord:
        """A new version of a record's working copy (a draft); ``create``: the record must not exist yet
        (False: it must exist; None: either)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        async with self.store.sessions() as s, s.begin():
            return await self._save(s, user, kind, doc, reason=reason, create=create, action=action)

    async def save_many(self, user: StaffUser | str, kind: str, docs: list[dict], *, reason: str = "",
                        action: str = "import", keep: tuple[str, ...] = ()) -> tuple[int, int]:
        """Each document as a new draft version (created or edited), all in one transaction: all or nothing.
        ``keep``: fields the documents do not carry at all (a sheet without that column), which an existing
        record keeps rather than loses. (records created, records changed)."""
        created = changed = 0
        async with self.store.sessions() as s, s.begin():
            for doc in docs:
                current = await s.get(KnowledgeRecord, (kind, doc.get("id")))
                existed = current is not None
                before = current.version if existed else 0
                if existed:
                    doc = {**doc, **{f: current.doc[f] for f in keep if f not in doc and f in current.doc}}
                row = await self._save(s, user, kind, doc, reason=reason, create=None, action=action)
                created += not existed
                changed += existed and row.version != before
        return created, changed

    async def _save(self, s, user, kind: str, doc: dict, *, reason: str, create: bool | None,
                    action: str | None) -> KnowledgeRecord:
        actor, role = _actor(user)
        record_id = doc.get("id")
        parent = await self._parent(s, kind, doc)
        clean = self._normalised(kind, doc, parent)
        row = await s.get(KnowledgeRecord, (kind, record_id))
        if create is True and row is not None:
            raise RecordInvalid([Problem(f"{kind}:{record_id}", record_id, "duplicate id: a record with this id exists")])
        if create is False and row is None:
            raise RecordNotFound(f"{kind} {record_id}")
        if row is None:
            other = "point" if kind == "entry" else "entry"
            if await s.get(KnowledgeRecord, (other, record_id)) is not None:
                raise RecordInvalid([Problem(f"{kind}:{record_id}", record_id, "duplicate id: an entry or point has this id")])
            row = KnowledgeRecord(kind=kind, id=record_id, version=0, doc={}, state="draft")
            s.add(row)
        before = row.doc or None
        changes = diff(before, clean)
        if before is not None and not changes and row.state == "draft":
            return row
        if before is not None and not changes and action == "import":
            return row  # a sheet row that changes nothing is no new version
        row.version += 1
        row.doc = clean
        row.state = "draft"
        row.updated_at = utcnow()
        row.updated_by = actor
        self._columns(row, kind, clean, parent)
        s.add(KnowledgeVersion(kind=kind, record_id=record_id, version=row.version,
                               action=action or ("create" if before is None else "edit"), state="draft",
                               doc=clean, diff=changes, reason=reason, actor=actor, role=role))
        return row

    async def entry_docs(self) -> dict[str, dict]:
        """Every entry's working document, by id (a sheet's rows name their entry)."""
        async with self.store.sessions() as s:
            rows = (await s.execute(select(KnowledgeRecord.id, KnowledgeRecord.doc)
                                    .where(KnowledgeRecord.kind == "entry"))).all()
        return {i: d for i, d in rows}

    async def transition(self, user: StaffUser, kind: str, record_id: str, target: str, *, reason: str = "") -> KnowledgeRecord:
        """Move a record's working copy to ``target`` (TRANSITIONS); publishing it makes it what is served."""
        actor, role = _actor(user)
        async with self.store.sessions() as s, s.begin():
            row = await s.get(KnowledgeRecord, (kind, record_id))
            if row is None:
                raise RecordNotFound(f"{kind} {record_id}")
            needed = TRANSITIONS.get((row.state, target))
            if needed is None:
                raise TransitionRefused(f"“{STATE_LABELS.get(row.state, row.state)}”的记录不能改为“{STATE_LABELS.get(target, target)}”。")
            if not user.role_enum.at_least(needed):
                raise TransitionRefused("您的账号没有这项操作的权限。")
            if target == "published" and kind == "point":
                parent = await s.get(KnowledgeRecord, ("entry", row.doc["entry"]))
                if parent is None or parent.published is None:
                    raise TransitionRefused("这条知识点所属的条目尚未发布，请先发布条目。")
            if target == "retired" and kind == "entry":
                served = (await s.execute(select(func.count()).select_from(KnowledgeRecord).where(
                    KnowledgeRecord.kind == "point", KnowledgeRecord.entry_id == record_id,
                    KnowledgeRecord.published.is_not(None)))).scalar_one()
                if served:
                    raise TransitionRefused(f"这个条目下还有{served}条已发布的知识点，请先停用它们。")
            before_served = row.published
            row.version += 1  # every change is a version, a move between states too
            row.state = target
            if target == "published":
                row.published, row.published_version = row.doc, row.version
            elif target == "retired":
                row.published, row.published_version = None, None
            row.updated_at = utcnow()
            row.updated_by = actor
            s.add(KnowledgeVersion(kind=kind, record_id=record_id, version=row.version, action="state", state=target,
                                   doc=row.doc, diff=diff(before_served, row.doc) if target == "published" else [],
                                   reason=reason, actor=actor, role=role))
        return row

    async def restore(self, user: StaffUser | str, kind: str, record_id: str, version: int, *, reason: str = "") -> KnowledgeRecord:
        """A new draft whose document is that of ``version`` (published again like any other draft)."""
        async with self.store.sessions() as s:
            old = (await s.execute(select(KnowledgeVersion).where(
                KnowledgeVersion.kind == kind, KnowledgeVersion.record_id == record_id,
                KnowledgeVersion.version == version).limit(1))).scalar_one_or_none()
        if old is None:
            raise RecordNotFound(f"{kind} {record_id} version {version}")
        return await self.save(user, kind, old.doc, reason=reason or f"恢复到第{version}版", action="restore")

    async def import_packs(self, entries: list[dict], points: list[dict], *, actor: str = IMPORT_ACTOR,
                           force: bool = False, only_if_empty: bool = False) -> ImportReport:
        """Bring the packs' records in as published versions; records staff changed since are left alone.
        ``only_if_empty``: the seed of a new installation (two replicas seeding at once seed once)."""
        report = ImportReport()
        async with self._importing, self.store.exclusive("xiaozhi.kb-import"), self.store.sessions() as s, s.begin():
            rows = {(r.kind, r.id): r for r in (await s.execute(select(KnowledgeRecord))).scalars()}
            if only_if_empty and rows:
                return report
            parents = {d["id"]: d for d in entries}
            for kind, docs in (("entry", entries), ("point", points)):
                for doc in docs:
                    row = rows.get((kind, doc["id"]))
                    if row is None:
                        row = KnowledgeRecord(kind=kind, id=doc["id"], version=0, doc={}, state="draft")
                        s.add(row)
                        report.created += 1
                        action = "import"
                    elif row.doc == doc and row.published == doc:
                        report.unchanged += 1
                        continue
                    elif row.imported_version != row.version and not force:
                        report.conflicts.append(f"{kind}:{doc['id']}")
                        continue
                    else:
                        report.updated += 1
                        action = "import"
                    changes = diff(row.doc or None, doc)
                    row.version += 1
                    row.doc = doc
                    row.state = "published"
                    row.published, row.published_version = doc, row.version
                    row.imported_version = row.version
                    row.updated_at = utcnow()
                    row.updated_by = actor
                    self._columns(row, kind, doc, parents.get(doc.get("entry")) if kind == "point" else None)
                    s.add(KnowledgeVersion(kind=kind, record_id=doc["id"], version=row.version, action=action,
                                           state="published", doc=doc, diff=changes, reason="导入知识包", actor=actor))
        log.info("knowledge packs imported: %d new, %d updated, %d unchanged, %d left alone (changed by staff)",
                 report.created, report.updated, report.unchanged, len(report.conflicts))
        return report

    async def count(self) -> int:
        async with self.store.sessions() as s:
            return (await s.execute(select(func.count()).select_from(KnowledgeRecord))).scalar_one()

    # -- reading ----------------------------------------------------------------------------------
    async def get(self, kind: str, record_id: str) -> KnowledgeRecord:
        async with self.store.sessions() as s:
            row = await s.get(KnowledgeRecord, (kind, record_id))
        if row is None:
            raise RecordNotFound(f"{kind} {record_id}")
        return row

    async def history(self, kind: str, record_id: str) -> list[KnowledgeVersion]:
        async with self.store.sessions() as s:
            return list((await s.execute(select(KnowledgeVersion).where(
                KnowledgeVersion.kind == kind, KnowledgeVersion.record_id == record_id,
            ).order_by(KnowledgeVersion.id.desc()))).scalars())

    async def records(self, filters: Filters | None = None, *, limit: int | None = None, offset: int = 0,
                      today: dt.date | None = None, uses: Mapping[tuple[str, str], int] | None = None,
                      ) -> tuple[list[KnowledgeRecord], int]:
        """Records matching ``filters`` (by kind, then id; or most used first), and how many match in all.
        ``uses``: each record's usage count, ``(kind, id) -> n``, for the usage filters and sort."""
        f = filters or Filters()
        if f.needs_uses:
            rows, _ = await self.records(replace(f, min_uses=None, max_uses=None, sort="id"), today=today)
            count = (uses or {}).get
            rows = [r for r in rows if (f.min_uses is None or count((r.kind, r.id), 0) >= f.min_uses)
                    and (f.max_uses is None or count((r.kind, r.id), 0) <= f.max_uses)]
            if f.sort == "uses":
                rows.sort(key=lambda r: -count((r.kind, r.id), 0))  # stable: ties stay by kind, then id
            return rows[offset:None if limit is None else offset + limit], len(rows)
        where = []
        if f.kind:
            where.append(KnowledgeRecord.kind == f.kind)
        if f.topic:
            where.append(KnowledgeRecord.topic == f.topic)
        if f.region:
            where.append(KnowledgeRecord.region_code == f.region)
        if f.state:
            where.append(KnowledgeRecord.state == f.state)
        if f.entry:
            where.append(KnowledgeRecord.entry_id == f.entry)
        if f.ids:
            where.append(KnowledgeRecord.id.in_(f.ids))
        if f.text:
            where.append(KnowledgeRecord.search_text.contains(f.text.strip(), autoescape=True))
        if f.source_older_than_years is not None:
            cutoff = (today or dt.date.today()) - dt.timedelta(days=round(365.25 * f.source_older_than_years))
            where.append((KnowledgeRecord.source_date < cutoff) | KnowledgeRecord.source_date.is_(None))
        if f.expiring_within_days is not None:  # the expiry date is the last day a record holds
            last = (today or dt.date.today()) + dt.timedelta(days=f.expiring_within_days - 1)
            where.append(KnowledgeRecord.expiry_date.is_not(None) & (KnowledgeRecord.expiry_date <= last))
        query = select(KnowledgeRecord).where(*where).order_by(KnowledgeRecord.kind, KnowledgeRecord.id)
        async with self.store.sessions() as s:
            total = (await s.execute(select(func.count()).select_from(KnowledgeRecord).where(*where))).scalar_one()
            if limit is not None:
                query = query.limit(limit).offset(offset)
            rows = list((await s.execute(query)).scalars())
        return rows, total

    async def reminders(self, *, older_than_years: float = 5, expiring_within_days: int | None = None,
                        today: dt.date | None = None, sample: int = 50) -> dict:
        """What needs a look: records whose source is older than ``older_than_years`` (or undated), records
        that expired or expire within ``expiring_within_days`` (default ``expiry_warn_days``), records
        waiting for review, and served records still marked unverified (a "待核实" note)."""
        today = today or dt.date.today()
        days = self.expiry_warn_days if expiring_within_days is None else expiring_within_days
        old, _ = await self.records(Filters(source_older_than_years=older_than_years), today=today)
        expiring, _ = await self.records(Filters(expiring_within_days=days), today=today)
        expiring.sort(key=lambda r: (r.expiry_date, r.kind, r.id))
        waiting, _ = await self.records(Filters(state="in_review"))
        async with self.store.sessions() as s:
            served = (await s.execute(select(KnowledgeRecord.kind, KnowledgeRecord.id, KnowledgeRecord.published)
                                      .where(KnowledgeRecord.published.is_not(None)))).all()
        unverified = [(k, i) for k, i, d in served if d.get("review")]

        def listing(pairs):
            return {"count": len(pairs), "records": [{"kind": k, "id": i} for k, i in pairs[:sample]]}

        return {
            "older_than_years": older_than_years,
            "source_old": listing([(r.kind, r.id) for r in old if r.state != "retired"]),
            "expiring_within_days": days,
            "expiring": {**listing([(r.kind, r.id) for r in expiring if r.state != "retired"]),
                         "expired": sum(r.expiry_date < today for r in expiring if r.state != "retired")},
            "in_review": listing([(r.kind, r.id) for r in waiting]),
            "unverified": listing(unverified),
        }

    async def answered_before_change(self, kind: str, record_id: str, *, days: int = 30, limit: int = 500) -> dict:
        """The conversations of the ``days`` before this record's current document was published that were
        answered with it, i.e. with what it said before (for follow-up when a figure changed)."""
        from sqlalchemy import String as SqlString, cast

        from xiaozhi.hub.infra.store import Conversation, Message

        async with self.store.sessions() as s:
            moves = list((await s.execute(select(KnowledgeVersion).where(
                KnowledgeVersion.kind == kind, KnowledgeVersion.record_id == record_id,
                KnowledgeVersion.action.in_(("state", "import")), KnowledgeVersion.state == "published",
            ).order_by(KnowledgeVersion.version.desc()).limit(2))).scalars())
            if len(moves) < 2:  # published once (the import): no earlier answer differs
                return {"changed_at": None, "changes": [], "conversations": []}
            latest, earlier = moves
            since = aware(latest.at) - dt.timedelta(days=days)
            rows = (await s.execute(
                select(Message, Conversation).join(Conversation, Conversation.id == Message.conversation_id).where(
                    Message.role == "bot", Message.created_at >= since, Message.created_at < latest.at,
                    cast(Message.meta, SqlString).contains(record_id),
                ).order_by(Message.created_at.desc()).limit(limit * 4))).all()
        key = "point" if kind == "point" else "entry"
        found: dict[str, dict] = {}
        for message, conv in rows:
            meta = message.meta or {}
            cited = [a.get(key) for a in meta.get("answers") or [] if isinstance(a, dict)]
            cited += [c.get("point" if kind == "point" else "id") for c in meta.get("citations") or [] if isinstance(c, dict)]
            if record_id in cited and conv.id not in found and len(found) < limit:
                found[conv.id] = {"conversation": conv.id, "channel": conv.channel, "contact": conv.contact,
                                  "at": aware(message.created_at).isoformat(), "reply": message.text[:200]}
        return {"changed_at": aware(latest.at).isoformat(), "changes": diff(earlier.doc, latest.doc),
                "conversations": list(found.values())}

    async def served(self) -> tuple[list[dict], list[dict]]:
        """The published documents (entries, points): what a publication serves."""
        async with self.store.sessions() as s:
            rows = (await s.execute(select(KnowledgeRecord.kind, KnowledgeRecord.published)
                                    .where(KnowledgeRecord.published.is_not(None))
                                    .order_by(KnowledgeRecord.kind, KnowledgeRecord.id))).all()
        return [d for k, d in rows if k == "entry"], [d for k, d in rows if k == "point"]

    async def served_corpus(self, today: dt.date | None = None):
        """The corpus of the published records in force ``today`` (expired ones are left out), and the next
        expiry date among them (the day after it, what is served must be rebuilt; None: none expires)."""
        entries, points = await self.served()
        today = today or dt.date.today()
        corpus = corpus_from_records(entries, points, stale_after_years=self.stale_after_years, today=today)
        return corpus, next_expiry(entries, points, today)

    # -- publications -----------------------------------------------------------------------------
    async def generation(self) -> int | None:
        """The newest publication's id; None before anything was published from the database."""
        async with self.store.sessions() as s:
            return (await s.execute(select(func.max(KnowledgePublication.id)))).scalar_one()

    async def record_publication(self, user: StaffUser | str, corpus, note: str = "") -> KnowledgePublication:
        actor, _ = _actor(user)
        async with self.store.sessions() as s, s.begin():
            pub = KnowledgePublication(actor=actor, entries=len(corpus.entries), points=len(corpus.points),
                                       fingerprint=corpus.fingerprint, note=note)
            s.add(pub)
        return pub

    async def publications(self, limit: int = 20) -> list[KnowledgePublication]:
        async with self.store.sessions() as s:
            return list((await s.execute(select(KnowledgePublication).order_by(
                KnowledgePublication.id.desc()).limit(limit))).scalars())


def as_dict(row: KnowledgeRecord, uses: Mapping[tuple[str, str], int] | None = None) -> dict:
    """A record for the console; ``uses``: usage counts, then the record's own as ``uses``."""
    return {
        "kind": row.kind, "id": row.id, "entry": row.entry_id, "topic": row.topic, "region_code": row.region_code,
        "state": row.state, "state_label": STATE_LABELS.get(row.state, row.state), "version": row.version,
        "published_version": row.published_version, "source_date": row.source_date.isoformat() if row.source_date else None,
        "expiry_date": row.expiry_date.isoformat() if row.expiry_date else None,
        "updated_at": aware(row.updated_at).isoformat() if row.updated_at else None, "updated_by": row.updated_by,
        "doc": row.doc, "pending": row.published != row.doc,
        **({"uses": uses.get((row.kind, row.id), 0)} if uses is not None else {}),
    }


def version_dict(v: KnowledgeVersion) -> dict:
    return {"version": v.version, "action": v.action, "state": v.state, "state_label": STATE_LABELS.get(v.state, v.state),
            "diff": v.diff, "reason": v.reason, "actor": v.actor, "role": v.role,
            "at": aware(v.at).isoformat(), "doc": v.doc}


__all__ = ["KnowledgeStore", "Filters", "RecordInvalid", "RecordNotFound", "TransitionRefused", "STATES",
           "TRANSITIONS", "TOPICS", "diff", "as_dict", "version_dict"]
