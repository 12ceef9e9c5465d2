"""Publishing builds the knowledge base in a worker process (issue 18), so chat keeps the serving
process's GIL: what comes back answers exactly as a knowledge base built in this process does, with this
process's own model and text processor attached, and the worker is kept for the next publication."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os

from knowledge_base import build_worker
from knowledge_base.answers import Context
from knowledge_base.records import pack_records
from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
from xiaozhi.hub.infra.store import Store

POINT = "cr-settlement-failed.hotline"
QUESTIONS = ["异地就医结算出了问题，打什么电话求助？", "医保电子凭证怎么激活", "住院报销需要什么材料", "异地就医怎么备案",
             "门诊慢特病怎么申请", "生孩子医保能报多少", "医保卡丢了怎么办", "居民医保断了再交要等多久", "今天天气怎么样"]


def _answers(kb) -> list[tuple]:
    out = []
    for q in QUESTIONS:
        reply = kb.answerer.answer(q, Context())
        found = kb.search(q)
        out.append((reply.text, [(h.entry.id, round(h.score, 6)) for h in found.hits], round(found.confidence, 6)))
    return out


def test_a_knowledge_base_built_in_the_worker_answers_as_one_built_here(settings, knowledge_base, tmp_path):
    entries, points, _ = pack_records(settings.kb_data_dir)
    points = [{**p, "answer": p["answer"].replace("12393", "12345")} if p["id"] == POINT else p for p in points]
    config = dataclasses.replace(settings.knowledge_base_config(), index_dir=tmp_path / "index")
    holder = {"kb": knowledge_base}
    records = KnowledgeStore(Store(f"sqlite+aiosqlite:///{tmp_path / 'kb.db'}"))
    publisher = KnowledgePublisher(records, config, lambda: holder["kb"], lambda kb: holder.__setitem__("kb", kb),
                                   process_from=len(points))  # the packs' base is small: a thread builds it in the hub
    assert publisher.builds_in_process(len(entries) + len(points))
    assert not KnowledgePublisher(records, config, dict, dict).builds_in_process(len(entries) + len(points))
    today = dt.date.today()

    async def scenario():
        try:
            there = await publisher._build(entries, points, today)
            worker = set(publisher._pool._processes)
            (pid,) = worker
            assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 1  # niced
            again = await publisher._build(entries, points, today)  # the same worker, its own vectors now
            assert set(publisher._pool._processes) == worker and len(worker) == 1
            return there, again
        finally:
            await publisher.close()
            await records.store.close()

    there, again = asyncio.run(scenario())
    assert not build_worker._state, "built in this process, not in the worker"
    assert publisher._pool is None
    here = publisher._build_here(entries, points, today)
    assert there.embedder is knowledge_base.embedder and there.text is knowledge_base.text
    assert there.backend.text is knowledge_base.text and there.answerer.units.text is knowledge_base.text
    assert there.answerer.classifier is knowledge_base.answerer.classifier
    assert len(there.corpus.points) == len(points) and there.corpus.fingerprint == here.corpus.fingerprint
    expected = _answers(here)
    assert "12345" in expected[0][0]
    assert _answers(there) == expected
    assert _answers(again) == expected
