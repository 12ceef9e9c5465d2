"""Knowledge points as a spreadsheet (issue 18): export, the template, an import all or nothing."""

from __future__ import annotations

import csv
import io

from tests.support import make_staff, staff_login

POINT = "cr-settlement-failed.hotline"


def _table(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode("utf-8-sig")


def _import(hub, auth, body: bytes, name="points.csv"):
    return hub.post("/api/staff/kb/import", params={"filename": name}, content=body,
                    headers={**auth, "content-type": "text/csv"})


def test_export_edit_and_import_makes_a_draft(hub):
    supervisor = make_staff(hub, "sheet_sup", "supervisor")
    exported = hub.get("/api/staff/kb/export.csv", params={"entry": "cr-settlement-failed"}, headers=supervisor)
    assert exported.status_code == 200, exported.text
    table = _table(exported.content)
    header, rows = table[0], table[1:]
    assert header[:3] == ["编号", "所属条目", "主题"] and rows and all(r[1] == "cr-settlement-failed" for r in rows)
    answer = header.index("书面回答")
    row = next(r for r in rows if r[0] == POINT)
    row[answer] = row[answer].replace("12393", "12345")

    done = _import(hub, supervisor, _csv([header, *rows]))
    assert done.status_code == 200, done.text
    assert done.json() == {"rows": len(rows), "created": 0, "changed": 1, "unchanged": len(rows) - 1}
    record = hub.get(f"/api/staff/kb/records/point/{POINT}", headers=supervisor).json()
    assert record["state"] == "draft" and "12345" in record["doc"]["answer"]
    assert record["history"][0]["action"] == "import" and record["history"][0]["actor"] == "sheet_sup"
    # the served (published) document is still the old one until it is reviewed and published
    assert record["pending"] is True


def test_a_malformed_sheet_is_refused_row_by_row_and_changes_nothing(hub):
    supervisor = make_staff(hub, "sheet_sup2", "supervisor")
    table = _table(hub.get("/api/staff/kb/export.csv", params={"entry": "cr-settlement-failed"}, headers=supervisor).content)
    header, good = table[0], table[1]
    col = {h: i for i, h in enumerate(header)}

    def variant(**changes):
        row = list(good)
        for name, value in changes.items():
            row[col[name]] = value
        return row

    before = hub.get("/api/staff/kb/records", params={"kind": "point", "limit": 1}, headers=supervisor).json()["total"]
    rows = [
        variant(编号="cr-x.no-source", 来源标题="", 来源网址=""),  # line 2
        variant(编号="cr-x.bad-date", 发文日期="2024年13月"),  # line 3
        variant(编号="cr-x.topic", 主题="天气预报"),  # line 4
        variant(编号="cr-x.dup"),  # line 5
        variant(编号="cr-x.dup"),  # line 6
        variant(编号="cr-x.root", 来源网址="https://www.nhsa.gov.cn/"),  # line 7
        variant(编号="cr-x.fine"),  # line 8: fine, but the file is refused as a whole
    ]
    refused = _import(hub, supervisor, _csv([header, *rows]))
    assert refused.status_code == 422, refused.text
    bad = {b["line"]: " ".join(b["reasons"]) for b in refused.json()["bad"]}
    assert set(bad) == {2, 3, 4, 6, 7}, bad
    assert "缺少来源" in bad[2] and "日期格式不对" in bad[3] and "未知主题" in bad[4]
    assert "编号重复（第5行" in bad[6] and "网站首页" in bad[7]
    after = hub.get("/api/staff/kb/records", params={"kind": "point", "limit": 1}, headers=supervisor).json()["total"]
    assert after == before
    assert hub.get("/api/staff/kb/records/point/cr-x.fine", headers=supervisor).status_code == 404


def test_ten_thousand_rows_are_checked_and_one_more_is_refused(hub):
    supervisor = make_staff(hub, "sheet_sup3", "supervisor")
    table = _table(hub.get("/api/staff/kb/export.csv", params={"entry": "cr-settlement-failed"}, headers=supervisor).content)
    header, good = table[0], table[1]
    rows = []
    for i in range(10_000):
        row = list(good)
        row[0] = f"cr-bulk.p{i:05d}"
        rows.append(row)
    rows[7_000][header.index("发文日期")] = "31/02/2024"
    refused = _import(hub, supervisor, _csv([header, *rows]))
    assert refused.status_code == 422, refused.text[:300]
    assert [(b["line"], b["id"]) for b in refused.json()["bad"]] == [(7_002, "cr-bulk.p07000")]
    assert hub.get("/api/staff/kb/records", params={"q": "cr-bulk"}, headers=supervisor).json()["total"] == 0

    rows[7_000] = list(rows[6_999])
    rows[7_000][0] = "cr-bulk.p07000"
    too_many = _import(hub, supervisor, _csv([header, *rows, [*good[:0], "cr-bulk.extra", *good[1:]]]))
    assert too_many.status_code == 422 and "最多导入10000行" in too_many.json()["message"]


def test_agents_cannot_import_and_the_template_has_the_columns(hub):
    agent = make_staff(hub, "sheet_agent", "agent")
    template = hub.get("/api/staff/kb/template.csv", headers=agent)
    assert template.status_code == 200
    header = _table(template.content)[0]
    assert {"编号", "所属条目", "主题", "问题", "书面回答", "语音回答", "来源网址", "发文日期", "地区代码"} <= set(header)
    assert _import(hub, agent, template.content).status_code == 403
    assert hub.get("/api/staff/kb/export.csv").status_code == 401
    admin = staff_login(hub)
    audit = hub.get("/api/staff/audit", headers=admin).json()
    assert not any(e["action"] == "kb.import" and e["actor"] == "sheet_agent" for e in audit)


def test_xlsx_export_and_import(hub):
    import openpyxl

    supervisor = make_staff(hub, "sheet_xlsx", "supervisor")
    exported = hub.get("/api/staff/kb/export.xlsx", params={"entry": "cr-settlement-failed"}, headers=supervisor)
    assert exported.status_code == 200 and exported.content[:2] == b"PK"
    book = openpyxl.load_workbook(io.BytesIO(exported.content))
    sheet = book.worksheets[0]
    header = [c.value for c in sheet[1]]
    assert header[0] == "编号"
    ids = [sheet.cell(row, 1).value for row in range(1, sheet.max_row + 1)]
    target, other = ids.index(POINT) + 1, next(i for i, v in enumerate(ids, 1) if i > 1 and v != POINT)
    answer, date = header.index("书面回答") + 1, header.index("发文日期") + 1
    sheet.cell(target, answer).value = sheet.cell(target, answer).value.replace("12393", "12366")
    kept, sheet.cell(other, date).value = sheet.cell(other, date).value, None

    def upload():
        out = io.BytesIO()
        book.save(out)
        return hub.post("/api/staff/kb/import", params={"filename": "points.xlsx"}, content=out.getvalue(),
                        headers=supervisor)

    refused = upload()  # the row without a date refuses the whole file, with its line
    assert refused.status_code == 422, refused.text
    assert [(b["line"], b["reasons"]) for b in refused.json()["bad"]] == [(other, ["缺少发文日期"])]
    assert "12393" in hub.get(f"/api/staff/kb/records/point/{POINT}", headers=supervisor).json()["doc"]["answer"]
    sheet.cell(other, date).value = kept
    done = upload()
    assert done.status_code == 200 and done.json()["changed"] == 1, done.text
    assert "12366" in hub.get(f"/api/staff/kb/records/point/{POINT}", headers=supervisor).json()["doc"]["answer"]
    template = hub.get("/api/staff/kb/template.xlsx", headers=supervisor)
    assert template.status_code == 200
    assert [c.value for c in openpyxl.load_workbook(io.BytesIO(template.content)).worksheets[0][1]] == header
