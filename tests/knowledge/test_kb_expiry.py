"""Expiry dates on the agency's knowledge (issue 18): the last day an answer holds.

- the schema takes an optional ``expiry_date``, refused before the entry takes effect (or before a point's
  source is dated); the console's check warns of an expired record;
- the console's reminders list records that expired or expire within N days, and the list filters on it,
  on SQLite and PostgreSQL;
- an expired published record is no longer served: left out at publication, and dropped by each replica
  the day after its expiry date without anyone publishing;
- the spreadsheet carries the column; a bad date is refused with its line and reason.
"""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from pydantic import ValidationError

from knowledge_base.schema import Entry, KnowledgePoint
from tests.support import make_staff, staff_login

DATABASES = ["sqlite", "postgresql"]
POINT = "cr-settlement-failed.hotline"
TODAY = dt.date.today()


def _record(hub, auth, kind, record_id) -> dict:
    r = hub.get(f"/api/staff/kb/records/{kind}/{record_id}", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def _save(hub, auth, doc, kind="point"):
    return hub.put(f"/api/staff/kb/records/{kind}/{doc['id']}", json={"doc": doc, "reason": "有效期"}, headers=auth)


def _publish(hub, admin, kind, record_id):
    moved = hub.post(f"/api/staff/kb/records/{kind}/{record_id}/state", json={"state": "published"}, headers=admin)
    assert moved.status_code == 200, moved.text


def test_the_schema_takes_an_expiry_date_not_before_it_takes_effect(hub):
    admin = staff_login(hub)
    entry = _record(hub, admin, "entry", "cr-settlement-failed")["doc"]
    point = _record(hub, admin, "point", POINT)["doc"]
    assert Entry.model_validate({**entry, "expiry_date": "2030-12-31"}).expiry_date == dt.date(2030, 12, 31)
    assert Entry.model_validate(entry).expiry_date is None
    with pytest.raises(ValidationError, match="before effective_date"):
        Entry.model_validate({**entry, "expiry_date": "2000-01-01"})
    with pytest.raises(ValidationError, match="before the source's date"):
        KnowledgePoint.model_validate({**point, "expiry_date": "2000-01-01"})
    with pytest.raises(ValidationError):
        KnowledgePoint.model_validate({**point, "expiry_date": "明年底"})

    # The console's check and save say the same; an expired date is a warning, not a refusal.
    refused = _save(hub, admin, {**point, "expiry_date": "2000-01-01"})
    assert refused.status_code == 422 and "before the source's date" in refused.json()["message"]
    yesterday = (TODAY - dt.timedelta(days=1)).isoformat()
    checked = hub.post("/api/staff/kb/check/point", json={"doc": {**point, "expiry_date": yesterday}}, headers=admin).json()
    assert checked["ok"] and any("expired" in p["message"] and p["severity"] == "warning" for p in checked["problems"])


@pytest.mark.parametrize("database_backend", DATABASES)
def test_reminders_and_the_list_show_expired_and_expiring_records(hub, database_backend):
    supervisor = make_staff(hub, "kb_expiry", "supervisor")
    before = hub.get("/api/staff/kb/reminders", headers=supervisor).json()
    assert before["expiring_within_days"] == 60 and before["expiring"]["count"] == 0  # the packs carry no expiry

    point = _record(hub, supervisor, "point", POINT)["doc"]
    entry = _record(hub, supervisor, "entry", "cr-settlement-failed")["doc"]
    other = _record(hub, supervisor, "point", "cr-settlement-failed.keep-papers")["doc"]
    expired = (TODAY - dt.timedelta(days=3)).isoformat()
    soon = (TODAY + dt.timedelta(days=30)).isoformat()
    later = (TODAY + dt.timedelta(days=200)).isoformat()
    for doc, kind in ((point | {"expiry_date": expired}, "point"), (entry | {"expiry_date": soon}, "entry"),
                      (other | {"expiry_date": later}, "point")):
        saved = _save(hub, supervisor, doc, kind)
        assert saved.status_code == 200, saved.text
        assert saved.json()["expiry_date"] == doc["expiry_date"]

    after = hub.get("/api/staff/kb/reminders", headers=supervisor).json()
    assert after["expiring"]["count"] == 2 and after["expiring"]["expired"] == 1
    assert after["expiring"]["records"] == [{"kind": "point", "id": POINT}, {"kind": "entry", "id": "cr-settlement-failed"}]
    wider = hub.get("/api/staff/kb/reminders", params={"expiring": 365}, headers=supervisor).json()
    assert wider["expiring"]["count"] == 3

    def listed(**params):
        r = hub.get("/api/staff/kb/records", params={"limit": 500, **params}, headers=supervisor)
        assert r.status_code == 200, r.text
        return [(x["kind"], x["id"]) for x in r.json()["records"]]

    assert listed(expiring=0) == [("point", POINT)]
    assert listed(expiring=60) == [("entry", "cr-settlement-failed"), ("point", POINT)]
    assert listed(expiring=60, kind="entry") == [("entry", "cr-settlement-failed")]
    assert set(listed(expiring=365)) == {("entry", "cr-settlement-failed"), ("point", POINT),
                                         ("point", "cr-settlement-failed.keep-papers")}
    assert hub.get("/api/staff/kb/records", params={"expiring": -1}, headers=supervisor).status_code == 422


def _served_ids(hub) -> set[str]:
    kb = hub.app.state.services.knowledge_base
    return {p.id for p in kb.corpus.points} | {e.id for e in kb.corpus.entries}


def test_an_expired_record_is_not_served_and_each_replica_drops_it_the_day_after(hub):
    admin = staff_login(hub)
    point = _record(hub, admin, "point", POINT)["doc"]
    other = _record(hub, admin, "point", "cr-settlement-failed.keep-papers")["doc"]
    yesterday, today = (TODAY - dt.timedelta(days=1)).isoformat(), TODAY.isoformat()
    assert _save(hub, admin, point | {"expiry_date": yesterday}).status_code == 200
    assert _save(hub, admin, other | {"expiry_date": today}).status_code == 200  # its last day: still served
    _publish(hub, admin, "point", POINT)
    _publish(hub, admin, "point", "cr-settlement-failed.keep-papers")
    published = hub.post("/api/staff/kb/publish", json={}, headers=admin)
    assert published.status_code == 200, published.text
    served = _served_ids(hub)
    assert POINT not in served and "cr-settlement-failed.keep-papers" in served and "cr-settlement-failed" in served

    # The next day nobody publishes, yet the replica rebuilds without the point that expired today.
    publisher = hub.app.state.services.publisher
    assert publisher.serves_until == TODAY
    assert hub.portal.call(publisher.catch_up) is False  # today it still holds
    publisher.today = lambda: TODAY + dt.timedelta(days=1)
    assert hub.portal.call(publisher.catch_up) is True
    assert "cr-settlement-failed.keep-papers" not in _served_ids(hub) and publisher.serves_until is None


def _table(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))


def _csv(rows) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode("utf-8-sig")


def test_the_spreadsheet_carries_the_expiry_date_and_refuses_a_bad_one(hub):
    supervisor = make_staff(hub, "sheet_expiry", "supervisor")
    table = _table(hub.get("/api/staff/kb/export.csv", params={"entry": "cr-settlement-failed"}, headers=supervisor).content)
    header, rows = table[0], table[1:]
    assert "有效期至" in header
    col = header.index("有效期至")
    template = _table(hub.get("/api/staff/kb/template.csv", headers=supervisor).content)
    assert "有效期至" in template[0]

    row = next(r for r in rows if r[0] == POINT)
    bad_format, before_source, good = list(row), list(row), list(row)
    bad_format[col], before_source[col], good[col] = "2030年底", "2001-01-01", "2030/12/31"
    refused = hub.post("/api/staff/kb/import", params={"filename": "p.csv"}, content=_csv([header, bad_format]),
                       headers={**supervisor, "content-type": "text/csv"})
    assert refused.status_code == 422
    assert refused.json()["bad"] == [{"line": 2, "id": POINT,
                                      "reasons": ["有效期至格式不对：“2030年底”，应为 YYYY-MM-DD"]}]
    refused = hub.post("/api/staff/kb/import", params={"filename": "p.csv"}, content=_csv([header, before_source]),
                       headers={**supervisor, "content-type": "text/csv"})
    assert refused.status_code == 422 and "早于发文日期" in refused.json()["bad"][0]["reasons"][0]
    assert "expiry_date" not in _record(hub, supervisor, "point", POINT)["doc"]  # nothing changed

    done = hub.post("/api/staff/kb/import", params={"filename": "p.csv"}, content=_csv([header, good]),
                    headers={**supervisor, "content-type": "text/csv"})
    assert done.status_code == 200, done.text
    assert _record(hub, supervisor, "point", POINT)["doc"]["expiry_date"] == "2030-12-31"
    again = _table(hub.get("/api/staff/kb/export.csv", params={"entry": "cr-settlement-failed"}, headers=supervisor).content)
    assert next(r for r in again[1:] if r[0] == POINT)[col] == "2030-12-31"

    # A sheet without the column (an older template) leaves the date alone; an empty cell in it clears it.
    without = [[c for i, c in enumerate(r) if i != col] for r in (header, good)]
    done = hub.post("/api/staff/kb/import", params={"filename": "p.csv"}, content=_csv(without),
                    headers={**supervisor, "content-type": "text/csv"})
    assert done.status_code == 200, done.text
    assert _record(hub, supervisor, "point", POINT)["doc"]["expiry_date"] == "2030-12-31"
    cleared = list(good)
    cleared[col] = ""
    done = hub.post("/api/staff/kb/import", params={"filename": "p.csv"}, content=_csv([header, cleared]),
                    headers={**supervisor, "content-type": "text/csv"})
    assert done.status_code == 200, done.text
    assert "expiry_date" not in _record(hub, supervisor, "point", POINT)["doc"]


def test_how_far_ahead_the_reminders_warn_is_a_setting(hub_settings, knowledge_base, tmp_path):
    """XIAOZHI_KB_EXPIRY_WARN_DAYS: a record expiring in 200 days is a reminder at 365 days, not at the 60 default."""
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    wider = hub_settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{tmp_path / 'warn.db'}",
                                            "kb_expiry_warn_days": 365})
    with TestClient(create_app(wider, knowledge_base=knowledge_base)) as hub:
        admin = staff_login(hub)
        point = _record(hub, admin, "point", POINT)["doc"]
        assert _save(hub, admin, point | {"expiry_date": (TODAY + dt.timedelta(days=200)).isoformat()}).status_code == 200
        reminders = hub.get("/api/staff/kb/reminders", headers=admin).json()
        assert reminders["expiring_within_days"] == 365
        assert reminders["expiring"]["records"] == [{"kind": "point", "id": POINT}]
        narrower = hub.get("/api/staff/kb/reminders", params={"expiring": 60}, headers=admin).json()
        assert narrower["expiring"]["count"] == 0  # the request's own number still wins
