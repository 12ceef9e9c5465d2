"""Publishing: the published records become the knowledge base every replica serves, without a restart.

``publish`` records a publication (a new generation in ``kb_publications``) and rebuilds this replica's
knowledge base from the database; ``follow_forever`` lets every other replica see the new generation
within ``interval`` seconds and rebuild too. A rebuild runs in a worker thread and encodes only the texts
the running knowledge base has no vector for (``knowledge_base.embedded.known_vectors``): the old
knowledge base answers until the new one is swapped in (one reference assignment), so chat never waits.
With Elasticsearch the same build makes a new index and moves the alias (its existing reindex).

A record whose expiry date has passed is not served: each replica rebuilds by itself the day after the
earliest expiry date among what it serves (``catch_up``), as it does for a new generation.

A replica whose database has no publication serves the data files, as before this module existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Callable

from xiaozhi.hub.domain.accounts import StaffUser
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore

log = logging.getLogger(__name__)


class PublishFailed(RuntimeError):
    """The published records cannot be served (a corpus error); the running knowledge base stays."""


class KnowledgePublisher:
    """Builds and swaps this replica's knowledge base from the published records."""

    def __init__(self, records: KnowledgeStore, config, get_kb: Callable[[], object],
                 set_kb: Callable[[object], None]) -> None:
        self.records = records
        self.config = config  # knowledge_base.config.KnowledgeBaseConfig
        self._get_kb = get_kb
        self._set_kb = set_kb
        self.serving: int | None = None  # the generation this replica serves; None: the data files
        self.last_build_s: float | None = None
        self.serves_until: dt.date | None = None  # the earliest expiry date among what is served
        self.today: Callable[[], dt.date] = dt.date.today
        self._lock = asyncio.Lock()

    @property
    def serving_database(self) -> bool:
        return self.serving is not None

    async def publish(self, user: StaffUser | str, note: str = "") -> dict:
        """Make the published records what every replica serves; the publication and how long it took."""
        started = time.perf_counter()
        async with self._lock:  # two publications at once: the later one reads (and serves) the later records
            corpus, until = await self.records.served_corpus(self.today())
            if corpus.errors:
                listing = "；".join(str(p) for p in corpus.errors[:5])
                raise PublishFailed(f"{len(corpus.errors)}处错误：{listing}")
            kb = await asyncio.to_thread(self._build, corpus)
            pub = await self.records.record_publication(user, corpus, note)
            self._set_kb(kb)
            self.serving, self.serves_until = pub.id, until
        self.last_build_s = time.perf_counter() - started
        log.info("knowledge base published as generation %d: %d entries, %d points in %.1f s",
                 pub.id, len(corpus.entries), len(corpus.points), self.last_build_s)
        return {"generation": pub.id, "entries": len(corpus.entries), "points": len(corpus.points),
                "seconds": round(self.last_build_s, 2)}

    def _expired(self) -> bool:
        return self.serves_until is not None and self.today() > self.serves_until

    async def catch_up(self) -> bool:
        """Serve the newest generation if another replica published one since, or rebuild this one when a
        record it serves expired; True when it swapped."""
        generation = await self.records.generation()
        if generation is None or (generation == self.serving and not self._expired()):
            return False
        async with self._lock:
            if generation == self.serving and not self._expired():
                return False
            if generation == self.serving:
                log.info("a served knowledge record expired after %s: rebuilding generation %d without it",
                         self.serves_until, generation)
            corpus, until = await self.records.served_corpus(self.today())
            try:
                kb = await asyncio.to_thread(self._build, corpus)
            except Exception:
                log.exception("building generation %d failed; still serving %s", generation, self.serving or "the data files")
                self.serving, self.serves_until = generation, None  # not retried every few seconds
                return False
            self._set_kb(kb)
            self.serving, self.serves_until = generation, until
        log.info("knowledge base now serves generation %d (%d entries, %d points)", generation,
                 len(corpus.entries), len(corpus.points))
        return True

    async def follow_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.catch_up()
            except Exception:  # the database away for a moment: the next round tries again
                log.exception("checking for a new knowledge-base publication failed")

    def _build(self, corpus):
        from knowledge_base.embedded import known_vectors
        from knowledge_base.factory import open_knowledge_base

        old = self._get_kb()
        embedder = getattr(old, "embedder", None)
        reuse = {}
        units = getattr(getattr(old, "answerer", None), "units", None)
        if units is not None:  # the running knowledge base's own vectors, whatever cache it was built from
            reuse = dict(zip(units.layout.texts, units.vectors))
        elif old is not None and embedder is not None:
            reuse = known_vectors(old.corpus, embedder, self.config.index_dir)
        return open_knowledge_base(self.config, embedder=embedder, corpus=corpus, reuse=reuse,
                                   text=getattr(old, "text", None))
