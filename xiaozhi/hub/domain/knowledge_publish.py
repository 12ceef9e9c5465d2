"""Publishing: the published records become the knowledge base every replica serves, without a restart.

``publish`` records a publication (a new generation in ``kb_publications``) and rebuilds this replica's
knowledge base from the database; ``follow_forever`` lets every other replica see the new generation
within ``interval`` seconds and rebuild too. A rebuild encodes only the texts the running knowledge base
has no vector for: the old knowledge base answers until the new one is swapped in (one reference
assignment), so chat never waits for it.

The embedded backend of a large base (``PROCESS_FROM`` records or more) is built in a worker process
(knowledge_base/build_worker.py: a spawned ``ProcessPoolExecutor`` of one, kept for the next
publication): validating 10,000 records and cutting 95,000 texts is seconds of pure Python, which in a
thread of this process would hold the GIL the chat's answers need. A smaller base builds in a thread. The worker keeps its own model and memo; this process attaches its own model and text
processor to what comes back. With Elasticsearch the build runs in a thread as before: it makes a new
index on the server and moves the alias (the backend's existing reindex).

The worker is started before a publication needs it (``keep_warm``): as soon as this replica serves a base
built there, and again when the worker died, a background warm-up starts a new worker at the lowest
priority and builds what is served once, so its model is loaded and every text cut and encoded when the
first publication comes (a cold worker took 48-139 s for 10,000 points; a warm one 15 s). A hub's start
builds the published base in a thread (``catch_up(starting=True)``: no chat is served yet, and waiting for
a new worker would delay the start) and warms the worker afterwards.

A record whose expiry date has passed is not served: each replica rebuilds by itself the day after the
earliest expiry date among what it serves (``catch_up``), as it does for a new generation.

A replica whose database has no publication serves the data files, as before this module existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial, wraps
from pathlib import Path
from typing import Callable

from knowledge_base.build_worker import BuildResultError
from knowledge_base.loader import CorpusError
from knowledge_base.records import next_expiry
from xiaozhi.hub.domain.accounts import StaffUser
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore
from xiaozhi.hub.infra.collector import collector_paused
from xiaozhi.hub.infra.cpu import one_blas_thread

log = logging.getLogger(__name__)


# From how many published records a build goes to the worker process. Below it a build in a thread takes
# a second or two of the GIL, less than a new worker takes to load its model and cut every text once (the
# packs' 958 records: ~1.5 s in a thread, over 10 s in a new worker, against the console's 10 s promise).
PROCESS_FROM = 3000
WARM_RETRY_S = 600.0  # a warm-up that failed (the worker died during it) is tried again after this long
BUILDS_DIR = "published"  # under the knowledge base's index directory: one directory per hub process


class PublishFailed(RuntimeError):
    """The published records cannot be served (a corpus error); the running knowledge base stays."""


class KnowledgePublisher:
    """Builds and swaps this replica's knowledge base from the published records."""

    def __init__(self, records: KnowledgeStore, config, get_kb: Callable[[], object],
                 set_kb: Callable[[object], None], *, process_from: int | None = PROCESS_FROM) -> None:
        self.records = records
        self.config = config  # knowledge_base.config.KnowledgeBaseConfig
        self._get_kb = get_kb
        self._set_kb = set_kb
        self.serving: int | None = None  # the generation this replica serves; None: the data files
        self.last_build_s: float | None = None
        self.serves_until: dt.date | None = None  # the earliest expiry date among what is served
        self.today: Callable[[], dt.date] = dt.date.today
        # The embedded backend of ``process_from`` records or more is built in a worker process (None:
        # never; a smaller one, and Elasticsearch's, in a thread).
        self.process_from = process_from if getattr(config, "backend", "embedded") == "embedded" else None
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self.served_records: int | None = None  # how many records the served generation has
        self._warming: asyncio.Task | None = None
        self._warm_failed_at: float | None = None
        self.last_warm_up: dict | None = None  # what the last warm-up cost the worker (pid, texts, seconds)
        # Where the worker writes what it built, one directory per build; only the served one is kept.
        self.builds_dir = self.config.index_dir / BUILDS_DIR / f"hub-{os.getpid()}"
        self._builds = 0

    @property
    def serving_database(self) -> bool:
        return self.serving is not None

    async def publish(self, user: StaffUser | str, note: str = "") -> dict:
        """Make the published records what every replica serves; the publication and how long it took."""
        started = time.perf_counter()
        async with self._lock:  # two publications at once: the later one reads (and serves) the later records
            entries, points = await self.records.served()
            today = self.today()
            try:
                kb = await self._build(entries, points, today)
            except BaseException as exc:
                self._remove_builds()  # what a failed build wrote
                if isinstance(exc, CorpusError):
                    raise PublishFailed(str(exc).replace("\n", " ")) from None
                if isinstance(exc, BuildResultError):  # logged with the file and what is wrong with it
                    raise PublishFailed("新版本的索引文件缺失或不完整，请稍后重新发布") from None
                raise
            corpus = kb.corpus
            pub = await self.records.record_publication(user, corpus, note)
            self._set_kb(kb)
            self._remove_builds()  # the previous generation's files: searches under way keep theirs open
            self.serving, self.serves_until = pub.id, next_expiry(entries, points, today)
            self.served_records = len(entries) + len(points)
        self.last_build_s = time.perf_counter() - started
        self.keep_warm()
        log.info("knowledge base published as generation %d: %d entries, %d points in %.1f s",
                 pub.id, len(corpus.entries), len(corpus.points), self.last_build_s)
        return {"generation": pub.id, "entries": len(corpus.entries), "points": len(corpus.points),
                "seconds": round(self.last_build_s, 2)}

    def _expired(self) -> bool:
        return self.serves_until is not None and self.today() > self.serves_until

    async def catch_up(self, *, starting: bool = False) -> bool:
        """Serve the newest generation if another replica published one since, or rebuild this one when a
        record it serves expired; True when it swapped. ``starting``: a hub's start, nothing served yet, so
        the base is built in a thread at full speed rather than in a worker that must start first; the
        worker is warmed afterwards. Each call also restarts a worker that died (``keep_warm``)."""
        self.keep_warm()
        generation = await self.records.generation()
        if generation is None or (generation == self.serving and not self._expired()):
            return False
        async with self._lock:
            if generation == self.serving and not self._expired():
                return False
            if generation == self.serving:
                log.info("a served knowledge record expired after %s: rebuilding generation %d without it",
                         self.serves_until, generation)
            entries, points = await self.records.served()
            today = self.today()
            try:
                kb = await self._build(entries, points, today, here=starting)
            except Exception:
                log.exception("building generation %d failed; still serving %s", generation, self.serving or "the data files")
                self.serving, self.serves_until = generation, None  # not retried every few seconds
                self._remove_builds()
                return False
            self._set_kb(kb)
            self._remove_builds()
            self.serving, self.serves_until = generation, next_expiry(entries, points, today)
            self.served_records = len(entries) + len(points)
        self.keep_warm()
        log.info("knowledge base now serves generation %d (%d entries, %d points)", generation,
                 len(kb.corpus.entries), len(kb.corpus.points))
        return True

    async def follow_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.catch_up()
            except Exception:  # the database away for a moment: the next round tries again
                log.exception("checking for a new knowledge-base publication failed")

    async def close(self) -> None:
        """End the worker process (a hub that stops)."""
        warming, self._warming = self._warming, None
        if warming is not None and not warming.done():
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        shutil.rmtree(self.builds_dir, ignore_errors=True)

    # -- what the worker wrote ------------------------------------------------------------------------
    def _new_build_dir(self) -> Path:
        """A new directory for the worker to write a build into. The first one also removes what hubs that
        are gone (a crash, a kill) left beside this hub's own."""
        if self._builds == 0 and self.builds_dir.parent.is_dir():
            for other in self.builds_dir.parent.iterdir():
                if other != self.builds_dir and not _hub_alive(other.name):
                    shutil.rmtree(other, ignore_errors=True)
        self._builds += 1
        out = self.builds_dir / f"build-{self._builds}"
        shutil.rmtree(out, ignore_errors=True)
        self.builds_dir.mkdir(parents=True, exist_ok=True)
        return out

    def _remove_builds(self) -> None:
        """Remove every build directory of this hub but the served knowledge base's (a thread's build has
        none). A search under way on an older one keeps its open files: Linux frees them after it."""
        if not self.builds_dir.is_dir():
            return
        saved = getattr(getattr(self._get_kb(), "backend", None), "_saved", None)
        for built in self.builds_dir.iterdir():
            if saved is None or built != Path(saved):
                shutil.rmtree(built, ignore_errors=True)

    # -- the worker ----------------------------------------------------------------------------------
    def builds_in_process(self, records: int) -> bool:
        return self.process_from is not None and records >= self.process_from

    def keep_warm(self) -> asyncio.Task | None:
        """Start a worker in the background when the served base is built in one and none is up (this
        replica started on it, its worker died); the warm-up, or None when nothing needs starting."""
        if self.served_records is None or not self.builds_in_process(self.served_records):
            return None
        if self._warming is not None and not self._warming.done():
            return self._warming
        if self._pool is not None:
            if self._lock.locked():  # a build is running on it: a death shows there
                return None
            from knowledge_base import build_worker

            try:
                self._pool.submit(build_worker.alive)  # refused at once when the worker has died
                return None
            except BrokenProcessPool:
                log.warning("the knowledge-base build worker died; starting a new one in the background")
                self._drop_pool()
        if self._warm_failed_at is not None and time.monotonic() - self._warm_failed_at < WARM_RETRY_S:
            return None
        self._warming = asyncio.get_running_loop().create_task(self._warm_up(), name="kb-worker-warm-up")
        return self._warming

    async def warmed(self) -> dict | None:
        """Wait for a warm-up in progress (tests, the benchmark); what it cost, or None without one."""
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
        return self.last_warm_up

    async def _warm_up(self) -> None:
        from knowledge_base import build_worker

        async with self._lock:  # a publication meanwhile waits for it: one worker, one build at a time
            if self._pool is not None:
                return
            started = time.perf_counter()
            entries, points = await self.records.served()
            seed = self._new_pool()
            try:
                info = await asyncio.get_running_loop().run_in_executor(self._pool, partial(
                    build_worker.warm_up, self.config, entries, points, today=self.today(),
                    stale_after_years=self.records.stale_after_years, seed=seed))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warming the knowledge-base build worker failed; the next publication starts one")
                self._warm_failed_at = time.monotonic()
                self._drop_pool()
                return
            self._warm_failed_at = None
            self.last_warm_up = {**info, "wall_s": round(time.perf_counter() - started, 1)}
        log.info("knowledge-base build worker ready (pid %s): %d texts cut, %d encoded, in %.1f s at nice %s",
                 info["pid"], info["cut"], info["encoded"], self.last_warm_up["wall_s"], info["niceness"])

    def _new_pool(self):
        """Start the worker process; the running knowledge base's texts and vectors to seed it with."""
        from knowledge_base import build_worker

        one_blas_thread()  # the hub did at start; also here for a publisher run on its own (tests, tools)
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=build_worker.lower_priority)
        units = getattr(getattr(self._get_kb(), "answerer", None), "units", None)
        return None if units is None else (list(units.layout.texts), units.vectors)

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- building ---------------------------------------------------------------------------------
    async def _build(self, entries: list[dict], points: list[dict], today: dt.date, *, here: bool = False):
        if here or not self.builds_in_process(len(entries) + len(points)):
            return await asyncio.to_thread(paused(self._build_here), entries, points, today)
        from knowledge_base import build_worker

        old = self._get_kb()
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            seed = self._new_pool() if self._pool is None else None  # a new worker starts from the running vectors
            try:
                built = await loop.run_in_executor(self._pool, partial(
                    build_worker.build, self.config, entries, points, today=today, out=self._new_build_dir(),
                    stale_after_years=self.records.stale_after_years, seed=seed))
                break
            except BrokenProcessPool:  # the worker died (killed, out of memory): once more in a new one
                self._drop_pool()
                if attempt == 2:
                    raise
                log.warning("the knowledge-base build worker had died; building in a new one")
        embedder = getattr(old, "embedder", None)
        if embedder is None:  # no running knowledge base to take the model from (not the hub's case)
            from knowledge_base.embedder import Embedder

            embedder = await asyncio.to_thread(Embedder.from_config, self.config)
        text = getattr(old, "text", None)
        if text is None:
            from knowledge_base.text import TextProcessor

            text = TextProcessor()
        if getattr(old, "answerer", None) is not None:  # the same fit attach_answerer loads
            classifier = old.answerer.classifier
        else:
            from knowledge_base.unit_classifier import UnitClassifier

            classifier = UnitClassifier.load()
        # Mapped and opened in a thread: the event loop goes on, and chat's threads get the GIL in between.
        # With the collector paused: the millions of objects the new base allocates set off no full collection.
        return await asyncio.to_thread(paused(build_worker.load), built, embedder=embedder, text=text,
                                       classifier=classifier)

    def _build_here(self, entries: list[dict], points: list[dict], today: dt.date):
        from knowledge_base.embedded import known_vectors
        from knowledge_base.factory import open_knowledge_base
        from knowledge_base.records import corpus_from_records

        corpus = corpus_from_records(entries, points, stale_after_years=self.records.stale_after_years, today=today)
        if corpus.errors:
            listing = "；".join(str(p) for p in corpus.errors[:5])
            raise CorpusError(f"{len(corpus.errors)}处错误：{listing}")
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


def paused(build: Callable) -> Callable:
    """``build`` run with the garbage collector paused, what it made frozen (xiaozhi/hub/infra/collector.py)."""
    @wraps(build)
    def run(*args, **kwargs):
        with collector_paused():
            return build(*args, **kwargs)

    return run


def _hub_alive(name: str) -> bool:
    """Whether the hub that owns the build directory ``hub-<pid>`` still runs (on this machine)."""
    try:
        os.kill(int(name.removeprefix("hub-")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
