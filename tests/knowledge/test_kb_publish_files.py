"""A knowledge base built in the worker comes back as files (issue 18): the serving process maps the vectors
and opens the tantivy index the worker wrote, instead of unpickling 345 MB and re-adding every document
while holding the GIL chat needs. Each build has its own directory; only the served one is kept. A build
whose files are missing or cut short is refused with a logged error, and the served base stays."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from knowledge_base import build_worker
from knowledge_base.embedded import LEXICAL_DIR, VECTORS_FILE
from tests.support.knowledge import seeded_records
from xiaozhi.hub.domain.accounts import Role, StaffUser
from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher, PublishFailed
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore

POINT = "cr-settlement-failed.hotline"
QUESTION = "异地就医结算出了问题，打什么电话求助？"
ADMIN = StaffUser(username="files-admin", role=Role.admin.value, display_name="admin", password_hash="-")

pytestmark = pytest.mark.slow  # a worker starts, loads the model and cuts the packs' texts


async def _published(settings, tmp_path, holder):
    """The packs in a database with a first publication, and a publisher that builds them in its worker."""
    store, records, served = await seeded_records(settings.kb_data_dir, tmp_path / "kb.db", ADMIN)
    config = dataclasses.replace(settings.knowledge_base_config(), index_dir=tmp_path / "index")
    # The packs' base is small; here it counts as large, so it is built in the worker as 10,000 points are.
    publisher = KnowledgePublisher(records, config, lambda: holder["kb"], lambda kb: holder.__setitem__("kb", kb),
                                   process_from=served)
    return store, records, publisher


async def _publish_figure(records: KnowledgeStore, publisher: KnowledgePublisher, old: str, new: str) -> dict:
    row = await records.get("point", POINT)
    await records.save(ADMIN, "point", {**row.doc, "answer": row.doc["answer"].replace(old, new)}, reason="热线调整")
    await records.transition(ADMIN, "point", POINT, "published")
    return await publisher.publish(ADMIN, f"热线 {new}")


def _builds(publisher: KnowledgePublisher) -> list[Path]:
    return sorted(publisher.builds_dir.iterdir()) if publisher.builds_dir.is_dir() else []


def test_a_publication_built_in_the_worker_is_served_from_its_files(settings, knowledge_base, tmp_path):
    holder = {"kb": knowledge_base}

    async def scenario():
        store, records, publisher = await _published(settings, tmp_path, holder)
        # What another hub left: one that is gone (no such process) and one still running (this one's parent).
        gone, running = (publisher.builds_dir.parent / f"hub-{pid}" / "build-1" for pid in (2 ** 22 + 1, os.getppid()))
        gone.mkdir(parents=True)
        running.mkdir(parents=True)
        try:
            await _publish_figure(records, publisher, "12393", "12345")
            assert not gone.parent.exists() and running.exists(), "a gone hub's builds are removed, a running one's kept"
            first = holder["kb"]
            saved = Path(first.backend._saved)
            assert _builds(publisher) == [saved] and saved.parent == publisher.builds_dir
            # The vectors are the file the worker wrote, mapped (not a copy sent through the pipe), and are
            # the answer stage's too; the BM25 index is the worker's on-disk tantivy index, opened.
            assert isinstance(first.backend._vectors, np.memmap)
            assert Path(first.backend._vectors.filename) == saved / VECTORS_FILE
            assert first.answerer.units.vectors is first.backend._vectors
            assert any((saved / LEXICAL_DIR).iterdir())
            assert first.embedder is knowledge_base.embedder and first.text is knowledge_base.text
            assert first.answerer.classifier is knowledge_base.answerer.classifier
            assert first.build_info["pid"] != build_worker.os.getpid()
            assert "12345" in first.answerer.answer(QUESTION).text
            assert [h.entry.id for h in first.search(QUESTION).hits][:1] == ["cr-settlement-failed"]
            # With a worker to feed, numpy's BLAS keeps to one thread here: its second thread spun on the
            # core the worker needs after every product chat made.
            blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
            assert blas and all(lib["num_threads"] == 1 for lib in blas), blas

            await _publish_figure(records, publisher, "12345", "12346")
            second = holder["kb"]
            assert second is not first and "12346" in second.answerer.answer(QUESTION).text
            # The old generation's files are gone, the served one's kept.
            assert _builds(publisher) == [Path(second.backend._saved)] and not saved.exists()
            # A search that started on the old knowledge base finishes on it: its files stay open.
            assert "12345" in first.answerer.answer(QUESTION).text
            assert [h.entry.id for h in first.search(QUESTION).hits][:1] == ["cr-settlement-failed"]
        finally:
            await publisher.close()
            await store.close()
        assert not publisher.builds_dir.exists(), "a hub that stops leaves no build behind"

    asyncio.run(scenario())


def _truncate_vectors(out: Path) -> None:
    data = (out / VECTORS_FILE).read_bytes()
    (out / VECTORS_FILE).write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short


def _remove_a_lexical_file(out: Path) -> None:
    biggest = max((p for p in (out / LEXICAL_DIR).iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.unlink()


def test_a_build_whose_files_are_missing_or_cut_short_is_refused_and_the_served_base_stays(
        settings, knowledge_base, tmp_path, monkeypatch, caplog):
    holder = {"kb": knowledge_base}
    load = build_worker.load
    damage: list = []

    def damaged_then_loaded(built: dict, **kwargs):
        """The real load, of the real files the worker wrote, after one of them was damaged."""
        if damage:
            damage.pop()(Path(built["path"]))
        return load(built, **kwargs)

    monkeypatch.setattr(build_worker, "load", damaged_then_loaded)

    async def scenario():
        store, records, publisher = await _published(settings, tmp_path, holder)
        try:
            await _publish_figure(records, publisher, "12393", "12345")
            served, generation = holder["kb"], publisher.serving
            for hurt, what in [(_truncate_vectors, VECTORS_FILE), (_remove_a_lexical_file, LEXICAL_DIR)]:
                damage.append(hurt)
                caplog.clear()
                with caplog.at_level(logging.ERROR, logger="knowledge_base.build_worker"):
                    with pytest.raises(PublishFailed, match="索引文件缺失或不完整"):
                        if hurt is _truncate_vectors:
                            await _publish_figure(records, publisher, "12345", "12346")
                        else:  # the same records published again
                            await publisher.publish(ADMIN, "再发布")
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert any("cannot be served" in e and what in e for e in errors), errors
                # Nothing changed for residents: the same knowledge base, generation and files.
                assert holder["kb"] is served and publisher.serving == generation
                assert await records.generation() == generation
                assert "12345" in holder["kb"].answerer.answer(QUESTION).text
                assert _builds(publisher) == [Path(served.backend._saved)], "the damaged build is removed"
                # The figure stays published in the records: the next publication serves it.
                row = await records.get("point", POINT)
                assert "12346" in row.doc["answer"]
            result = await publisher.publish(ADMIN, "再发布")
            assert result["generation"] > generation
            assert "12346" in holder["kb"].answerer.answer(QUESTION).text
            assert _builds(publisher) == [Path(holder["kb"].backend._saved)]
        finally:
            await publisher.close()
            await store.close()

    asyncio.run(scenario())
