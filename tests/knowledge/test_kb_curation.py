"""The agency keeps its own knowledge (issue 18): records in the database, versioned, reviewed, published.

- the store: the packs seed it; an edit is a new draft version with its diff and reason; only published
  documents are served; any version can be restored; on SQLite and PostgreSQL;
- publishing re-indexes without a restart: the chat API answers with the edited figure, and with the old
  one again after a restore and a second publication; another replica on the same database follows;
- who may do what: supervisors edit, admins publish, agents read, and every write is in the audit log.
"""

from __future__ import annotations

import asyncio
import copy
import time

import pytest
from fastapi.testclient import TestClient

from knowledge_base.records import pack_records
from tests.support import make_staff, open_session, staff_login
from xiaozhi.hub import migrations
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore, RecordInvalid, TransitionRefused
from xiaozhi.hub.infra.store import Store

DATABASES = ["sqlite", "postgresql"]
POINT = "cr-settlement-failed.hotline"  # 异地就医结算出了问题 -> 12393
QUESTION = "异地就医结算出了问题，打什么电话求助？"


@pytest.fixture(scope="module")
def packs(settings):
    entries, points, corpus = pack_records(settings.kb_data_dir)
    return entries, points


def _user(name: str, role: Role) -> StaffUser:
    return StaffUser(username=name, role=role.value, display_name=name, password_hash="-")


@pytest.mark.parametrize("database_backend", DATABASES)
def test_records_are_versioned_reviewed_and_restored(database_backend, database_url, tmp_path, packs):
    entries, points = packs
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'kb.db'}"
    supervisor, admin = _user("sup", Role.supervisor), _user("adm", Role.admin)

    async def scenario():
        store = Store(url)
        await migrations.prepare(store)
        records = KnowledgeStore(store)
        try:
            report = await records.import_packs(entries, points)
            assert report.created == len(entries) + len(points)
            point = await records.get("point", POINT)
            original = copy.deepcopy(point.doc)
            assert point.state == "published" and point.published == original and "12393" in original["answer"]

            # An edit is a draft: the published document still serves until an admin publishes it.
            edited = {**original, "answer": original["answer"].replace("12393", "12345"),
                      "spoken": original["spoken"].replace("12393", "12345")}
            row = await records.save(supervisor, "point", edited, reason="热线号码调整")
            assert (row.state, row.version) == ("draft", 2)
            served_entries, served_points = await records.served()
            assert next(p for p in served_points if p["id"] == POINT)["answer"] == original["answer"]
            history = await records.history("point", POINT)
            assert history[0].actor == "sup" and history[0].reason == "热线号码调整"
            assert {d["field"] for d in history[0].diff} == {"answer", "spoken"}
            assert any(d["before"] == original["answer"] and "12345" in d["after"] for d in history[0].diff)

            # The review flow: a supervisor sends it for review but cannot publish it; an admin can.
            with pytest.raises(TransitionRefused):
                await records.transition(supervisor, "point", POINT, "published")
            await records.transition(supervisor, "point", POINT, "in_review")
            with pytest.raises(TransitionRefused):
                await records.transition(supervisor, "point", POINT, "published")
            await records.transition(admin, "point", POINT, "published")
            _, served_points = await records.served()
            assert "12345" in next(p for p in served_points if p["id"] == POINT)["answer"]

            # Restoring version 1 (the import) is a new draft with its document (version 5, after the edit and
            # two moves between states); published again, it is served again.
            restored = await records.restore(admin, "point", POINT, 1, reason="号码未变，撤回")
            assert restored.doc == original and restored.version == 5 and restored.state == "draft"
            await records.transition(admin, "point", POINT, "published")
            _, served_points = await records.served()
            assert next(p for p in served_points if p["id"] == POINT)["answer"] == original["answer"]

            # Retired records are not served; a refused document changes nothing.
            await records.transition(admin, "point", POINT, "retired")
            _, served_points = await records.served()
            assert POINT not in {p["id"] for p in served_points}
            bad = {**original, "source": {**original["source"], "url": "https://www.nhsa.gov.cn/"}}
            with pytest.raises(RecordInvalid) as refused:
                await records.save(supervisor, "point", bad)
            assert "site root" in str(refused.value)
            assert (await records.get("point", POINT)).version == 7

            # Re-importing the packs leaves the record staff changed alone, and updates nothing else.
            again = await records.import_packs(entries, points)
            assert again.conflicts == [f"point:{POINT}"] and again.updated == 0
        finally:
            await store.close()

    asyncio.run(scenario())


def _chat(client, question: str) -> dict:
    session, auth = open_session(client)
    r = client.post(f"/api/sessions/{session}/messages", json={"text": question}, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


def _answer_text(reply: dict) -> str:
    return " ".join(m["text"] for m in reply["replies"])


def _edit(client, auth, doc, reason):
    r = client.put(f"/api/staff/kb/records/point/{doc['id']}", json={"doc": doc, "reason": reason}, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("database_backend", DATABASES)
def test_publish_serves_the_new_figure_and_a_restore_brings_the_old_back(hub, database_backend):
    """The chat API (degraded mode: the knowledge base answers directly) before and after two publications;
    the conversations answered with the old figure are found on SQLite and on PostgreSQL."""
    asked_before, resident = open_session(hub)
    before = hub.post(f"/api/sessions/{asked_before}/messages", json={"text": QUESTION}, headers=resident).json()
    assert "12393" in _answer_text(before), before
    supervisor = make_staff(hub, "kb_sup", "supervisor")
    agent = make_staff(hub, "kb_agent", "agent")
    admin = staff_login(hub)

    record = hub.get(f"/api/staff/kb/records/point/{POINT}", headers=agent).json()  # agents read
    doc = record["doc"]
    edited = {**doc, "answer": doc["answer"].replace("12393", "12345"), "spoken": doc["spoken"].replace("12393", "12345")}
    assert hub.put(f"/api/staff/kb/records/point/{POINT}", json={"doc": edited}, headers=agent).status_code == 403
    _edit(hub, supervisor, edited, "热线号码调整")
    sent = hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "in_review"}, headers=supervisor)
    assert sent.status_code == 200, sent.text
    refused = hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "published"}, headers=supervisor)
    assert refused.status_code == 403, refused.text
    assert hub.post("/api/staff/kb/publish", json={}, headers=supervisor).status_code == 403
    assert hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "published"},
                    headers=admin).status_code == 200
    assert "12393" in _answer_text(_chat(hub, QUESTION)), "served before the knowledge base was published"

    published = hub.post("/api/staff/kb/publish", json={"note": "热线"}, headers=admin)
    assert published.status_code == 200, published.text
    after = _chat(hub, QUESTION)
    assert "12345" in _answer_text(after) and "12393" not in _answer_text(after), after
    # Who was told the old figure in the 30 days before: the conversation that asked before the change.
    assert hub.get(f"/api/staff/kb/records/point/{POINT}/answered", headers=agent).status_code == 403
    told = hub.get(f"/api/staff/kb/records/point/{POINT}/answered", headers=supervisor).json()
    assert [c["conversation"] for c in told["conversations"]] == [asked_before], told
    assert "12393" in told["conversations"][0]["reply"]
    assert {c["field"] for c in told["changes"]} == {"answer", "spoken"}

    history = hub.get(f"/api/staff/kb/records/point/{POINT}", headers=agent).json()["history"]
    assert history[-1]["action"] == "import" and history[-1]["version"] == 1
    restored = hub.post(f"/api/staff/kb/records/point/{POINT}/restore", json={"version": 1, "reason": "撤回"},
                        headers=supervisor)
    assert restored.status_code == 200, restored.text
    assert hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "published"},
                    headers=admin).status_code == 200
    assert hub.post("/api/staff/kb/publish", json={}, headers=admin).status_code == 200
    assert "12393" in _answer_text(_chat(hub, QUESTION))

    actions = [(e["actor"], e["action"], e["target"]) for e in hub.get("/api/staff/audit", headers=admin).json()]
    for expected in [("kb_sup", "kb.edit", f"point:{POINT}"), ("kb_sup", "kb.state.in_review", f"point:{POINT}"),
                     ("admin", "kb.state.published", f"point:{POINT}"), ("kb_sup", "kb.restore", f"point:{POINT}"),
                     ("admin", "kb.publish", "1"), ("admin", "kb.publish", "2")]:
        assert expected in actions, expected


def test_another_replica_follows_a_publication(hub_settings, knowledge_base, tmp_path):
    """Two hubs on one database: what one publishes, the other serves within seconds, without a restart."""
    from xiaozhi.hub.app import create_app

    shared = hub_settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
                                             "kb_reload_interval_s": 0.5})
    other = shared.model_copy(update={"var_dir": tmp_path / "other"})
    with TestClient(create_app(shared, knowledge_base=knowledge_base)) as one, \
            TestClient(create_app(other, knowledge_base=knowledge_base)) as two:
        admin = staff_login(one)
        doc = one.get(f"/api/staff/kb/records/point/{POINT}", headers=admin).json()["doc"]
        edited = {**doc, "answer": doc["answer"].replace("12393", "12345"),
                  "spoken": doc["spoken"].replace("12393", "12345")}
        _edit(one, admin, edited, "热线号码调整")
        assert one.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "published"},
                        headers=admin).status_code == 200
        assert one.post("/api/staff/kb/publish", json={}, headers=admin).status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "12345" not in _answer_text(_chat(two, QUESTION)):
            time.sleep(0.5)
        assert "12345" in _answer_text(_chat(two, QUESTION)), "the other replica still serves the old figure"


def test_import_packs_from_the_command_line_seeds_then_finds_nothing_new(settings, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, XIAOZHI_VAR_DIR=str(tmp_path), XIAOZHI_KB_DATA_DIR=str(settings.kb_data_dir))
    command = [sys.executable, "-m", "xiaozhi", "kb", "import-packs"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    entries, points, _ = pack_records(settings.kb_data_dir)
    assert f"imported: {len(entries) + len(points)} new, 0 updated" in first.stderr + first.stdout
    again = subprocess.run([*command, "--publish"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    out = again.stderr + again.stdout
    assert f"imported: 0 new, 0 updated, {len(entries) + len(points)} unchanged" in out
    assert "published generation 1" in out


def test_reminders_list_old_sources_waiting_reviews_and_unverified_answers(hub):
    supervisor = make_staff(hub, "kb_reminder", "supervisor")
    first = hub.get("/api/staff/kb/reminders", params={"older_than": 5}, headers=supervisor).json()
    doc = hub.get(f"/api/staff/kb/records/point/{POINT}", headers=supervisor).json()["doc"]
    assert doc["source"]["date"] == "2022-06-30"  # within 5 years of today (2026), until it is edited below
    old = {**doc, "source": {**doc["source"], "date": "2010-01-01"}}
    _edit(hub, supervisor, old, "旧文件")
    assert hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "in_review"},
                    headers=supervisor).status_code == 200
    again = hub.get("/api/staff/kb/reminders", params={"older_than": 5}, headers=supervisor).json()
    assert again["source_old"]["count"] == first["source_old"]["count"] + 1
    assert again["in_review"] == {"count": 1, "records": [{"kind": "point", "id": POINT}]}
    assert again["unverified"]["count"] == first["unverified"]["count"] > 0
    listed = hub.get("/api/staff/kb/records", params={"older_than": 5, "q": POINT}, headers=supervisor).json()
    assert [r["id"] for r in listed["records"]] == [POINT]
