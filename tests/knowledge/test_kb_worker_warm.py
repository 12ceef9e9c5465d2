"""The knowledge-base build worker is started before the first publication needs it (issue 18): a replica
that serves a base built in the worker warms a new worker in the background, at the lowest priority, after
a start built the base in a thread; one that died is replaced the same way, and a publication that finds it
dead builds in a new one rather than failing; a small base starts none."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest
from fastapi.testclient import TestClient

from tests.support import staff_login
from tests.support.knowledge import seeded_records
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore

POINT = "cr-settlement-failed.hotline"
QUESTION = "异地就医结算出了问题，打什么电话求助？"
ADMIN = StaffUser(username="warm-admin", role=Role.admin.value, display_name="admin", password_hash="-")

pytestmark = pytest.mark.slow  # two workers start, each loads the model and cuts the packs' texts


async def _publish_figure(records: KnowledgeStore, publisher: KnowledgePublisher, old: str, new: str) -> None:
    row = await records.get("point", POINT)
    await records.save(ADMIN, "point", {**row.doc, "answer": row.doc["answer"].replace(old, new)}, reason="热线调整")
    await records.transition(ADMIN, "point", POINT, "published")
    await publisher.publish(ADMIN, f"热线 {new}")


def test_the_worker_is_warm_before_the_first_publication_and_replaced_when_it_dies(settings, knowledge_base,
                                                                                   tmp_path):
    config = dataclasses.replace(settings.knowledge_base_config(), index_dir=tmp_path / "index")
    holder = {"kb": knowledge_base}

    async def scenario():
        store, records, served = await seeded_records(settings.kb_data_dir, tmp_path / "kb.db", ADMIN)
        # The packs' base is small; here it counts as large, so it is built in the worker as 10,000 points are.
        publisher = KnowledgePublisher(records, config, lambda: holder["kb"], lambda kb: holder.__setitem__("kb", kb),
                                       process_from=served)
        try:
            # A hub's start: built here in a thread (no worker to wait for), the worker started afterwards.
            assert await publisher.catch_up(starting=True)
            assert holder["kb"] is not knowledge_base and not hasattr(holder["kb"], "build_info")
            warming = publisher._warming
            assert warming is not None and not warming.done(), "the start did not wait for the worker"
            first = await publisher.warmed()
            assert first is not None and "error" not in first
            assert first["cut"] >= first["texts"] > 1000, first  # every text cut once, before any publication
            assert first["encoded"] == 0, first  # seeded with the served vectors: the model encodes nothing
            assert first["niceness"] == 19, first  # the warm-up ran at the lowest priority
            assert os.getpriority(os.PRIO_PROCESS, first["pid"]) >= 10  # the worker's own thread: builds at nice 10
            assert publisher.keep_warm() is None, "a live worker is not started again"

            # The first publication finds the worker warm: one changed text cut and encoded, not every one.
            await _publish_figure(records, publisher, "12393", "12345")
            built = holder["kb"].build_info
            assert built["pid"] == first["pid"], built
            assert built["cut"] <= 3 and built["encoded"] <= 2, built
            assert "12345" in holder["kb"].answerer.answer(QUESTION).text

            # The worker dies while idle: the next check (the reload watcher's, every few seconds) replaces it.
            os.kill(first["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 20
            while (task := publisher.keep_warm()) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert task is not None, "the dead worker was not noticed"
            second = await publisher.warmed()
            assert second["pid"] != first["pid"] and second["cut"] >= second["texts"], second
            assert second["encoded"] == 0 and second["niceness"] == 19, second
            await _publish_figure(records, publisher, "12345", "12346")
            built = holder["kb"].build_info
            assert built["pid"] == second["pid"] and built["cut"] <= 3 and built["encoded"] <= 2, built
            assert "12346" in holder["kb"].answerer.answer(QUESTION).text

            # It dies again and a publication comes before any check: built in a new worker, not refused.
            os.kill(second["pid"], signal.SIGKILL)
            await asyncio.sleep(0.5)
            await _publish_figure(records, publisher, "12346", "12347")
            built = holder["kb"].build_info
            assert built["pid"] not in (first["pid"], second["pid"]), built
            assert "12347" in holder["kb"].answerer.answer(QUESTION).text
        finally:
            await publisher.close()
            await store.close()
        assert publisher._pool is None and publisher._warming is None

    asyncio.run(scenario())


def test_a_hub_on_a_small_published_base_starts_no_worker(hub_settings, knowledge_base, tmp_path):
    """The packs' 958 records build in a thread: neither a publication nor a hub's start on it starts a worker."""
    from xiaozhi.hub.app import create_app

    shared = hub_settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"})
    with TestClient(create_app(shared, knowledge_base=knowledge_base)) as one:
        assert one.post("/api/staff/kb/publish", json={}, headers=staff_login(one)).status_code == 200
        publisher = one.app.state.services.publisher
        assert publisher.serving_database and publisher.served_records > 900
        assert publisher._pool is None and publisher._warming is None
    with TestClient(create_app(shared, knowledge_base=knowledge_base)) as again:
        publisher = again.app.state.services.publisher
        assert publisher.serving_database and publisher.served_records > 900
        assert again.app.state.knowledge_base is not knowledge_base, "the start serves the published records"
        assert publisher.keep_warm() is None
        assert publisher._pool is None and publisher._warming is None
