"""The knowledge console's API: agents read, supervisors edit and send for review, admins publish.

Every write goes to the audit log (``Accounts.audit``). Residents and anonymous callers get nothing here:
the resident-facing knowledge base is ``routers/knowledge.py`` (published answers only).
The first request finds an empty installation seeded from the YAML packs.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from xiaozhi.hub.deps import AdminUser, AgentUser, ClientAddress, Services, SupervisorUser
from xiaozhi.hub.domain.knowledge_publish import PublishFailed
from xiaozhi.hub.domain.knowledge_store import (
    STATES, Filters, KnowledgeStore, RecordInvalid, RecordNotFound, TransitionRefused, as_dict, version_dict,
)
from xiaozhi.hub.infra.errors import ApiError, error_body

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/staff/kb", tags=["knowledge console"])
pages = APIRouter(tags=["knowledge console"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "knowledge.html"
Kind = Literal["entry", "point"]
PAGE_SIZE_MAX = 500
UPLOAD_PATHS = {"/api/staff/kb/import": 20_000_000}  # the security middleware's body limit for the sheet import

async def records_of(hub: Services) -> KnowledgeStore:
    """The knowledge records; an empty installation is seeded from the packs first (once)."""
    store = hub.knowledge
    if not store.seeded:
        if not await store.count():
            from knowledge_base.records import pack_records

            entries, points, _ = await asyncio.to_thread(pack_records, hub.settings.kb_data_dir)
            await store.import_packs(entries, points, only_if_empty=True)
        store.seeded = True
    return store


Records = Annotated[KnowledgeStore, Depends(records_of)]


def _invalid(exc: RecordInvalid) -> JSONResponse:
    problems = [{"field": None, "message": p.message, "severity": p.severity} for p in exc.problems]
    return JSONResponse(status_code=422, content=error_body(
        422, "invalid_record", "这条记录没有通过校验：" + "；".join(p["message"] for p in problems), problems=problems))


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "没有找到这条知识。")


class RecordIn(BaseModel):
    doc: dict = Field(description="The entry or knowledge point as in the YAML packs, with its region.")
    reason: str = Field("", max_length=500, description="Why: kept with the version.")


class StateIn(BaseModel):
    state: Literal["draft", "in_review", "published", "retired"]
    reason: str = Field("", max_length=500)


class RestoreIn(BaseModel):
    version: int = Field(ge=1)
    reason: str = Field("", max_length=500)


class PublishIn(BaseModel):
    note: str = Field("", max_length=500)


def filters(
    kind: Kind | None = None,
    topic: str | None = Query(None, max_length=32),
    region: str | None = Query(None, pattern=r"^\d{6}$"),
    state: Literal["draft", "in_review", "published", "retired"] | None = None,
    q: str | None = Query(None, max_length=100, description="Words in the title/question, answer or source."),
    older_than: float | None = Query(None, ge=0, le=100, description="Source dated more than this many years ago."),
    expiring: int | None = Query(None, ge=0, le=3650,
                                 description="Expired, or expiring within this many days (0: expired only)."),
    entry: str | None = Query(None, max_length=128),
    min_uses: int | None = Query(None, ge=0, description="Answered at least this many conversations in 30 days."),
    max_uses: int | None = Query(None, ge=0, description="At most this many (0: not used in 30 days)."),
    sort: Literal["id", "uses"] = Query("id", description="id, or uses: the most used first."),
) -> Filters:
    return Filters(kind=kind, topic=topic, region=region, state=state, text=q or None,
                   source_older_than_years=older_than, expiring_within_days=expiring, entry=entry,
                   min_uses=min_uses, max_uses=max_uses, sort=sort)


ListFilters = Annotated[Filters, Depends(filters)]


@router.get("/records")
async def list_records(user: AgentUser, hub: Services, records: Records, f: ListFilters,
                       limit: int = Query(50, ge=1, le=PAGE_SIZE_MAX), offset: int = Query(0, ge=0)) -> dict:
    """Records with how many conversations of the last 30 days each answered (``uses``, from analytics)."""
    from xiaozhi.hub.domain.analytics import USAGE_DAYS, usage_counts

    uses = await usage_counts(hub.store)
    rows, total = await records.records(f, limit=limit, offset=offset, uses=uses)
    return {"total": total, "records": [as_dict(r, uses) for r in rows], "states": list(STATES),
            "usage_days": USAGE_DAYS}


@router.get("/records/{kind}/{record_id}")
async def get_record(kind: Kind, record_id: str, user: AgentUser, records: Records) -> dict:
    try:
        row = await records.get(kind, record_id)
    except RecordNotFound:
        raise _not_found() from None
    problems = await records.check(kind, row.doc)
    return {**as_dict(row), "history": [version_dict(v) for v in await records.history(kind, record_id)],
            "problems": [{"message": p.message, "severity": p.severity} for p in problems]}


@router.get("/records/{kind}/{record_id}/answered")
async def answered_before_change(kind: Kind, record_id: str, user: SupervisorUser, hub: Services, records: Records,
                                 client: ClientAddress, days: int = Query(30, ge=1, le=365)) -> dict:
    """Conversations answered with this record's previous published document in the ``days`` before the
    current one was published: whom to follow up when a figure changed (contacts are stored masked)."""
    found = await records.answered_before_change(kind, record_id, days=days)
    await hub.accounts.audit(user, "kb.answered_read", f"{kind}:{record_id}", {"conversations": len(found["conversations"])},
                             client=client)
    return found


@router.post("/check/{kind}")
async def check_record(kind: Kind, body: RecordIn, user: SupervisorUser, records: Records) -> dict:
    """What `xiaozhi kb validate` says about this document, for the editor's inline validation."""
    problems = await records.check(kind, body.doc)
    return {"ok": not any(p.severity in ("error", "source") for p in problems),
            "problems": [{"message": p.message, "severity": p.severity} for p in problems]}


@router.post("/records/{kind}", status_code=201)
async def create_record(kind: Kind, body: RecordIn, user: SupervisorUser, hub: Services, records: Records,
                        client: ClientAddress):
    try:
        row = await records.save(user, kind, body.doc, reason=body.reason, create=True)
    except RecordInvalid as exc:
        return _invalid(exc)
    await hub.accounts.audit(user, "kb.create", f"{kind}:{row.id}", {"version": row.version, "reason": body.reason},
                             client=client)
    return as_dict(row)


@router.put("/records/{kind}/{record_id}")
async def update_record(kind: Kind, record_id: str, body: RecordIn, user: SupervisorUser, hub: Services,
                        records: Records, client: ClientAddress):
    if body.doc.get("id") != record_id:
        raise ApiError(422, "id_mismatch", "记录编号不能修改；要换编号请新建一条。")
    try:
        row = await records.save(user, kind, body.doc, reason=body.reason)
    except RecordNotFound:
        raise _not_found() from None
    except RecordInvalid as exc:
        return _invalid(exc)
    await hub.accounts.audit(user, "kb.edit", f"{kind}:{record_id}", {"version": row.version, "reason": body.reason},
                             client=client)
    return as_dict(row)


@router.post("/records/{kind}/{record_id}/state")
async def change_state(kind: Kind, record_id: str, body: StateIn, user: SupervisorUser, hub: Services,
                       records: Records, client: ClientAddress) -> dict:
    try:
        row = await records.transition(user, kind, record_id, body.state, reason=body.reason)
    except RecordNotFound:
        raise _not_found() from None
    except TransitionRefused as exc:
        raise ApiError(403 if "权限" in str(exc) else 409, "transition_refused", str(exc)) from None
    await hub.accounts.audit(user, f"kb.state.{body.state}", f"{kind}:{record_id}",
                             {"version": row.version, "reason": body.reason}, client=client)
    return as_dict(row)


@router.post("/records/{kind}/{record_id}/restore")
async def restore_record(kind: Kind, record_id: str, body: RestoreIn, user: SupervisorUser, hub: Services,
                         records: Records, client: ClientAddress):
    try:
        row = await records.restore(user, kind, record_id, body.version, reason=body.reason)
    except RecordNotFound:
        raise _not_found() from None
    except RecordInvalid as exc:
        return _invalid(exc)
    await hub.accounts.audit(user, "kb.restore", f"{kind}:{record_id}",
                             {"from_version": body.version, "version": row.version, "reason": body.reason}, client=client)
    return as_dict(row)


@router.post("/publish")
async def publish(body: PublishIn, user: AdminUser, hub: Services, records: Records, client: ClientAddress) -> dict:
    """Re-index the published records and serve them here now, on every other replica within seconds."""
    try:
        result = await hub.publisher.publish(user, body.note)
    except PublishFailed as exc:
        raise ApiError(409, "publish_failed", f"发布失败，线上仍是原来的版本：{exc}") from None
    await hub.accounts.audit(user, "kb.publish", str(result["generation"]), {**result, "note": body.note}, client=client)
    return result


@router.get("/reminders")
async def reminders(user: AgentUser, records: Records,
                    older_than: float = Query(5, ge=0, le=100, description="Source older than this many years."),
                    expiring: int | None = Query(None, ge=0, le=3650, description=(
                        "Expired or expiring within this many days (default XIAOZHI_KB_EXPIRY_WARN_DAYS)."))) -> dict:
    """What needs a look on the console: old sources, expired or expiring records, records waiting for
    review, unverified answers served."""
    return await records.reminders(older_than_years=older_than, expiring_within_days=expiring)


@router.get("/publications")
async def publications(user: AgentUser, hub: Services, records: Records) -> dict:
    pubs = await records.publications()
    return {"serving": hub.publisher.serving, "publications": [
        {"generation": p.id, "at": p.at.isoformat(), "actor": p.actor, "entries": p.entries, "points": p.points,
         "note": p.note} for p in pubs]}


@router.post("/import-packs")
async def import_packs(user: AdminUser, hub: Services, records: Records, client: ClientAddress,
                       force: bool = False) -> dict:
    """Bring the YAML packs' changes in (records staff changed since are left alone unless ``force``)."""
    from knowledge_base.records import pack_records

    entries, points, _ = await asyncio.to_thread(pack_records, hub.settings.kb_data_dir)
    report = await records.import_packs(entries, points, force=force)
    result = {"created": report.created, "updated": report.updated, "unchanged": report.unchanged,
              "conflicts": report.conflicts}
    await hub.accounts.audit(user, "kb.import_packs", "", {**result, "conflicts": len(report.conflicts), "force": force},
                             client=client)
    return result


@pages.get("/staff/knowledge", include_in_schema=False)
async def knowledge_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8")


# -- spreadsheets ---------------------------------------------------------------------------------
SHEET_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
SheetFormat = Literal["csv", "xlsx"]
SHEET_RESPONSES = {200: {"content": {"text/csv": {}, SHEET_TYPES["xlsx"]: {}},
                         "description": "A spreadsheet, one knowledge point a row (CSV in UTF-8 with BOM, or xlsx)."}}


def _sheet(rows: list[list[str]], fmt: str, name: str) -> Response:
    from xiaozhi.hub.domain import knowledge_sheets

    if fmt == "xlsx":
        try:
            body = knowledge_sheets.as_xlsx(rows)
        except ImportError:
            raise ApiError(501, "xlsx_unavailable", "这台服务器不能生成 xlsx 文件，请导出 CSV。") from None
    else:
        body = knowledge_sheets.as_csv(rows)
    return Response(body, media_type=SHEET_TYPES[fmt],
                    headers={"content-disposition": f'attachment; filename="{name}.{fmt}"'})


@router.get("/template.{fmt}", response_class=Response, responses=SHEET_RESPONSES)
async def template(fmt: SheetFormat, user: AgentUser) -> Response:
    """The import template: the columns, and one example row."""
    from xiaozhi.hub.domain import knowledge_sheets

    example = {"id": "my-entry.new-point", "entry": "my-entry", "question": "示例：问题怎么写？",
               "asks": ["另一种问法"], "answer": "示例：一到三句话的书面回答，先说结论。", "spoken": "示例：电话里读的简短回答。",
               "facts": [], "when": {}, "source": {"title": "来源文件标题", "url": "https://www.example.gov.cn/art/2024/1/1/art_1.html",
                                                    "publisher": "发文机关", "document": "某医保发〔2024〕1号", "date": "2024-01-01"},
               "review": None, "local_figure": False, "region": {"code": "100000", "name": "全国", "level": "national"}}
    return _sheet(knowledge_sheets.export_rows([example], {}), fmt, "knowledge-template")


@router.get("/export.{fmt}", response_class=Response, responses=SHEET_RESPONSES)
async def export(fmt: SheetFormat, user: AgentUser, hub: Services, records: Records, f: ListFilters,
                 client: ClientAddress) -> Response:
    """The knowledge points the list's filters select, one row each (working copies, as the console shows)."""
    from xiaozhi.hub.domain import knowledge_sheets

    from xiaozhi.hub.domain.analytics import usage_counts

    f.kind = "point"
    rows, _ = await records.records(f, uses=await usage_counts(hub.store) if f.needs_uses else None)
    entries = await records.entry_docs()
    topics = {i: d.get("topic", "") for i, d in entries.items()}
    table = knowledge_sheets.export_rows([r.doc for r in rows], topics)
    await hub.accounts.audit(user, "kb.export", fmt, {"rows": len(rows)}, client=client)
    return _sheet(table, fmt, "knowledge-points")


@router.post("/import")
async def import_sheet(request: Request, user: SupervisorUser, hub: Services, records: Records,
                       client: ClientAddress, filename: str = Query("", max_length=200),
                       reason: str = Query("表格导入", max_length=200)):
    """A CSV or xlsx of knowledge points: every row checked first; any bad row refuses the whole file
    (422 with each row's line and reasons) and changes nothing; else each changed row is a new draft."""
    from xiaozhi.hub.domain import knowledge_sheets

    data = await request.body()
    try:
        rows = await asyncio.to_thread(knowledge_sheets.read_rows, data, filename)
    except knowledge_sheets.SheetRefused as exc:
        raise ApiError(422, "sheet_refused", str(exc)) from None
    entries = await records.entry_docs()
    docs, bad = await asyncio.to_thread(_check_rows, rows, entries)
    if bad:
        log.info("knowledge sheet refused: %d of %d rows bad", len(bad), len(rows))
        await hub.accounts.audit(user, "kb.import_refused", filename, {"rows": len(rows), "bad": len(bad)}, client=client)
        return JSONResponse(status_code=422, content=error_body(
            422, "sheet_rows_refused", f"{len(rows)}行中有{len(bad)}行不符合要求，整个文件没有导入，请改正后重新导入。",
            rows=len(rows), bad=bad[:1000], bad_count=len(bad)))
    # A sheet without the 有效期至 column (an older template, an agency's own list) says nothing of expiry: the
    # points keep theirs. An empty cell in the column still means "no end".
    keep = ("expiry_date",) if all("expiry_date" not in cells for _, cells in rows) else ()
    try:
        created, changed = await records.save_many(user, "point", docs, reason=reason, keep=keep)
    except RecordInvalid as exc:  # e.g. a point's id taken by an entry
        return _invalid(exc)
    result = {"rows": len(rows), "created": created, "changed": changed, "unchanged": len(rows) - created - changed}
    await hub.accounts.audit(user, "kb.import", filename, {**result, "reason": reason}, client=client)
    return result


def _check_rows(rows, entries: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    from knowledge_base.records import check_record
    from xiaozhi.hub.domain.knowledge_sheets import row_problems

    docs, bad, seen = [], [], {}
    for line, cells in rows:
        doc, reasons = row_problems(cells, entries)
        record_id = cells.get("id", "")
        if record_id in seen:
            reasons.append(f"编号重复（第{seen[record_id]}行也是“{record_id}”）")
        elif record_id:
            seen[record_id] = line
        if record_id in entries:
            reasons.append("编号与一个条目的编号相同")
        if doc is not None and not reasons:
            problems = check_record("point", doc, entries.get(doc["entry"]))
            reasons += [p.message for p in problems if p.severity in ("error", "source")]
        if reasons:
            bad.append({"line": line, "id": record_id, "reasons": reasons})
        else:
            docs.append(doc)
    return docs, bad
