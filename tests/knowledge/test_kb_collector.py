"""A knowledge base and the garbage collector in a serving hub (issue 18; xiaozhi/hub/infra/collector.py).

Opening a new knowledge base allocates millions of objects; each publication's worst chat answer was a full
collection they set off, walking both bases (1.7-2.1 s at 10,000 points). The hub now opens a base with the
collector paused and freezes it; a replaced base is retired (its reference cycle broken), so reference
counting frees it although no collection ever walks it again.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import weakref

from fastapi.testclient import TestClient

from knowledge_base.factory import open_knowledge_base
from tests.support import staff_login
from tests.support.knowledge import small_corpus
from xiaozhi.hub import services as hub_services
from xiaozhi.hub.infra.collector import collector_paused

POINT = "cr-settlement-failed.hotline"


def test_objects_made_while_the_collector_is_paused_are_frozen_after():
    before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [[i] for i in range(5000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + len(made)


def test_a_build_that_fails_resumes_the_collector_and_freezes_nothing():
    before = gc.get_freeze_count()
    made: list = []
    try:
        with collector_paused():
            made.extend([i] for i in range(5000))  # still held when the block ends
            raise RuntimeError("the corpus had an error")
    except RuntimeError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() < before + len(made)


def test_the_collector_resumes_only_when_the_last_of_two_overlapping_pauses_ends():
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with collector_paused():
        pass
    assert not gc.isenabled(), "the other thread's build is still under way"
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_retired_knowledge_base_is_freed_although_frozen(settings, knowledge_base, tmp_path):
    config = dataclasses.replace(settings.knowledge_base_config(), index_dir=tmp_path / "index")  # not the shared cache
    with collector_paused():  # as the hub opens one: frozen after
        kb = open_knowledge_base(config, corpus=small_corpus(tmp_path), embedder=knowledge_base.embedder,
                                 text=knowledge_base.text)
    answerer, backend = weakref.ref(kb.answerer), weakref.ref(kb.backend)
    base = weakref.ref(kb)
    assert kb.answerer.answer("医保电子凭证怎么激活").outcome == "answered"
    kb.retire()
    assert kb.search("医保电子凭证怎么激活").hits, "whoever still holds a retired base can search it"
    del kb
    # No collection walks frozen objects: only reference counting can have freed these.
    assert base() is None and answerer() is None and backend() is None


def test_the_hub_retires_the_base_a_publication_replaced(hub_settings, knowledge_base, monkeypatch):
    monkeypatch.setattr(hub_services, "RETIRE_AFTER_S", 0.2)
    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings, knowledge_base=knowledge_base)
    with TestClient(app) as hub:
        admin = staff_login(hub)
        served = []
        for old, new in (("12393", "12345"), ("12345", "12346")):
            doc = hub.get(f"/api/staff/kb/records/point/{POINT}", headers=admin).json()["doc"]
            edited = {**doc, "answer": doc["answer"].replace(old, new), "spoken": doc["spoken"].replace(old, new)}
            saved = hub.put(f"/api/staff/kb/records/point/{POINT}", json={"doc": edited, "reason": "热线"}, headers=admin)
            assert saved.status_code == 200, saved.text
            assert hub.post(f"/api/staff/kb/records/point/{POINT}/state", json={"state": "published"},
                            headers=admin).status_code == 200
            assert hub.post("/api/staff/kb/publish", json={}, headers=admin).status_code == 200
            served.append(weakref.ref(app.state.knowledge_base))
        deadline = time.monotonic() + 10
        while served[0]() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served[0]() is None, "the base the second publication replaced is freed"
        assert served[1]() is app.state.knowledge_base and app.state.knowledge_base.answerer is not None
    # The base the hub was given (the test session's) is never retired: its owner keeps using it.
    assert knowledge_base.answerer is not None
